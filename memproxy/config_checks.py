"""What a config value may be: the checks behind every setting, and the error they raise.

Each check takes the value's dotted key (for the message) and the value as
YAML gave it, with ``os.environ/NAME`` already resolved (see
:func:`resolve_env`), and returns the value memproxy uses, or raises
:class:`ConfigError` saying what was wrong and how to fix it. Values from the
environment are text, so the numeric and boolean checks read text too.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any
from urllib.parse import urlsplit

from memproxy.identifiers import check_id

ENV_PREFIX = "os.environ/"
DEFAULT_LITELLM_URL = "http://127.0.0.1:8765"

#: A check: ``(key, raw value) -> value``, raising :class:`ConfigError`.
Check = Callable[[str, Any], Any]


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


def resolve_env(value: Any) -> Any:
    """``value`` with every ``os.environ/NAME`` in it replaced; an unset variable gives ``None``.

    One pass over a whole section, lists and mappings included, as LiteLLM does
    with its own sections of the same file.
    """
    if isinstance(value, str):
        if value.startswith(ENV_PREFIX):
            return os.environ.get(value[len(ENV_PREFIX):]) or None
        return value
    if isinstance(value, Mapping):
        return {k: resolve_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v) for v in value]
    return value


def kind(value: Any) -> str:
    """How a value reads to a person: "text", "a number", "a list", ..."""
    if value is None:
        return "nothing"
    return {str: "text", bool: "true/false", int: "a number", float: "a number",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def brief(value: Any) -> str:
    """``repr(value)`` cut short, so a 400-digit number still makes a one-line message."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python turns into text
        return "a number with thousands of digits"
    return text if len(text) <= 40 else text[:30] + f"... ({len(text)} characters)"


def unknown_key(where: str, key: object, allowed: Iterable[str]) -> ConfigError:
    """The error for a key nobody reads, with the closest known one."""
    known = sorted(allowed)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else ""
    fix = f"{hint} Known keys: {', '.join(known)}".strip()
    return ConfigError(f"{where}.{key}" if where else str(key), "unknown key", fix)


def mapping_of(key: str, value: Any, fix: str = "") -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping of keys, got {kind(value)}",
                          fix or f"indent the keys of {key.rsplit('.', 1)[-1]}: under it")
    return value


