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
    DetectFunction,
    Detection,
    DetectorContext,
    DetectorOption,
    DetectorSpec,
    hookimpl,
)

HEADERS = {"id": "x-openwebui-user-id", "email": "x-openwebui-user-email"}


OPTIONS = (
    DetectorOption("use", "which header names the user: id or email", "id",
                   check=lambda use: None if use in HEADERS else
                   f"must be 'id' or 'email', not {use!r}"),
    DetectorOption("prefix", "put before the value", "openwebui-"),
)


def build(ctx: DetectorContext) -> DetectFunction:
    header = HEADERS[ctx.options["use"]]
    prefix = ctx.options["prefix"]
    reason = f"Open WebUI user from {header}"

    def detect(headers: CIMultiDictProxy[str]) -> Detection | None:
        value = headers.get(header, "").strip().lower()
        return Detection(prefix + value, reason) if value else None

    return detect


@hookimpl
def memproxy_detectors() -> list[DetectorSpec]:
    return [DetectorSpec(
        # Above api_key_hash (90): Open WebUI calls LiteLLM with one key for all its users.
        name="openwebui", priority=95, build=build, options=OPTIONS,
        description="the signed-in Open WebUI user (X-OpenWebUI-User-Id / -Email)",
    )]
