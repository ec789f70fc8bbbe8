"""memproxy detector: one memory space per Open WebUI user.

Open WebUI, started with ``ENABLE_FORWARD_USER_INFO_HEADERS=true``, sends the
signed-in user as ``X-OpenWebUI-User-Id`` and ``X-OpenWebUI-User-Email`` on
every request to its OpenAI-compatible backend. This detector turns them into
a memory user id, so each person keeps their own memory.

Options (``memproxy.detectors.openwebui.options``):

``use``
    ``id`` (default) or ``email``: which header names the user.
``prefix``
    Put before the value, default ``openwebui-``.
"""

from __future__ import annotations

from multidict import CIMultiDictProxy

from memproxy import (
    ConfigError,
    Detection,
    DetectFunction,
    DetectorContext,
    DetectorSpec,
    hookimpl,
)

HEADERS = {"id": "x-openwebui-user-id", "email": "x-openwebui-user-email"}


def build(ctx: DetectorContext) -> DetectFunction:
    use = ctx.options.get("use", "id")
    if use not in HEADERS:
        raise ConfigError("memproxy.detectors.openwebui.options.use",
                          f"must be 'id' or 'email', not {use!r}")
    header = HEADERS[use]
    prefix = str(ctx.options.get("prefix", "openwebui-"))
    reason = f"Open WebUI user from {header}"

    def detect(headers: CIMultiDictProxy[str]) -> Detection | None:
        value = headers.get(header, "").strip().lower()
        return Detection(prefix + value, reason) if value else None

    return detect


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        name="openwebui", priority=90, build=build, options=frozenset({"use", "prefix"}),
        description="the signed-in Open WebUI user (X-OpenWebUI-User-Id / -Email)",
    )]
