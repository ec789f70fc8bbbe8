"""Turn config.yaml into frozen, validated settings.

One file serves LiteLLM and memproxy: LiteLLM ignores the top-level keys it
does not know (``user_id_mappings``, ``memproxy``), and memproxy reads
LiteLLM's own sections only to warn about settings that would lose or leak
the headers it injects (:mod:`memproxy.litellm_lint`).

The settings classes below are the schema, written once: each field's name is
its key, and :func:`setting` gives its default, the check its value must pass
(:mod:`memproxy.config_checks`) and the help text that ``check-config --keys``
and docs/configuration.md show. :func:`parse_settings` walks the classes, so
an unknown key, a wrong value and a missing one are all found the same way,
and every mistake raises :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from re import Pattern
from typing import Any, TypeVar

import yaml

from memproxy import config_checks as checks
from memproxy.config_checks import DEFAULT_LITELLM_URL, Check, ConfigError, Secret

__all__ = ["DEFAULT_LITELLM_URL", "DEFAULT_PORT", "ConfigError", "Secret", "Settings",
           "config_warnings", "load_settings", "parse_rule", "parse_settings",
           "resolve_config_path", "section_warnings"]

DEFAULT_CONFIG_PATH = Path("config.yaml")
DEFAULT_PORT = 8764
LOOPBACK_NETWORKS = tuple(ip_network(n) for n in ("127.0.0.0/8", "::1/128"))
LITELLM_SECTIONS = ("model_list", "general_settings", "litellm_settings", "router_settings")
TRUST_MODES = ("anyone", "networks", "secret", "never")
UNIDENTIFIED_POLICIES = ("share", "no_memory", "refuse")
EVENT_LOOPS = ("asyncio", "uvloop")
MIN_SECRET_LENGTH = 16


def setting(default: Any = dataclasses.MISSING, *, help: str = "", check: Check | None = None,
            env: str | None = None, entries: type[Any] | None = None,
            shown: str | None = None) -> Any:
    """A config key: its default, the check its value must pass, and one line of help.

    ``env`` names an environment variable that gives the value when the key is
    absent (present, even as ``null``, the key wins). A default that is a
    settings class makes the key a section, checked key by key; ``dict`` makes
    it an empty mapping. ``entries`` names the settings class of a list's
    entries, and ``shown`` how the default reads, for the reference.
    """
    metadata = {"help": help, "check": check, "env": env, "entries": entries, "shown": shown}
    if default is dict or (dataclasses.is_dataclass(default) and isinstance(default, type)):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _detectors(key: str, value: Any) -> Mapping[str, DetectorSettings]:
    entries = checks.mapping_of(key, value)
    result: dict[str, DetectorSettings] = {}
    for name, entry in entries.items():
        if entry is None:
            entry = {}
        elif entry is False:
            entry = {"enabled": False}
        result[str(name)] = _load(DetectorSettings, entry, f"{key}.{name}")
    return result


def _patterns(key: str, value: Any) -> tuple[HeaderPattern, ...]:
    entries = checks.list_of(key, value, "patterns", "- {header: user-agent, pattern: "
                                                     "'^Tool/', user_id: tool}")
    return tuple(_load(HeaderPattern, entry, f"{key}[{i}]") for i, entry in enumerate(entries))


def _options(key: str, value: Any) -> Mapping[str, Any]:
    # Checked against the detector's own declarations when the chain is built.
    return {str(k): v for k, v in checks.mapping_of(key, value).items()}


# -- the schema ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderPattern:
    """One ``user_id_mappings.header_patterns`` entry, compiled."""

    header: str = setting("user-agent", check=checks.header_name,
                          help="the header to search (case-insensitive name)")
    pattern: Pattern[str] = setting(check=checks.regex,
                                    help="a regular expression, searched case-insensitively")
    user_id: str = setting(check=checks.user_id, help="the memory user id when it matches")


@dataclass(frozen=True, slots=True, kw_only=True)
class UserIdMappings:
    """``user_id_mappings``: the original format, unchanged."""

    custom_header: str = setting(
        "x-memory-user-id", check=checks.header_name,
        help="the header a client names its own memory space in (never forwarded)")
    header_patterns: tuple[HeaderPattern, ...] = setting(
        (), check=_patterns, entries=HeaderPattern,
        help="rules on User-Agent or any header; the first match wins")
    default_user_id: str = setting("default", check=checks.user_id,
                                   help="the memory space of clients nothing recognised")


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorSettings:
    """``memproxy.detectors.<name>``: overrides for one detector."""

    priority: int | None = setting(None, check=checks.whole_number(
        -1_000_000, 1_000_000, "higher numbers run first, e.g. 100"),
        help="its place in the chain: higher runs first")
    enabled: bool | None = setting(None, check=checks.boolean,
                                   help="run it (true) or leave it out (false)")
    options: Mapping[str, Any] = setting(
        dict, check=_options, help="the detector's own options (check-config lists them)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """``memproxy.timeouts``: seconds; only LiteLLM's side may go without a limit (null)."""

    connect: float | None = setting(10.0, check=checks.seconds(allow_none=True),
                                    help="to open a connection to LiteLLM")
    between_chunks: float | None = setting(
        600.0, check=checks.seconds(allow_none=True),
        help="the longest silence from LiteLLM, before and during its answer")
    total: float | None = setting(None, check=checks.seconds(allow_none=True),
                                  help="a whole answer from LiteLLM (none: agent streams are long)")
    request_head: float = setting(10.0, check=checks.seconds(allow_none=False),
                                  help="from a request's first byte to the end of its headers")
    keepalive: float = setting(60.0, check=checks.seconds(allow_none=False),
                               help="how long an idle client connection stays open")
    request_body: float = setting(60.0, check=checks.seconds(allow_none=False),
                                  help="the longest silence while a client sends its body")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderSettings:
    """``memproxy.headers``: what memproxy writes into forwarded requests."""

    user_id: str = setting("x-sm-user-id", check=checks.header_name,
                           help="the memory-id header memproxy owns (a client's is replaced)")
    conversation_id: str = setting("x-sm-conversation-id", check=checks.header_name,
                                   help="the conversation-id header")
    conversation_id_from: tuple[str, ...] = setting(
        ("x-claude-code-session-id", "session-id"), check=checks.header_names,
        help="client session headers copied into the conversation id when it is absent")
    litellm_end_user_id: bool = setting(
        False, check=checks.boolean,
        help="also send x-litellm-end-user-id (LiteLLM's spend per memory space)")
    supermemory_api_key: Secret | None = setting(
        None, check=checks.optional_secret, env="SUPERMEMORY_API_KEY",
        help="sent as x-supermemory-api-key with every request; null: none "
             "($SUPERMEMORY_API_KEY when absent)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExplicitIdTrust:
    """``memproxy.explicit_id``: who may choose a memory space with the explicit header."""

    trust: str = setting("networks", check=checks.choice(*TRUST_MODES),
                         help="networks, anyone, secret or never (see SECURITY.md)")
    networks: tuple[IPv4Network | IPv6Network, ...] = setting(
        LOOPBACK_NETWORKS, check=checks.networks,
        help="with trust: networks, the client addresses allowed")
    secret_header: str = setting("x-memproxy-secret", check=checks.header_name,
                                 help="with trust: secret, the header carrying the secret")
    secret: Secret | None = setting(
        None, env="MEMPROXY_EXPLICIT_ID_SECRET",
        check=checks.secret(MIN_SECRET_LENGTH, "set MEMPROXY_EXPLICIT_ID_SECRET, or "
                                               "secret: os.environ/NAME"),
        help="with trust: secret, the shared secret ($MEMPROXY_EXPLICIT_ID_SECRET)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminAccess:
    """``memproxy.admin``: who may use memproxy's own endpoints (status, inbox, reload, ...)."""

    networks: tuple[IPv4Network | IPv6Network, ...] = setting(
        LOOPBACK_NETWORKS, check=checks.networks,
        help="client addresses that may use them (loopback by default)")
    token: Secret | None = setting(
        None, env="MEMPROXY_ADMIN_TOKEN",
        check=checks.secret(MIN_SECRET_LENGTH, "e.g. export MEMPROXY_ADMIN_TOKEN=$(openssl "
                                               "rand -hex 32)"),
        help="accepted from anywhere as Authorization: Bearer ($MEMPROXY_ADMIN_TOKEN)")
    hosts: tuple[str, ...] = setting(
        (), check=checks.host_names,
        help="host names they answer to besides localhost, IP addresses and memproxy.host")
    metrics: str = setting("admin", check=checks.choice("admin", "anyone"),
                           help="/metrics under the same rule (admin), or open to anyone")


#: Where memory is kept (``memproxy.memory.backend``).
MEMORY_BACKENDS = ("off", "local", "postgres", "supermemory")
#: The backends memproxy keeps memory in itself.
OWN_MEMORY_BACKENDS = ("local", "postgres")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecallSettings:
    """``memproxy.memory.recall``: what goes into a conversation, and when."""

    max_tokens: int = setting(1500, check=checks.whole_number(50, 100_000),
                              help="the memory block's size at most (1 token = 4 bytes)")
    when: str = setting("first_turn", check=checks.choice("first_turn", "every_turn"),
                        help="first_turn: once per conversation, the same block after (prompt "
                             "caches keep hitting); every_turn: afresh on each user message")
    timeout_ms: int = setting(50, check=checks.whole_number(1, 60_000),
                              help="a recall slower than this is skipped; the request goes on")


@dataclass(frozen=True, slots=True, kw_only=True)
class MemorySettings:
    """``memproxy.memory``: where conversations are remembered, and how they come back."""

    backend: str = setting("off", check=checks.choice(*MEMORY_BACKENDS),
                           help="local: memproxy keeps memory in an SQLite file; postgres: in a "
                                "PostgreSQL database; supermemory: headers only, the router "
                                "keeps memory; off: none")
    path: str = setting("memproxy-memory.db", check=checks.text,
                        help="with backend: local, the SQLite file (relative: beside the config)")
    dsn: Secret | None = setting(
        None, check=checks.optional_secret, env="MEMPROXY_MEMORY_DSN",
        help="with backend: postgres, a libpq connection string or postgresql:// URL "
             "($MEMPROXY_MEMORY_DSN when absent; never shown)")
    migrate: bool = setting(True, check=checks.boolean,
                            help="with backend: postgres, create and upgrade the tables at "
                                 "start-up; false: run python -m memproxy memory migrate-db")
    pool_size: int = setting(8, check=checks.whole_number(1, 1000),
                             help="with backend: postgres, connections per process at most")
    for_unidentified: bool = setting(
        False, check=checks.boolean,
        help="give memory to requests only the default detector matched (they share one space)")
    queue: int = setting(1000, check=checks.whole_number(1, 1_000_000),
                         help="memories waiting to be written at most; more are dropped, "
                              "counted and logged")
    recall: RecallSettings = setting(RecallSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """``memproxy.log``."""

    format: str = setting("auto", check=checks.choice("auto", "json", "console"),
                          help="auto: JSON unless standard output is a terminal")
    level: str = setting("info", check=checks.choice("debug", "info", "warning", "error"),
                         help="the lowest level written")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoProviderSettings:
    """``memproxy.demo_provider``: the offline provider ``start`` runs for the demo models."""

    host: str = setting("127.0.0.1", check=checks.text, help="the address it listens on")
    port: int = setting(8766, check=checks.port,
                        help="its port; the demo models' api_base in model_list points here")


def _demo_provider(key: str, value: Any) -> DemoProviderSettings | None:
    return None if value is None else _load(DemoProviderSettings, value, key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything memproxy needs, validated: the ``memproxy`` section and the mappings."""

    host: str = setting("127.0.0.1", check=checks.text, help="the address memproxy listens on")
    port: int = setting(DEFAULT_PORT, check=checks.port, help="the port memproxy listens on")
    litellm_url: str = setting(DEFAULT_LITELLM_URL, check=checks.url,
                               help="LiteLLM's base URL ($LITELLM_BASE_URL and --litellm-url "
                                    "win)")
    max_body_size: int = setting(256 * 1024 * 1024, check=checks.size, shown="256MiB",
                                 help="larger request bodies get 413")
    max_header_size: int = setting(256 * 1024, check=checks.size, shown="256KiB",
                                   help="request line and headers together; more gets 431")
    timeouts: Timeouts = setting(Timeouts)
    headers: HeaderSettings = setting(HeaderSettings)
    explicit_id: ExplicitIdTrust = setting(ExplicitIdTrust)
    admin: AdminAccess = setting(AdminAccess)
    unidentified: str = setting(
        "share", check=checks.choice(*UNIDENTIFIED_POLICIES),
        help="clients nothing recognised: share (the default space), no_memory or refuse")
    detectors: Mapping[str, DetectorSettings] = setting(
        dict, check=_detectors, entries=DetectorSettings,
        help="per detector, by name: its priority, whether it runs, its options")
    memory: MemorySettings = setting(MemorySettings)
    log: LogSettings = setting(LogSettings)
    event_loop: str = setting("asyncio", check=checks.choice(*EVENT_LOOPS),
                              help="asyncio, or uvloop (pip install 'memproxy-llm[uvloop]')")
    demo_provider: DemoProviderSettings | None = setting(
        None, check=_demo_provider, entries=DemoProviderSettings,
        help="start runs the offline demo provider with these settings (null: it does not)")

    #: ``user_id_mappings``: how clients are recognised.
    mappings: UserIdMappings = field(default_factory=UserIdMappings)
    #: The file the settings came from, if any.
    path: Path | None = None
    #: LiteLLM's own sections of the same file, untouched (for the lint).
    litellm_sections: Mapping[str, Any] = field(default_factory=dict)

    def detector(self, name: str) -> DetectorSettings:
        return self.detectors.get(name, DetectorSettings())

    @property
    def memory_file(self) -> Path:
        """``memory.path``, a relative one taken from the config file's folder."""
        path = Path(self.memory.path).expanduser()
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        return path.absolute()


#: Settings fields that are not keys of the ``memproxy`` section.
_NOT_KEYS = frozenset({"mappings", "path", "litellm_sections"})


# -- reading the schema -----------------------------------------------------------------

T = TypeVar("T")


def _keys(cls: type[Any]) -> Iterator[dataclasses.Field[Any]]:
    skip = _NOT_KEYS if cls is Settings else frozenset()
    return (f for f in dataclasses.fields(cls) if f.name not in skip)


def _is_section(item: dataclasses.Field[Any]) -> bool:
    factory: object = item.default_factory
    return isinstance(factory, type) and dataclasses.is_dataclass(factory)


def _load(cls: type[T], raw: Any, where: str) -> T:
    """An instance of the settings class ``cls`` from its section ``raw``, checked key by key."""
    section = checks.mapping_of(where, raw)
    known = {item.name: item for item in _keys(cls)}
    for key in section:
        if key not in known:
            raise checks.unknown_key(where, key, known)
    values: dict[str, Any] = {}
    for name, item in known.items():
        key = f"{where}.{name}"
        if _is_section(item):
            values[name] = _load(item.default_factory, section.get(name), key)  # type: ignore[arg-type]
            continue
        if name in section:
            raw_value = section[name]
        elif item.metadata.get("env"):
            raw_value = os.environ.get(item.metadata["env"]) or None
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is missing", f"each entry needs {', '.join(known)}")
        else:
            continue
        check = item.metadata.get("check")
        values[name] = check(key, raw_value) if check is not None else raw_value
    return cls(**values)


def reference() -> list[tuple[str, str, str]]:
    """Every memproxy config key with its default and help: ``(key, default, help)``.

    ``check-config --keys`` prints it, and docs/configuration.md holds it (a test
    keeps the two in step).
    """
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type[Any], where: str) -> None:
        for item in _keys(cls):
            key = f"{where}.{item.name}"
            if _is_section(item):
                walk(item.default_factory, key)  # type: ignore[arg-type]
                continue
            rows.append((key, _shown_default(item), item.metadata["help"]))
            if item.metadata["entries"] is not None:
                walk(item.metadata["entries"],
                     f"{key}.<name>" if item.default_factory is dict
                     else key if item.default is None else f"{key}[]")

    walk(UserIdMappings, "user_id_mappings")
    walk(Settings, "memproxy")
    return rows


def _shown_default(item: dataclasses.Field[Any]) -> str:
    if item.metadata.get("shown"):
        return str(item.metadata["shown"])
    if item.metadata.get("env"):
        return f"${item.metadata['env']}"
    if item.default is dataclasses.MISSING:
        return "{}" if item.default_factory is not dataclasses.MISSING else "(required)"
    value = item.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# -- loading --------------------------------------------------------------------------


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
        overrides["port"] = checks.port("--port", port)
    url = litellm_url or os.environ.get("LITELLM_BASE_URL")
    if url:
        key = "--litellm-url" if litellm_url else "LITELLM_BASE_URL"
        overrides["litellm_url"] = checks.url(key, url)
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
    mappings = _load(UserIdMappings, checks.resolve_env(raw.get("user_id_mappings")),
                     "user_id_mappings")
    settings = _load(Settings, checks.resolve_env(raw.get("memproxy")), "memproxy")
    settings = replace(settings, mappings=mappings, path=path,
                       litellm_sections={k: raw[k] for k in LITELLM_SECTIONS if k in raw})
    _check_together(settings)
    return settings


#: memproxy's own top-level sections (LiteLLM ignores them).
MEMPROXY_SECTIONS = ("user_id_mappings", "memproxy")
#: How alike a top-level key must be to one of MEMPROXY_SECTIONS (difflib's ratio, compared
#: in lower case) to be taken for a misspelling of it. ``user_id_mapping``, ``memproxi`` and
#: ``user_mappings`` score 0.88 or more; LiteLLM's own sections (model_list,
#: general_settings, router_settings, environment_variables, ...) 0.52 at most, and
#: ``memory`` or ``proxy`` under 0.8.
SECTION_TYPO_CUTOFF = 0.8


def section_warnings(raw: Mapping[Any, Any]) -> list[str]:
    """Warnings about top-level keys that look meant for memproxy but that it never reads.

    An unknown top-level key cannot be an error: the file is LiteLLM's too, and LiteLLM
    has many sections of its own. But a misspelt ``user_id_mappings`` or ``memproxy`` (or
    a ``header_patterns`` that lost its indentation) leaves its settings unread and every
    client in the default memory space, with nothing to say so. Only near misses of
    memproxy's two section names, and the keys of ``user_id_mappings``, are suspicious.
    """
    warnings: list[str] = []
    mapping_keys = [item.name for item in _keys(UserIdMappings)]
    for key in raw:
        name = str(key)
        if name in MEMPROXY_SECTIONS:
            continue
        if name in mapping_keys:
            warnings.append(f"top-level key '{name}' is not read: it belongs inside "
                            f"user_id_mappings (indent it under 'user_id_mappings:')")
            continue
        close = difflib.get_close_matches(name.lower(), MEMPROXY_SECTIONS, n=1,
                                          cutoff=SECTION_TYPO_CUTOFF)
        if close:
            warnings.append(f"top-level key '{name}' is not read by memproxy nor by LiteLLM, "
                            f"so its settings are ignored: did you mean '{close[0]}'?")
    return warnings


def config_warnings(settings: Settings) -> list[str]:
    """Mistakes that load without an error but leave every client in one memory space.

    Warns when no config file was found (built-in defaults have no header patterns), about
    misspelt top-level sections (:func:`section_warnings`, read again from the file), and
    when there is no header pattern at all.
    """
    mappings = settings.mappings
    shared = (f"unless another detector places them (the {mappings.custom_header} header, "
              f"api_key_hash, a plugin), every client shares the memory space "
              f"'{mappings.default_user_id}'")
    if settings.path is None:
        return [f"no config file found: no --config, $LITELLM_CONFIG is not set, and "
                f"{Path.cwd()} has no {DEFAULT_CONFIG_PATH}. memproxy runs on built-in "
                f"defaults, with no header patterns, so {shared}.\n"
                f"Fix: pass --config FILE, or run from the folder that has config.yaml."]
    warnings = section_warnings(_read_yaml(settings.path))
    if not mappings.header_patterns:
        warnings.append(f"no user_id_mappings.header_patterns in {settings.path}: no client is "
                        f"recognised by its User-Agent or other headers, so {shared}.")
    return warnings


def _check_together(settings: Settings) -> None:
    """The rules that span several keys."""
    trust = settings.explicit_id
    if trust.trust == "secret" and trust.secret is None:
        raise ConfigError(
            "memproxy.explicit_id.secret",
            f"trust: secret needs a shared secret of at least {MIN_SECRET_LENGTH} characters",
            "set MEMPROXY_EXPLICIT_ID_SECRET, or secret: os.environ/NAME",
        )
    memory = settings.memory
    if memory.backend == "postgres":
        if memory.dsn is None:
            raise ConfigError("memproxy.memory.dsn", "backend: postgres needs a database",
                              "dsn: os.environ/MEMPROXY_MEMORY_DSN, with that variable set to "
                              "e.g. postgresql://memproxy@db.internal/memproxy")
        if importlib.util.find_spec("psycopg") is None or \
                importlib.util.find_spec("psycopg_pool") is None:
            raise ConfigError("memproxy.memory.backend", "postgres needs psycopg, which is not "
                              "installed", "pip install 'memproxy-llm[postgres]'")
    if settings.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("memproxy.event_loop", "uvloop is not installed; install it with "
                          "pip install 'memproxy-llm[uvloop]', or set event_loop: asyncio")


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
    return _load(HeaderPattern, checks.resolve_env(entry), "--rule[0]")
