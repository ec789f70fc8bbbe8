"""One memory space per API key, without ever storing or showing the key.

The id is ``prefix + hex(HMAC-SHA256(secret, key))`` cut to ``length`` hex
digits. The secret makes ids impossible to precompute from a list of likely
keys; sharing it between replicas makes every replica give the same id for
the same key. Off unless enabled in the config.

The key hashed is exactly the one LiteLLM will authenticate the request with:
:func:`litellm_api_key` follows LiteLLM's own precedence and parsing, on the
headers as memproxy forwards them. Hashing any other credential would let a
client authenticate as itself while filing its conversations under someone
else's key.

With ``per_tool: true`` the id also names the tool (from
``user_id_mappings.header_patterns``), so one person's Claude Code and their
scripts keep separate memories: ``key-3f2a...:claude-code``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping

from memproxy import (
    ClientRequest,
    ConfigError,
    Detection,
    DetectorContext,
    DetectorOption,
    DetectorSpec,
    RequestDetectFunction,
    hookimpl,
)
from memproxy.detectors.header_patterns import rule_matcher
from memproxy.identifiers import MAX_ID_LENGTH, check_id

SECRET_ENV = "MEMPROXY_HASH_SECRET"
MIN_SECRET_LENGTH = 16
KEY = "memproxy.detectors.api_key_hash.options"
TOOL_SEPARATOR = ":"

# The headers LiteLLM 1.108 reads a key from, after x-litellm-api-key and Authorization, in
# its order (litellm/proxy/auth/user_api_key_auth.py, get_api_key): Azure's, Anthropic's,
# Google AI Studio's and Azure APIM's. Their values are the key itself.
_PLAIN_KEY_HEADERS = ("api-key", "x-api-key", "x-goog-api-key", "ocp-apim-subscription-key")
#: Every header LiteLLM may read a key from (besides a configured custom one).
LITELLM_KEY_HEADERS = ("x-litellm-api-key", "authorization", *_PLAIN_KEY_HEADERS)
_AWS_BEARER = re.compile(r"Credential=Bearer\s+([^/\s,]+)")
_AWS_CREDENTIAL = re.compile(r"Credential=([^/\s,]+)")


def _bearer_token(value: str, *, unknown_scheme_is_key: bool) -> str:
    """LiteLLM's ``get_bearer_token``, including its use of ``str.replace``."""
    if value.startswith("Bearer "):
        return value.replace("Bearer ", "")
    if value.startswith("Basic "):
        return value.replace("Basic ", "")
    if value.startswith("bearer "):
        return value.replace("bearer ", "")
    if value.startswith("AWS4-HMAC-SHA256"):
        match = _AWS_BEARER.search(value) or _AWS_CREDENTIAL.search(value)
        return match.group(1) if match else ("" if not unknown_scheme_is_key else value)
    return value if unknown_scheme_is_key else ""


def litellm_api_key(request: ClientRequest, custom_header: str | None = None) -> str | None:
    """The API key LiteLLM will check for this request, or ``None`` when there is none.

    LiteLLM takes the first non-empty of: ``x-litellm-api-key`` (a Bearer/Basic
    prefix removed, otherwise the value as it is), ``Authorization`` (only
    Bearer, Basic and AWS SigV4 forms yield a key), ``API-Key``, ``x-api-key``,
    ``x-goog-api-key``, ``Ocp-Apim-Subscription-Key``, and ``?key=`` on Google
    ``generateContent`` routes. A header named by
    ``general_settings.litellm_key_header_name`` overrides them all (its last
    value, parsed like ``Authorization``). Repeated headers count by their
    first value, as in LiteLLM.
    """
    headers = request.headers
    key: str | None = None
    if value := headers.get("x-litellm-api-key"):
        key = _bearer_token(value, unknown_scheme_is_key=True)
    elif value := headers.get("authorization"):
        key = _bearer_token(value, unknown_scheme_is_key=False)
    else:
        for name in _PLAIN_KEY_HEADERS:
            if value := headers.get(name):
                key = value
                break
        else:
            if "generateContent" in request.path and (value := request.query.get("key")):
                key = value
    if custom_header is not None and (values := headers.getall(custom_header, ())):
        key = _bearer_token(values[-1], unknown_scheme_is_key=False)
    return key or None


def _custom_key_header(litellm_sections: Mapping[str, object]) -> str | None:
    general = litellm_sections.get("general_settings")
    name = general.get("litellm_key_header_name") if isinstance(general, Mapping) else None
    return name.lower() if isinstance(name, str) and name else None


def _prefix_problem(prefix: str) -> str | None:
    if prefix and check_id(prefix + "0") is not None:
        return f"{prefix!r} cannot start a user id; use letters, digits and . _ - : @ +"
    return None


OPTIONS = (
    DetectorOption("secret", f"the HMAC key, at least {MIN_SECRET_LENGTH} characters; "
                   f"${SECRET_ENV} when unset; the same on every replica", secret=True),
    DetectorOption("prefix", "put before the hex digits of every id", "key-",
                   check=_prefix_problem),
    DetectorOption("length", "hex digits of the hash kept in the id (8 to 64)", 16, int,
                   check=lambda n: None if 8 <= n <= 64 else f"must be from 8 to 64, got {n}"),
    DetectorOption("per_tool", "one memory space per key and tool (the header_patterns id)",
                   False, bool),
)


def build(ctx: DetectorContext) -> RequestDetectFunction:
    options = ctx.options
    secret = options["secret"] or os.environ.get(SECRET_ENV)
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{KEY}.secret",
            f"the API-key hash needs a secret of at least {MIN_SECRET_LENGTH} characters",
            f"set {SECRET_ENV} (e.g. export {SECRET_ENV}=$(openssl rand -hex 32)) or "
            f"options.secret: os.environ/NAME; use the same secret on every replica",
        )
    prefix: str = options["prefix"]
    length: int = options["length"]
    per_tool: bool = options["per_tool"]
    if per_tool:
        rules = ctx.settings.mappings.header_patterns
        longest = max((len(rule.user_id) for rule in rules), default=0)
        if len(prefix) + length + len(TOOL_SEPARATOR) + longest > MAX_ID_LENGTH:
            raise ConfigError(f"{KEY}.length", f"ids with per_tool would be longer than "
                              f"{MAX_ID_LENGTH} characters", "use a shorter prefix, length or "
                              "header_patterns user_id")
    tool_of = rule_matcher(ctx.settings) if per_tool else None
    custom_header = _custom_key_header(ctx.settings.litellm_sections)
    key_bytes = secret.encode()

    def detect(request: ClientRequest) -> Detection | None:
        api_key = litellm_api_key(request, custom_header)
        if api_key is None:
            return None
        digest = hmac.new(key_bytes, api_key.encode("utf-8", "surrogateescape"),
                          hashlib.sha256).hexdigest()
        user_id = prefix + digest[:length]
        tool = tool_of(request.headers) if tool_of is not None else None
        if tool is None:
            return Detection(user_id, "keyed hash of the request's API key")
        return Detection(user_id + TOOL_SEPARATOR + tool.user_id,
                         f"keyed hash of the request's API key, and the tool ({tool.reason})")

    return detect


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        name="api_key_hash", priority=90, build=build, enabled_by_default=False,
        options=OPTIONS, reads="request",
        description="keyed hash (HMAC-SHA256) of the API key LiteLLM checks",
    )]
