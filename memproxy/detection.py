"""The ordered detector chain, and the only module that knows pluggy.

Pluggy has no numeric priority, so the order is memproxy's own: at start-up
every plugin's :class:`DetectorSpec` is collected, config overrides are
applied, and the enabled detectors are sorted by priority (highest first,
then by name). The result, a :class:`DetectorChain`, is immutable; a reload
builds a new one.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
import structlog

from memproxy import hookspecs
from memproxy.config import ConfigError, Settings
from memproxy.hookspecs import (
    ClientRequest,
    DetectFunction,
    Detection,
    DetectorContext,
    DetectorSpec,
    InvalidUserId,
    RequestDetectFunction,
)
from memproxy.identifiers import check_id

ENTRY_POINT_GROUP = "memproxy.detectors"
BUILTIN_DETECTORS = (
    "memproxy.detectors.explicit_header",
    "memproxy.detectors.header_patterns",
    "memproxy.detectors.api_key_hash",
    "memproxy.detectors.default",
)

log = structlog.get_logger("memproxy.detection")


class PluginError(Exception):
    """A detector plugin could not be loaded or broke the detector contract."""


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One enabled detector in its place in the chain."""

    name: str
    priority: int
    plugin: str
    description: str
    detect: RequestDetectFunction
    ids_from_config: bool = False
    fallback: bool = False
    #: The options in force, for operators (secrets shown as ``<set>``).
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whose memory a request belongs to, and who decided."""

    user_id: str
    detector: str
    reason: str
    #: The id comes from the config (a bounded set of ids).
    ids_from_config: bool = False
    #: No detector recognised the client; a last resort decided.
    fallback: bool = False


class RejectedRequest(Exception):
    """The client sent an id that cannot be used; answer 400 with this message."""

    def __init__(self, detector: str, message: str) -> None:
        super().__init__(message)
        self.detector = detector


@dataclass(frozen=True, slots=True)
class DetectorChain:
    """The detectors in the order they run; ask it with :meth:`detect_user`."""

    links: tuple[ChainLink, ...]
    fallback_user_id: str

    def detect_user(self, request: ClientRequest) -> Decision:
        """Ask each detector in turn; the first valid answer wins.

        A detector that raises is skipped (and logged) so that one broken
        plugin cannot take the proxy down; :class:`InvalidUserId` becomes a
        :class:`RejectedRequest`. If no detector answers, the configured
        default user id is used.
        """
        for link in self.links:
            try:
                answer = link.detect(request)
            except InvalidUserId as exc:
                raise RejectedRequest(link.name, str(exc)) from None
            except Exception as exc:  # a broken plugin must not break the proxy
                log.error("detector_failed", detector=link.name, error=repr(exc))
                continue
            if answer is None:
                continue
            if isinstance(answer, Detection):
                user_id, reason = answer.user_id, answer.reason
            else:
                user_id, reason = answer, ""
            if not isinstance(user_id, str) or check_id(user_id) is not None:
                log.warning("detector_answer_invalid", detector=link.name,
                            problem=check_id(user_id) if isinstance(user_id, str)
                            else f"returned {type(user_id).__name__}, not a string")
                continue
            return Decision(user_id, link.name, reason or link.description,
                            link.ids_from_config, link.fallback)
        return Decision(self.fallback_user_id, "none", "no detector answered",
                        ids_from_config=True, fallback=True)

    def describe(self) -> list[dict[str, Any]]:
        """The chain for operators: name, priority, plugin, description, in order."""
        return [
            {"name": link.name, "priority": link.priority, "plugin": link.plugin,
             "description": link.description, "options": dict(link.options)}
            for link in self.links
        ]


class DetectorRegistry:
    """Owns the pluggy plugin manager; the rest of memproxy calls its typed methods."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("memproxy")
        self._pm.add_hookspecs(hookspecs)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object or module (used for built-ins and by tests)."""
        self._pm.register(plugin, name=name)

    def load_builtins(self) -> None:
        for module_name in BUILTIN_DETECTORS:
            self.register(_import(module_name, module_name), name=module_name)

    def load_entry_points(self) -> None:
        """Register every plugin in the ``memproxy.detectors`` entry-point group."""
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            label = f"{entry_point.name} ({entry_point.value})"
            if entry_point.dist is not None:
                label = f"{entry_point.dist.name} {label}"
            if self._pm.has_plugin(entry_point.name):
                continue  # the same distribution found twice on sys.path
            try:
                plugin = entry_point.load()
            except Exception as exc:
                raise PluginError(
                    f"detector plugin {label} failed to import: {exc!r}. "
                    "Fix or uninstall it (pip uninstall <distribution>)."
                ) from None
            self.register(plugin, name=entry_point.name)

    def specs(self) -> list[tuple[str, DetectorSpec]]:
        """Every declared detector with the name of the plugin declaring it."""
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {self._plugin_name(exc.plugin)} implements a hook memproxy does not "
                f"have: {exc}. The only hook is memproxy_detectors."
            ) from None
        found: list[tuple[str, DetectorSpec]] = []
        for impl in self._pm.hook.memproxy_detectors.get_hookimpls():
            plugin = impl.plugin_name
            try:
                result = impl.function()
            except Exception as exc:
                raise PluginError(f"plugin {plugin}: memproxy_detectors() failed: {exc!r}") \
                    from None
            if not isinstance(result, Iterable):
                raise PluginError(f"plugin {plugin}: memproxy_detectors() must return a list "
                                  f"of DetectorSpec, got {type(result).__name__}")
            for spec in result:
                _check_spec(plugin, spec)
                found.append((plugin, spec))
        return found

    def _plugin_name(self, plugin: object) -> str:
        return self._pm.get_name(plugin) or repr(plugin)

    def build_chain(self, settings: Settings) -> DetectorChain:
        """Apply the config to the declared detectors and order them by priority."""
        declared: dict[str, tuple[str, DetectorSpec]] = {}
        for plugin, spec in self.specs():
            if spec.name in declared:
                raise PluginError(
                    f"detector name {spec.name!r} is declared by both plugin "
                    f"{declared[spec.name][0]} and plugin {plugin}; uninstall one of them"
                )
            declared[spec.name] = (plugin, spec)
        for name in settings.detectors:
            if name not in declared:
                close = difflib.get_close_matches(name, sorted(declared), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(
                    f"memproxy.detectors.{name}", "no detector of that name is installed",
                    f"{hint}installed detectors: {', '.join(sorted(declared))}",
                )
        links = []
        for name, (plugin, spec) in declared.items():
            override = settings.detector(name)
            enabled = spec.enabled_by_default if override.enabled is None else override.enabled
            if not enabled:
                continue
            options, shown = _checked_options(name, spec, override.options)
            context = DetectorContext(options=options, settings=settings)
            try:
                detect = spec.build(context)
            except ConfigError:
                raise
            except Exception as exc:
                raise PluginError(f"detector {name} (plugin {plugin}) failed to start: "
                                  f"{exc!r}") from None
            if not callable(detect):
                raise PluginError(f"detector {name} (plugin {plugin}): build() must return "
                                  f"a function, got {type(detect).__name__}")
            priority = spec.priority if override.priority is None else override.priority
            links.append(ChainLink(name, priority, plugin, spec.description,
                                   _reading(spec, detect), spec.ids_from_config,
                                   spec.fallback, shown))
        links.sort(key=lambda link: (-link.priority, link.name))
        return DetectorChain(tuple(links), settings.mappings.default_user_id)


def _checked_options(
    name: str, spec: DetectorSpec, given: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, object]]:
    """The options a detector is built with, and how operators see them.

    Declared options are type-checked and their defaults filled in; names the
    detector did not declare are a config error naming the ones it has.
    """
    key = f"memproxy.detectors.{name}.options"
    if spec.options is None:
        return dict(given), {k: "<set>" for k in given}
    declared = {option if isinstance(option, str) else option.name: option
                for option in spec.options}
    for option_name in given:
        if option_name not in declared:
            close = difflib.get_close_matches(option_name, sorted(declared), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"{key}.{option_name}", "unknown option",
                              f"{hint}options of {name}: {known}")
    options: dict[str, Any] = {}
    shown: dict[str, object] = {}
    for option_name, option in declared.items():
        if isinstance(option, str):
            if option_name in given:
                options[option_name] = shown[option_name] = given[option_name]
            continue
        value = given.get(option_name, option.default)
        value = _coerce(value, option.type)
        if value is not None or option.default is not None:
            problem = _type_problem(value, option.type)
            if problem is None and option.check is not None:
                problem = option.check(value)
            if problem is not None:
                raise ConfigError(f"{key}.{option_name}", problem, option.help)
        options[option_name] = value
        shown[option_name] = ("<set>" if value else "<unset>") if option.secret else value
    return options, shown


def _coerce(value: Any, kind: type | tuple[type, ...]) -> Any:
    """Values from ``os.environ/NAME`` are text: read them as the declared type."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, str) or str in kinds:
        return value
    if bool in kinds and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if int in kinds and value.lstrip("-").isascii() and value.lstrip("-").isdigit():
        return int(value)
    return value


