"""The client names its memory user itself, in ``x-memory-user-id`` (configurable).

The header name comes from ``user_id_mappings.custom_header``. A value that is
present but unusable (too long, control characters, ...) refuses the request
with 400 instead of silently landing in another memory space, and so does the
header sent twice with different values: an ambiguous identity is never
resolved by guessing.
"""

from __future__ import annotations

from multidict import CIMultiDictProxy

from memproxy import DetectFunction, DetectorContext, DetectorSpec, InvalidUserId, hookimpl
from memproxy.identifiers import check_id


def build(ctx: DetectorContext) -> DetectFunction:
    header = ctx.settings.mappings.custom_header

    def detect(headers: CIMultiDictProxy[str]) -> str | None:
        values = headers.getall(header, ())
        if not values:
            return None
        value = values[0].strip()
        if any(other.strip() != value for other in values[1:]):
            raise InvalidUserId(f"the {header} header was sent {len(values)} times with "
                                "different values; send it once")
        problem = check_id(value)
        if problem:
            raise InvalidUserId(f"the {header} header is not a valid user id: {problem}")
        return value

    return detect


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        name="explicit_header", priority=100, build=build, options=(),
        description="the client's own x-memory-user-id header (user_id_mappings.custom_header)",
    )]
