"""One memory space per API key, without ever storing or showing the key.

The id is ``prefix + hex(HMAC-SHA256(secret, key))`` cut to ``length`` hex
digits. The secret makes ids impossible to precompute from a list of likely
keys; sharing it between replicas makes every replica give the same id for
the same key. Off unless enabled in the config.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from multidict import CIMultiDictProxy

from memproxy import DetectFunction, Detection, DetectorContext, DetectorSpec, hookimpl
from memproxy.config import ConfigError
from memproxy.identifiers import check_id

SECRET_ENV = "MEMPROXY_HASH_SECRET"
MIN_SECRET_LENGTH = 16
KEY = "memproxy.detectors.api_key_hash.options"


def api_key_of(headers: CIMultiDictProxy[str]) -> str | None:
    """The client's API key from ``Authorization: Bearer``, ``x-api-key`` or ``api-key``."""
    auth = headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
        if key:
            return key
    return headers.get("x-api-key") or headers.get("api-key") or None


def build(ctx: DetectorContext) -> DetectFunction:
    options = ctx.options
    secret = options.get("secret") or os.environ.get(SECRET_ENV)
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{KEY}.secret",
            f"the API-key hash needs a secret of at least {MIN_SECRET_LENGTH} characters",
            f"set {SECRET_ENV} (e.g. export {SECRET_ENV}=$(openssl rand -hex 32)) or "
            f"options.secret: os.environ/NAME; use the same secret on every replica",
        )
    prefix = options.get("prefix", "key-")
    if not isinstance(prefix, str) or (prefix and check_id(prefix + "0") is not None):
        raise ConfigError(f"{KEY}.prefix", f"{prefix!r} cannot start a user id",
                          "use letters, digits and . _ - : @ +")
    length = options.get("length", 16)
    if isinstance(length, bool) or not isinstance(length, int) or not 8 <= length <= 64:
        raise ConfigError(f"{KEY}.length", f"must be a whole number from 8 to 64, got {length!r}",
                          "16 hex digits (64 bits) is plenty for telling keys apart")
    key_bytes = secret.encode()

    def detect(headers: CIMultiDictProxy[str]) -> Detection | None:
        api_key = api_key_of(headers)
        if api_key is None:
            return None
        digest = hmac.new(key_bytes, api_key.encode("utf-8", "surrogateescape"),
                          hashlib.sha256).hexdigest()
        return Detection(prefix + digest[:length], "keyed hash of the request's API key")

    return detect


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        name="api_key_hash", priority=50, build=build, enabled_by_default=False,
        options=frozenset({"secret", "prefix", "length"}),
        description="keyed hash (HMAC-SHA256) of the client's API key",
    )]