def list_of(key: str, value: Any, what: str, example: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of {what}, got {kind(value)}", f"e.g. {example}")
    return value


# -- checks ---------------------------------------------------------------------------


def text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be non-empty text, got {kind(value)}")
    return value


def boolean(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {brief(value)}")
    return value


def choice(*choices: str) -> Check:
    def check(key: str, value: Any) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {brief(value)}")
    return check


def whole_number(low: int, high: int, fix: str = "") -> Check:
    def check(key: str, value: Any) -> int:
        # ASCII digits only: int() cannot read every character isdigit() accepts ('²').
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(key, f"must be a whole number from {low} to {high}, "
                                   f"got {brief(value)}", fix)
        return value
    return check


def port(key: str, value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,5}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(key, f"must be a port number from 0 to 65535, got {brief(value)}")
    return value


#: A week. A longer limit is no limit in practice, which null says; the bound also keeps
#: a huge number from overflowing the float a timeout is kept in.
MAX_SECONDS = 7 * 24 * 3600


def seconds(*, allow_none: bool) -> Check:
    """A positive number of seconds up to a week; ``null`` means no limit where allowed."""
    def check(key: str, value: Any) -> float | None:
        if value is None and allow_none:
            return None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        # The chained comparison also refuses NaN and infinity.
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 < value <= MAX_SECONDS:
            limit = ", or null (no limit)" if allow_none else \
                "; null (no limit) is not allowed for a client's side"
            raise ConfigError(key, f"must be a positive number of seconds up to "
                                   f"{MAX_SECONDS} (a week){limit}, got {brief(value)}")
        return float(value)
    return check


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3}
#: 1024GiB (1 TiB): far above any request body, far below a size that would overflow.
MAX_SIZE = 1024**4


def size(key: str, value: Any) -> int:
    """Bytes, as a number or with a unit: ``104857600``, ``'100MB'``, ``'256MiB'``."""
    found: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        found = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            unit = (match.group(2) or "").lower().rstrip("b")
            found = float(match.group(1)) * _SIZE_UNITS[unit]  # too many digits give inf
    if found is None or not 1 <= found <= MAX_SIZE:
        raise ConfigError(key, f"must be a size from 1 byte to 1024GiB, got {brief(value)}",
                          "e.g. 104857600, '100MB' or '256MiB'")
    return int(found)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise ConfigError(key, f"must be an HTTP header name, got {brief(value)}",
                          "use letters, digits and dashes, e.g. x-memory-user-id")
    return value.lower()


def header_names(key: str, value: Any) -> tuple[str, ...]:
    items = list_of(key, value, "header names", "[x-claude-code-session-id, session-id]")
    return tuple(header_name(f"{key}[{i}]", item) for i, item in enumerate(items))


def user_id(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be text, got {kind(value)}")
    problem = check_id(value)
    if problem:
        raise ConfigError(key, f"{value!r} is not a valid user id: {problem}")
    return value


def url(key: str, value: Any) -> str:
    """An http(s) base URL without credentials, query string or fragment."""
    example = f"e.g. {DEFAULT_LITELLM_URL}"
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a URL, got {kind(value)}", example)
    # The value is echoed only when it cannot hold a password.
    not_url = ConfigError(key, "must be an http(s) URL" if "@" in value
                          else f"{value!r} is not an http(s) URL", example)
    try:
        parts = urlsplit(value)
        port_number = parts.port  # ValueError for a port that is not a number up to 65535
    except ValueError:
        raise not_url from None
    if "@" in parts.netloc:
        raise ConfigError(
            key, "must not hold a user name or password: credentials do not belong in the URL",
            "write it as http://host:port; memproxy adds no credentials of its own, each client "
            "sends its own API key",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or port_number == 0:
        raise not_url
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not have a query string or fragment", example)
    return value.rstrip("/")


def networks(key: str, value: Any) -> tuple[IPv4Network | IPv6Network, ...]:
    found = []
    for index, item in enumerate(list_of(key, value, "networks", "[10.0.0.0/8, ::1]")):
        try:
            found.append(ip_network(str(item), strict=False))
        except ValueError:
            raise ConfigError(f"{key}[{index}]", f"{item!r} is not an IP network",
                              "write it as an address or CIDR, e.g. 192.168.1.0/24") from None
    return tuple(found)


def host_names(key: str, value: Any) -> tuple[str, ...]:
    items = list_of(key, value, "host names", "[memproxy.internal]")
    if not all(isinstance(h, str) and h for h in items):
        raise ConfigError(key, "must be a list of host names", "e.g. [memproxy.internal]")
    return tuple(h.lower() for h in items)


def secret(min_length: int, how: str) -> Check:
    """A secret of at least ``min_length`` characters, kept as :class:`Secret`."""
    def check(key: str, value: Any) -> Secret | None:
        if value is None:
            return None
        if not isinstance(value, str) or len(value) < min_length:
            raise ConfigError(key, f"must be at least {min_length} characters", how)
        return Secret(value)
    return check


def optional_secret(key: str, value: Any) -> Secret | None:
    """Any non-empty text kept as :class:`Secret`, or nothing."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(key, f"must be text, got {kind(value)}")
    return Secret(value) if value else None


def regex(key: str, value: Any) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a regular expression, got {kind(value)}")
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(
            key, f"{value!r} is not a valid regular expression: {exc}",
            "escape special characters such as ( ) [ ] . + with a backslash, "
            "or quote the pattern in single quotes",
        ) from None
