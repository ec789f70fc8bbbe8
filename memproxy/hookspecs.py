"""The detector contract: the one hook a detector plugin implements, and its types.

A detector looks at the headers of one request and either names the memory user
the request belongs to or passes. memproxy asks its detectors in order of
priority, highest first; the first answer wins.

A plugin provides detectors by implementing :func:`memproxy_detectors`::

    from memproxy import DetectorContext, DetectorSpec, hookimpl

    def build(ctx: DetectorContext):
        header = ctx.options.get("header", "x-team")
        def detect(headers):
            return headers.get(header)
        return detect

    @hookimpl
    def memproxy_detectors():
        return [DetectorSpec(name="team", priority=60, build=build,
                             description="the x-team header")]

and declaring the module in the ``memproxy.detectors`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl

import pluggy
from multidict import CIMultiDictProxy, MultiDict, MultiDictProxy

if TYPE_CHECKING:
    from memproxy.config import Settings

hookspec = pluggy.HookspecMarker("memproxy")


@dataclass(frozen=True, slots=True)
class Detection:
    """A detector's answer when it wants to say why it decided."""

    user_id: str
    reason: str = ""


_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """The request as LiteLLM will receive it, for detectors that need more than headers.

    ``headers`` are the client's headers after hop-by-hop headers (and any
    header named in ``Connection``) were removed: what memproxy forwards, so a
    detector never decides on a header LiteLLM will not see.
    """

    headers: CIMultiDictProxy[str]
    #: The path, percent-decoded, without the query string.
    path: str = "/"
    #: The raw query string (parsed on demand by :attr:`query`).
    query_string: str = ""
    #: The client's address, when known.
    remote: str | None = None

    @property
    def query(self) -> MultiDictProxy[str]:
        """The query parameters; parsed on each use, as few detectors need them."""
        if not self.query_string:
            return _NO_QUERY
        return MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))


#: What a built detector is: request headers in, an answer out. Called once
#: per request, so do the expensive work (compiling patterns, reading
#: options) in ``build``. A detector declared with ``reads="request"`` is
#: called with a :class:`ClientRequest` instead.
DetectFunction = Callable[[CIMultiDictProxy[str]], "str | Detection | None"]
RequestDetectFunction = Callable[[ClientRequest], "str | Detection | None"]


class InvalidUserId(Exception):
    """Raised by a detector when the client sent an id that cannot be used.

    The request is refused with ``400`` and this exception's message, in the
    client's own error format. Raise it only for ids the client chose
    explicitly; for anything else, return ``None`` and let the next detector
    decide.
    """


@dataclass(frozen=True, slots=True)
class DetectorOption:
    """One option a detector understands, declared with its type, default and help.

    memproxy checks the configured value against ``type`` (and ``check``, when
    given) before ``build`` runs, fills in the default, and ``check-config``
    lists the options with their help.
    """

    name: str
    #: One line for the operator.
    help: str
    #: The value when the config does not set one.
    default: Any = None
    #: The accepted type(s); ``None`` is accepted when it is the default.
    type: type | tuple[type, ...] = str
    #: Returns why a value is unusable, or ``None``.
    check: Callable[[Any], str | None] | None = None
    #: Shown as ``<set>`` / ``<unset>``, never as its value.
    secret: bool = False


@dataclass(frozen=True, slots=True)
class DetectorContext:
    """What a detector's ``build`` function is given at start-up."""

    #: ``memproxy.detectors.<name>.options`` from the config, checked and with
    #: every declared option's default filled in.
    options: Mapping[str, Any]
    #: The whole validated configuration.
    settings: Settings


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """One detector, as a plugin declares it."""

    #: Unique name; also the key under ``memproxy.detectors`` in the config.
    name: str
    #: Default place in the chain: higher runs first. Config may override it.
    priority: int
    #: Called once at start-up (and on reload) to make the detect function.
    build: Callable[[DetectorContext], DetectFunction | RequestDetectFunction]
    #: One line for the operator, shown by ``check-config`` and ``/memory-routing/info``.
    description: str = ""
    #: Whether the detector runs when the config does not mention it.
    enabled_by_default: bool = True
    #: The options the detector understands (:class:`DetectorOption`); others
    #: are a config error. A set of bare names is accepted too (unchecked
    #: values), and ``None`` accepts any option.
    options: Sequence[DetectorOption] | frozenset[str] | None = field(default=None)
    #: What the detect function is called with: the request ``headers`` (the
    #: usual case), or the whole ``request`` (a :class:`ClientRequest`, with
    #: path, query and the client's address).
    reads: Literal["headers", "request"] = "headers"
    #: Every id this detector answers comes from the config (a bounded set), so
    #: metrics may label each of them; ids from elsewhere (headers, keys) share
    #: a bounded number of labels.
    ids_from_config: bool = False
    #: The detector answers for clients nobody recognised (a last resort): its
    #: answers fall under ``memproxy.unidentified`` and fill the
    #: unrecognised-client inbox.
    fallback: bool = False


@hookspec
def memproxy_detectors() -> Iterable[DetectorSpec]:  # type: ignore[empty-body]
    """Return the detectors this plugin provides.

    Called once when memproxy starts. Each :class:`DetectorSpec` names a
    detector, its default priority and the ``build`` function that turns its
    options into a detect function. A name already taken by another plugin,
    or anything other than a ``DetectorSpec``, stops start-up with a message
    naming the plugin.
    """
