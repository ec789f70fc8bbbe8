"""The last resort: ``user_id_mappings.default_user_id`` (``default`` unless set)."""

from __future__ import annotations

from multidict import CIMultiDictProxy

from memproxy import DetectFunction, Detection, DetectorContext, DetectorSpec, hookimpl


def build(ctx: DetectorContext) -> DetectFunction:
    answer = Detection(ctx.settings.mappings.default_user_id, "no other detector answered")

    def detect(headers: CIMultiDictProxy[str]) -> Detection:
        return answer

    return detect


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        name="default", priority=0, build=build, options=(), ids_from_config=True,
        fallback=True,
        description="user_id_mappings.default_user_id for everything else",
    )]