def _type_problem(value: Any, kind: type | tuple[type, ...]) -> str | None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return None
    names = " or ".join({bool: "true/false", int: "a whole number", float: "a number",
                         str: "text"}.get(k, k.__name__) for k in kinds)
    return f"must be {names}, got {value!r}"


def _reading(
    spec: DetectorSpec, detect: DetectFunction | RequestDetectFunction
) -> RequestDetectFunction:
    """Every link is called with the request; most detectors only want its headers."""
    if spec.reads == "request":
        return detect  # type: ignore[return-value]
    on_headers: Callable[[Any], Any] = detect

    def detect_on_headers(request: ClientRequest) -> str | Detection | None:
        answer: str | Detection | None = on_headers(request.headers)
        return answer

    return detect_on_headers


def _check_spec(plugin: str, spec: object) -> None:
    if not isinstance(spec, DetectorSpec):
        raise PluginError(f"plugin {plugin}: memproxy_detectors() must return DetectorSpec "
                          f"objects, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise PluginError(f"plugin {plugin}: detector name {spec.name!r} must be a Python-style "
                          "identifier (letters, digits, underscores)")
    if isinstance(spec.priority, bool) or not isinstance(spec.priority, int):
        raise PluginError(f"plugin {plugin}: detector {spec.name} has priority "
                          f"{spec.priority!r}; it must be a whole number")
    if not callable(spec.build):
        raise PluginError(f"plugin {plugin}: detector {spec.name} has no callable build")
    if spec.reads not in ("headers", "request"):
        raise PluginError(f"plugin {plugin}: detector {spec.name} has reads={spec.reads!r}; "
                          "it must be 'headers' or 'request'")


def _import(module_name: str, label: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(f"detector plugin {label} failed to import: {exc!r}") from None


def build_detector_chain(
    settings: Settings,
    *,
    extra_plugins: Sequence[object] = (),
    entry_points: bool = True,
) -> DetectorChain:
    """The chain for ``settings``: built-ins, installed plugins, then ``extra_plugins``."""
    registry = DetectorRegistry()
    registry.load_builtins()
    if entry_points:
        registry.load_entry_points()
    for plugin in extra_plugins:
        registry.register(plugin)
    return registry.build_chain(settings)
