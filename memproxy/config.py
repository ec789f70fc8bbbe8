"""Turn config.yaml into frozen, validated settings.

One file serves LiteLLM and memproxy: LiteLLM ignores the top-level keys it
does not know (``user_id_mappings``, ``memproxy``), and memproxy reads
LiteLLM's own sections only to warn about settings that would silently drop
the headers it injects.

Every mistake a user can make here raises :class:`ConfigError`, whose message
names the key and says how to fix it.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from memproxy.identifiers import check_id

ENV_PREFIX = "os.environ/"
DEFAULT_CONFIG_PATH = Path("config.yaml")
DEFAULT_LITELLM_URL = "http://127.0.0.1:8765"
DEFAULT_PORT = 8764


class ConfigError(Exception):
    """A configuration mistake, with the key it concerns and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        text = f"{key}: {problem}" if key else problem
        super().__init__(f"{text}\n  fix: {fix}" if fix else text)


class Secret:
    """A string that never shows itself in reprs, logs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class HeaderPattern:
    """One ``user_id_mappings.header_patterns`` entry, compiled."""

    header: str
    pattern: re.Pattern[str]
    user_id: str


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """``memproxy.detectors.<name>``: overrides for one detector."""

    priority: int | None = None
    enabled: bool | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; ``None`` means no limit (only LiteLLM's side may go without one)."""

    connect: float | None = 10.0
    between_chunks: float | None = 600.0
    total: float | None = None
    #: From a request's first byte to the end of its headers.
    request_head: float = 10.0
    #: How long an idle client connection stays open.
    keepalive: float = 60.0
    #: The longest silence while a client sends its body.
    request_body: float = 60.0


@dataclass(frozen=True, slots=True)
class HeaderSettings:
    """``memproxy.headers``: what memproxy writes into forwarded requests."""

    user_id: str = "x-sm-user-id"
    conversation_id: str = "x-sm-conversation-id"
    conversation_id_from: tuple[str, ...] = ("x-claude-code-session-id", "session-id")
    litellm_end_user_id: bool = False
    supermemory_api_key: Secret | None = None


TRUST_MODES = ("anyone", "networks", "secret", "never")
UNIDENTIFIED_POLICIES = ("share", "no_memory", "refuse")
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class ExplicitIdTrust:
    """``memproxy.explicit_id``: who may choose a memory space with the explicit header."""

    trust: str = "networks"
    networks: tuple[IPv4Network | IPv6Network, ...] = tuple(
        ip_network(n) for n in LOOPBACK_NETWORKS)
    secret_header: str = "x-memproxy-secret"
    secret: Secret | None = None


