"""Regular expressions on any request header, from ``user_id_mappings.header_patterns``.

Patterns are compiled once at load, searched case-insensitively, and tried in
the order the config lists them; the first that matches names the user.
"""

from __future__ import annotations

from collections.abc import Callable

from multidict import CIMultiDictProxy

from memproxy import DetectFunction, Detection, DetectorContext, DetectorSpec, hookimpl
from memproxy.config import Settings

#: Finds the first rule that matches a request's headers.
RuleMatcher = Callable[[CIMultiDictProxy[str]], Detection | None]


def rule_matcher(settings: Settings) -> RuleMatcher:
    """The configured rules as one function; ``api_key_hash`` uses it to name the tool."""
    rules = tuple(
        (rule.header, rule.pattern.search, rule.user_id,
         f"{rule.header} matches {rule.pattern.pattern!r}")
        for rule in settings.mappings.header_patterns
    )

    def match(headers: CIMultiDictProxy[str]) -> Detection | None:
        for header, search, user_id, reason in rules:
            for value in headers.getall(header, ()):
                if search(value):
                    return Detection(user_id, reason)
        return None

    return match


def build(ctx: DetectorContext) -> DetectFunction:
    return rule_matcher(ctx.settings)


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        name="header_patterns", priority=80, build=build, options=(), ids_from_config=True,
        description="regular expressions on User-Agent or any header "
                    "(user_id_mappings.header_patterns)",
    )]