METRICS_ACCESS = ("admin", "anyone")
MIN_ADMIN_TOKEN_LENGTH = 16


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """``memproxy.admin``: who may use memproxy's own endpoints (status, inbox, reload, ...)."""

    networks: tuple[IPv4Network | IPv6Network, ...] = tuple(
        ip_network(n) for n in LOOPBACK_NETWORKS)
    #: Accepted from anywhere as ``Authorization: Bearer <token>``.
    token: Secret | None = None
    #: Host names a browser may reach the endpoints by, besides ``localhost``,
    #: IP addresses and ``memproxy.host`` (a guard against DNS rebinding).
    hosts: tuple[str, ...] = ()
    #: ``/metrics``: under the same rule (``admin``) or open to ``anyone``.
    metrics: str = "admin"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything memproxy needs, validated."""

    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    litellm_url: str = DEFAULT_LITELLM_URL
    custom_header: str = "x-memory-user-id"
    header_patterns: tuple[HeaderPattern, ...] = ()
    default_user_id: str = "default"
    detectors: Mapping[str, DetectorSettings] = field(default_factory=dict)
    headers: HeaderSettings = field(default_factory=HeaderSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body_size: int = 256 * 1024 * 1024
    #: Request line and headers together, in bytes.
    max_header_size: int = 256 * 1024
    explicit_id: ExplicitIdTrust = field(default_factory=ExplicitIdTrust)
    admin: AdminAccess = field(default_factory=AdminAccess)
    #: What to do with requests only the default detector recognised.
    unidentified: str = "share"
    log_format: str = "auto"
    log_level: str = "info"
    #: ``asyncio`` (the standard library's loop) or ``uvloop``.
    event_loop: str = "asyncio"
    #: LiteLLM's own sections of the same file, untouched (for the lint).
    litellm_sections: Mapping[str, Any] = field(default_factory=dict)

    def detector(self, name: str) -> DetectorSettings:
        return self.detectors.get(name, DetectorSettings())


LITELLM_SECTIONS = ("model_list", "general_settings", "litellm_settings", "router_settings")

_MEMPROXY_KEYS = {
    "host", "port", "litellm_url", "max_body_size", "timeouts", "headers", "detectors", "log",
    "explicit_id", "unidentified", "event_loop", "admin", "max_header_size",
}
_EXPLICIT_ID_KEYS = {"trust", "networks", "secret_header", "secret"}
_ADMIN_KEYS = {"networks", "token", "hosts", "metrics"}
_MAPPING_KEYS = {"custom_header", "header_patterns", "default_user_id"}
_PATTERN_KEYS = {"header", "pattern", "user_id"}
_TIMEOUT_KEYS = {"connect", "between_chunks", "total", "request_head", "keepalive",
                 "request_body"}
_HEADER_KEYS = {
    "user_id", "conversation_id", "conversation_id_from", "litellm_end_user_id",
    "supermemory_api_key",
}
_DETECTOR_KEYS = {"priority", "enabled", "options"}
_LOG_KEYS = {"format", "level"}
EVENT_LOOPS = ("asyncio", "uvloop")
_LOG_FORMATS = ("auto", "json", "console")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path | None, bool]:
    """Which file to read, and whether the user asked for it by name.

    Order: the ``--config`` flag, the ``LITELLM_CONFIG`` environment variable,
    then ``./config.yaml`` if it exists.
    """
    if explicit:
        return Path(explicit), True
    from_env = os.environ.get("LITELLM_CONFIG")
    if from_env:
        return Path(from_env), True
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH, False
    return None, False


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    litellm_url: str | None = None,
) -> Settings:
    """Read and validate the config; keyword arguments are command-line overrides.

    ``litellm_url`` precedence: the argument, ``LITELLM_BASE_URL``, the file,
    the default.
    """
    file, _ = resolve_config_path(path)
    raw: Mapping[str, Any] = {}
    if file is not None:
        raw = _read_yaml(file)
    settings = parse_settings(raw, path=file)
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = _check_port("--port", port)
    url = litellm_url or os.environ.get("LITELLM_BASE_URL")
    if url:
        key = "--litellm-url" if litellm_url else "LITELLM_BASE_URL"
        overrides["litellm_url"] = _check_url(key, url)
    if overrides:
        settings = replace(settings, **overrides)
    return settings


def _read_yaml(file: Path) -> Mapping[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "", f"config file {file} does not exist",
            "pass --config with the path of your config.yaml, or run from the folder that has it",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {file}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(
            "", f"{file} is not valid YAML{where}: {problem}",
            "check the indentation and quoting on that line",
        ) from None
    except RecursionError:
        raise ConfigError("", f"{file} nests lists or mappings too deeply to read",
                          "a config needs only a few levels") from None
    except ValueError as exc:
        # The YAML is well formed but a value in it is not, e.g. the date 2024-13-45
        # or an integer with more digits than Python converts.
        raise ConfigError("", f"{file} has a value YAML cannot read: {exc}",
                          "quote the value if it is meant as text") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{file} must hold a mapping of sections at the top level")
    return data


def parse_settings(raw: Mapping[str, Any], *, path: Path | None = None) -> Settings:
    """Validate an already-parsed config document."""
    mappings = _section(raw, "user_id_mappings", _MAPPING_KEYS)
    section = _section(raw, "memproxy", _MEMPROXY_KEYS)

    custom_header = _header_name(
        "user_id_mappings.custom_header", mappings.get("custom_header", "x-memory-user-id")
    )
    default_user_id = _user_id(
        "user_id_mappings.default_user_id", mappings.get("default_user_id", "default")
    )
    patterns = _patterns(mappings.get("header_patterns"))

    timeouts_raw = _section(section, "timeouts", _TIMEOUT_KEYS, prefix="memproxy.")
    defaults = Timeouts()
    # The client's side always has a limit: without one, a client that stalls holds a
    # connection (and memory) for ever.
    client_timeouts: dict[str, float] = {}
    for name in ("request_head", "keepalive", "request_body"):
        key = f"memproxy.timeouts.{name}"
        default = getattr(defaults, name)
        seconds = _seconds(key, timeouts_raw, name, default)
        if seconds is None:
            raise ConfigError(key, "must be a positive number of seconds; null (no limit) is "
                                   "not allowed for a client's side", f"e.g. {default:g}")
        client_timeouts[name] = seconds
    timeouts = Timeouts(
        connect=_seconds("memproxy.timeouts.connect", timeouts_raw, "connect", defaults.connect),
        between_chunks=_seconds(
            "memproxy.timeouts.between_chunks", timeouts_raw, "between_chunks",
            defaults.between_chunks,
        ),
        total=_seconds("memproxy.timeouts.total", timeouts_raw, "total", defaults.total),
        **client_timeouts,
    )

    log_raw = _section(section, "log", _LOG_KEYS, prefix="memproxy.")
    log_format = _choice("memproxy.log.format", _env(log_raw.get("format", "auto")), _LOG_FORMATS)
    log_level = _choice("memproxy.log.level", _env(log_raw.get("level", "info")), _LOG_LEVELS)

    event_loop = _choice("memproxy.event_loop", _env(section.get("event_loop", "asyncio")),
                         EVENT_LOOPS)
    if event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("memproxy.event_loop", "uvloop is not installed; install it with "
                          "pip install 'memproxy[uvloop]', or set event_loop: asyncio")

    return Settings(
        path=path,
        host=_string("memproxy.host", _env(section.get("host", "127.0.0.1"))),
        port=_check_port("memproxy.port", _env(section.get("port", DEFAULT_PORT))),
        litellm_url=_check_url(
            "memproxy.litellm_url", _env(section.get("litellm_url", DEFAULT_LITELLM_URL))
        ),
        custom_header=custom_header,
        header_patterns=patterns,
        default_user_id=default_user_id,
        detectors=_detectors(section.get("detectors")),
        headers=_headers(_section(section, "headers", _HEADER_KEYS, prefix="memproxy.")),
        timeouts=timeouts,
        max_body_size=_size("memproxy.max_body_size", section.get("max_body_size", "256MiB")),
        max_header_size=_size("memproxy.max_header_size",
                              section.get("max_header_size", "256KiB")),
        explicit_id=_explicit_id(
            _section(section, "explicit_id", _EXPLICIT_ID_KEYS, prefix="memproxy.")),
        admin=_admin(_section(section, "admin", _ADMIN_KEYS, prefix="memproxy.")),
        unidentified=_choice("memproxy.unidentified", _env(section.get("unidentified", "share")),
                             UNIDENTIFIED_POLICIES),
        log_format=log_format,
        log_level=log_level,
        event_loop=event_loop,
        litellm_sections={k: raw[k] for k in LITELLM_SECTIONS if k in raw},
    )


# -- the LiteLLM header-forwarding lint ---------------------------------------------------

#: The memory router's address form: ``/v3/`` then the provider's host (``/v3/api.anthropic.com``).
_ROUTER_PATH = re.compile(r"/v3/[a-z0-9-]+(?:\.[a-z0-9-]+)+(?:/|$)", re.IGNORECASE)


def goes_through_supermemory(api_base: Any) -> bool:
    """Whether a model with this ``litellm_params.api_base`` reaches Supermemory's memory router.

    The router is addressed as ``https://api.supermemory.ai/v3/<provider host>``. An
    address naming Supermemory counts, and so does any address of the ``/v3/<provider
    host>`` form, since a self-hosted router or a local stand-in has a host of its own.
    """
    value = _env(api_base)
    if not isinstance(value, str):
        return False
    if "supermemory" in value.lower():
        return True
    try:
        path = urlsplit(value).path
    except ValueError:
        return False
    return _ROUTER_PATH.match(path) is not None


def lint(settings: Settings) -> list[str]:
    """Warnings about where LiteLLM would send the memory headers, or fail to.

    The memory user id and the Supermemory key belong to the models that go through
    the Supermemory router: there they must arrive, and no other provider should get
    them. Only runs when the file holds LiteLLM sections: a memproxy-only file says
    nothing about how LiteLLM is configured.
    """
    sections = settings.litellm_sections
    if not sections:
        return []
    routed, others = _model_routes(sections.get("model_list"))
    everywhere, listed = _forwarding(sections)
    header = settings.headers.user_id
    warnings: list[str] = []

    exposed = [name for name in others if everywhere or name in listed]
    if settings.headers.supermemory_api_key is not None and exposed:
        if everywhere:
            scope = "to every model (general_settings.forward_client_headers_to_llm_api: true)"
            undo = "remove general_settings.forward_client_headers_to_llm_api"
        else:
            scope = f"to {', '.join(listed)}"
            undo = f"take {', '.join(exposed)} off the forwarding list"
        warnings.append(
            "memproxy adds x-supermemory-api-key to every request (from "
            "memproxy.headers.supermemory_api_key, or $SUPERMEMORY_API_KEY when the config "
            f"does not set it) and LiteLLM forwards client headers {scope}, so the providers "
            f"of {', '.join(exposed)} receive your Supermemory key and {header}.\n"
            f"Fix: {undo}, set memproxy.headers.supermemory_api_key: null, and instead:\n"
            + _forwarding_fix(routed)
        )

    missing = [name for name in routed if not everywhere and name not in listed]
    if missing and listed:
        warnings.append(
            f"LiteLLM forwards client headers only for {', '.join(listed)}; requests to "
            f"{', '.join(missing)} reach the provider without {header}, so they get no memory.\n"
            + _forwarding_fix(routed)
        )
    elif missing:
        warnings.append(
            f"LiteLLM will silently drop {header}: header forwarding is off in this config, so "
            f"requests to {', '.join(missing)} reach the Supermemory router without a memory "
            "user id.\n" + _forwarding_fix(routed)
        )

    if others and not routed:
        warnings.append(
            f"No model in model_list goes through the Supermemory memory router, so {header} "
            "gives no request memory. A model goes through it when its litellm_params.api_base "
            "is the router's address, e.g. https://api.supermemory.ai/v3/api.anthropic.com.\n"
            + _forwarding_fix(routed)
        )
    return warnings


def _forwarding_fix(routed: list[str]) -> str:
    """How to send the memory headers to the Supermemory models and to no other."""
    names = ", ".join(routed) or "model-name, ..."
    return (
        "Forward client headers only to the models that go through the Supermemory router, "
        "and let LiteLLM add the Supermemory key to those models itself (same config.yaml):\n\n"
        "    litellm_settings:\n"
        "      model_group_settings:\n"
        f"        forward_client_headers_to_llm_api: [{names}]\n\n"
        "and in the litellm_params of each of those models:\n\n"
        "        extra_headers: {x-supermemory-api-key: os.environ/SUPERMEMORY_API_KEY}"
    )


def _forwarding(sections: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether LiteLLM forwards client headers to every model, and the per-model list."""
    general = sections.get("general_settings")
    everywhere = isinstance(general, Mapping) and \
        general.get("forward_client_headers_to_llm_api") is True
    litellm_settings = sections.get("litellm_settings")
    groups = litellm_settings.get("model_group_settings") if isinstance(
        litellm_settings, Mapping) else None
    listed = groups.get("forward_client_headers_to_llm_api") if isinstance(
        groups, Mapping) else None
    return everywhere, [str(name) for name in listed] if isinstance(listed, list) else []


def _model_routes(model_list: Any) -> tuple[list[str], list[str]]:
    """Model names going through the Supermemory router, and those going to other providers.

    A name with several deployments can be in both. Models LiteLLM answers itself
    (``mock_response``) are in neither: no provider sees their headers.
    """
    routed: list[str] = []
    others: list[str] = []
    for entry in model_list if isinstance(model_list, list) else ():
        name = entry.get("model_name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str):
            continue
        params = entry.get("litellm_params")
        if not isinstance(params, Mapping):
            params = {}
        if params.get("mock_response") is not None:
            continue
        names = routed if goes_through_supermemory(params.get("api_base")) else others
        if name not in names:
            names.append(name)
    return routed, others


# -- field validators -----------------------------------------------------------------


def _env(value: Any) -> Any:
    """Resolve LiteLLM-style ``os.environ/NAME`` references; unset gives ``None``."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        return os.environ.get(value[len(ENV_PREFIX):]) or None
    return value


def _unknown_key_error(where: str, key: Any, allowed: set[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    hint = f"did you mean '{close[0]}'?" if close else ""
    fix = f"{hint} Known keys: {', '.join(sorted(allowed))}".strip()
    return ConfigError(f"{where}{key}", "unknown key", fix)


def _section(
    raw: Mapping[str, Any], name: str, allowed: set[str], *, prefix: str = ""
) -> Mapping[str, Any]:
    value = raw.get(name)
    if value is None:
        return {}
    return _mapping(f"{prefix}{name}", value, allowed, "a mapping of keys",
                    f"indent the keys of {name}: under it")


def _mapping(where: str, value: Any, allowed: set[str], expected: str,
             fix: str = "") -> Mapping[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed``, or a ConfigError."""
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"must be {expected}, got {_kind(value)}", fix)
    for key in value:
        if key not in allowed:
            raise _unknown_key_error(f"{where}.", key, allowed)
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {str: "text", bool: "true/false", int: "a number", float: "a number",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    """``repr(value)`` cut short, so a 400-digit number still makes a one-line message."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python turns into text
        return "a number with thousands of digits"
    return text if len(text) <= 40 else text[:30] + f"... ({len(text)} characters)"


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be non-empty text, got {_kind(value)}")
    return value


def _header_name(key: str, value: Any) -> str:
    value = _env(value)
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise ConfigError(
            key, f"must be an HTTP header name, got {value!r}",
            "use letters, digits and dashes, e.g. x-memory-user-id",
        )
    return value.lower()


def _user_id(key: str, value: Any) -> str:
    value = _env(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be text, got {_kind(value)}")
    problem = check_id(value)
    if problem:
        raise ConfigError(key, f"{value!r} is not a valid user id: {problem}")
    return value


def _check_port(key: str, value: Any) -> int:
    # isdigit() alone also accepts digits int() cannot read, such as '²'.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(key, f"must be a port number from 0 to 65535, got {_brief(value)}")
    return value


def _check_url(key: str, value: Any) -> str:
    """An http(s) base URL without credentials, query string or fragment."""
    example = f"e.g. {DEFAULT_LITELLM_URL}"
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a URL, got {_kind(value)}", example)
    # The value is echoed only when it cannot hold a password.
    not_url = ConfigError(key, "must be an http(s) URL" if "@" in value
                          else f"{value!r} is not an http(s) URL", example)
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not a number up to 65535
    except ValueError:
        raise not_url from None
    if "@" in parts.netloc:
        raise ConfigError(
            key, "must not hold a user name or password: credentials do not belong in the URL",
            "write it as http://host:port; memproxy adds no credentials of its own, each client "
            "sends its own API key",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise not_url
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not have a query string or fragment",
                          f"e.g. {DEFAULT_LITELLM_URL}")
    return value.rstrip("/")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.lower() in choices:
        return value.lower()
    raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")


#: A week. A longer limit is no limit in practice, which null says; the bound also keeps
#: a huge number from overflowing the float a timeout is kept in.
_MAX_SECONDS = 7 * 24 * 3600


def _seconds(key: str, raw: Mapping[str, Any], name: str, default: float | None) -> float | None:
    if name not in raw:
        return default
    value = _env(raw[name])
    if value is None:
        return None
    # The chained comparison also refuses NaN and infinity.
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= _MAX_SECONDS:
        raise ConfigError(
            key, f"must be a positive number of seconds up to {_MAX_SECONDS} (a week), "
                 f"or null (no limit), got {_brief(value)}",
        )
    return float(value)


#: 1024GiB (1 TiB): far above any request body, far below a size that would overflow.
_MAX_SIZE = 1024**4


def _size(key: str, value: Any) -> int:
    value = _env(value)
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            unit = (match.group(2) or "").lower().rstrip("b")
            size = float(match.group(1)) * _SIZE_UNITS[unit]  # too many digits give inf
    if size is None or not 1 <= size <= _MAX_SIZE:
        raise ConfigError(
            key, f"must be a size from 1 byte to 1024GiB, got {_brief(value)}",
            "e.g. 104857600, '100MB' or '256MiB'",
        )
    return int(size)


def _patterns(value: Any, key: str = "user_id_mappings.header_patterns"
              ) -> tuple[HeaderPattern, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, got {_kind(value)}",
                          "start each entry with '- header: ...'")
    compiled = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        entry = _mapping(where, entry, _PATTERN_KEYS, "a mapping with header, pattern and user_id")
        for name in ("pattern", "user_id"):
            if name not in entry:
                raise ConfigError(f"{where}.{name}", "is missing",
                                  "each entry needs header, pattern and user_id")
        header = _header_name(f"{where}.header", entry.get("header", "user-agent"))
        text = _env(entry["pattern"])
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{where}.pattern", f"must be a regular expression, got "
                                                 f"{_kind(text)}")
        try:
            pattern = re.compile(text, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(
                f"{where}.pattern", f"{text!r} is not a valid regular expression: {exc}",
                "escape special characters such as ( ) [ ] . + with a backslash, "
                "or quote the pattern in single quotes",
            ) from None
        compiled.append(HeaderPattern(header, pattern, _user_id(f"{where}.user_id",
                                                                 entry["user_id"])))
    return tuple(compiled)


def parse_rule(text: str) -> HeaderPattern:
    """One ``header_patterns`` entry given as YAML text (as the unmatched inbox suggests)."""
    text = text.strip()
    if text.startswith("- "):
        text = text[2:]
    try:
        entry = yaml.safe_load(text)
    except yaml.YAMLError:
        entry = None
    if not isinstance(entry, Mapping):
        raise ConfigError("--rule", f"{text!r} is not a header_patterns entry",
                          "write it as \"{header: user-agent, pattern: '^Tool/', user_id: tool}\"")
    return _patterns([entry], key="--rule")[0]


_MAX_PRIORITY = 1_000_000
# ASCII digits only: int() cannot read every character isdigit() accepts.
_PRIORITY_TEXT = re.compile(r"-?[0-9]{1,7}")


def _detectors(value: Any) -> Mapping[str, DetectorSettings]:
    key = "memproxy.detectors"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping of detector names, got {_kind(value)}")
    result: dict[str, DetectorSettings] = {}
    for name, entry in value.items():
        where = f"{key}.{name}"
        if entry is None:
            entry = {}
        if entry is False:
            entry = {"enabled": False}
        entry = _mapping(where, entry, _DETECTOR_KEYS, "a mapping (priority, enabled, options)")
        priority = _env(entry.get("priority"))
        if isinstance(priority, str) and _PRIORITY_TEXT.fullmatch(priority):
            priority = int(priority)
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                     or not -_MAX_PRIORITY <= priority <= _MAX_PRIORITY):
            raise ConfigError(
                f"{where}.priority",
                f"must be a whole number from -{_MAX_PRIORITY} to {_MAX_PRIORITY}, "
                f"got {_brief(priority)}",
                "higher numbers run first, e.g. 100",
            )
        enabled = _env(entry.get("enabled"))
        if isinstance(enabled, str) and enabled.lower() in ("true", "false"):
            enabled = enabled.lower() == "true"
        if enabled is not None and not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled", f"must be true or false, got {enabled!r}")
        options = entry.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}.options", f"must be a mapping, got {_kind(options)}")
        result[str(name)] = DetectorSettings(
            priority=priority, enabled=enabled,
            options={str(k): _env(v) for k, v in options.items()},
        )
    return result


def _explicit_id(raw: Mapping[str, Any]) -> ExplicitIdTrust:
    key = "memproxy.explicit_id"
    trust = _choice(f"{key}.trust", _env(raw.get("trust", "networks")), TRUST_MODES)
    networks = _networks(f"{key}.networks", raw.get("networks", list(LOOPBACK_NETWORKS)))
    secret = _env(raw.get("secret", "os.environ/MEMPROXY_EXPLICIT_ID_SECRET"))
    if trust == "secret" and (not isinstance(secret, str) or len(secret) < 16):
        raise ConfigError(
            f"{key}.secret", "trust: secret needs a shared secret of at least 16 characters",
            "set MEMPROXY_EXPLICIT_ID_SECRET, or secret: os.environ/NAME",
        )
    return ExplicitIdTrust(
        trust=trust, networks=networks,
        secret_header=_header_name(f"{key}.secret_header",
                                   raw.get("secret_header", "x-memproxy-secret")),
        secret=Secret(secret) if isinstance(secret, str) and secret else None,
    )


def _networks(key: str, value: Any) -> tuple[IPv4Network | IPv6Network, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of networks, got {_kind(value)}",
                          "e.g. [10.0.0.0/8, ::1]")
    networks = []
    for index, text in enumerate(value):
        try:
            networks.append(ip_network(str(_env(text)), strict=False))
        except ValueError:
            raise ConfigError(f"{key}[{index}]", f"{text!r} is not an IP network",
                              "write it as an address or CIDR, e.g. 192.168.1.0/24") from None
    return tuple(networks)


def _admin(raw: Mapping[str, Any]) -> AdminAccess:
    key = "memproxy.admin"
    token = _env(raw.get("token", "os.environ/MEMPROXY_ADMIN_TOKEN"))
    if token is not None and (not isinstance(token, str) or len(token) < MIN_ADMIN_TOKEN_LENGTH):
        raise ConfigError(f"{key}.token", f"must be at least {MIN_ADMIN_TOKEN_LENGTH} "
                          "characters", "e.g. export MEMPROXY_ADMIN_TOKEN=$(openssl rand -hex 32)"
                          " and token: os.environ/MEMPROXY_ADMIN_TOKEN")
    hosts = raw.get("hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"{key}.hosts", "must be a list of host names",
                          "e.g. [memproxy.internal]")
    return AdminAccess(
        networks=_networks(f"{key}.networks", raw.get("networks", list(LOOPBACK_NETWORKS))),
        token=Secret(token) if token else None,
        hosts=tuple(h.lower() for h in hosts),
        metrics=_choice(f"{key}.metrics", _env(raw.get("metrics", "admin")), METRICS_ACCESS),
    )


def _headers(raw: Mapping[str, Any]) -> HeaderSettings:
    defaults = HeaderSettings()
    sources = raw.get("conversation_id_from", list(defaults.conversation_id_from))
    if sources is None:
        sources = []
    if not isinstance(sources, list):
        raise ConfigError("memproxy.headers.conversation_id_from",
                          f"must be a list of header names, got {_kind(sources)}")
    end_user = _env(raw.get("litellm_end_user_id", False))
    if not isinstance(end_user, bool):
        raise ConfigError("memproxy.headers.litellm_end_user_id",
                          f"must be true or false, got {end_user!r}")
    if "supermemory_api_key" in raw:
        key_value = _env(raw["supermemory_api_key"])
    else:
        key_value = os.environ.get("SUPERMEMORY_API_KEY") or None
    if key_value is not None and not isinstance(key_value, str):
        raise ConfigError("memproxy.headers.supermemory_api_key",
                          "must be text, e.g. os.environ/SUPERMEMORY_API_KEY")
    return HeaderSettings(
        user_id=_header_name("memproxy.headers.user_id", raw.get("user_id", defaults.user_id)),
        conversation_id=_header_name(
            "memproxy.headers.conversation_id",
            raw.get("conversation_id", defaults.conversation_id),
        ),
        conversation_id_from=tuple(
            _header_name(f"memproxy.headers.conversation_id_from[{i}]", h)
            for i, h in enumerate(sources)
        ),
        litellm_end_user_id=end_user,
        supermemory_api_key=Secret(key_value) if key_value else None,
    )
