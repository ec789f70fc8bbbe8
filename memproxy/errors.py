"""Error responses in the client's own dialect.

OpenAI-style clients expect ``{"error": {"message", "type", "code"}}``;
Anthropic-style clients (``/v1/messages`` and anything sent with an
``anthropic-version`` header) expect ``{"type": "error", "error": {"type",
"message"}}``. Answering in the right one lets each SDK raise its usual,
readable exception instead of a parse error.
"""

from __future__ import annotations

import json
from enum import Enum

from aiohttp import web
from multidict import CIMultiDictProxy

# Anthropic's error types for the statuses memproxy produces itself.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error"}


class Dialect(Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def dialect_of(path: str, headers: CIMultiDictProxy[str]) -> Dialect:
    """Which error format the client speaks, judged from the path and headers."""
    if "/messages" in path or "anthropic-version" in headers:
        return Dialect.ANTHROPIC
    return Dialect.OPENAI


def error_body(dialect: Dialect, status: int, message: str, code: str) -> dict[str, object]:
    """The JSON error document for ``status`` in ``dialect``."""
    if dialect is Dialect.ANTHROPIC:
        return {"type": "error",
                "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return {"error": {"message": message,
                      "type": _OPENAI_TYPES.get(status, "api_error"),
                      "param": None,
                      "code": code}}


def error_response(
    dialect: Dialect,
    status: int,
    message: str,
    code: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A complete JSON error response; ``code`` is a stable machine-readable name."""
    return web.Response(
        status=status,
        body=json.dumps(error_body(dialect, status, message, code)).encode(),
        content_type="application/json",
        headers=headers,
    )


def stream_error_event(dialect: Dialect, message: str) -> bytes:
    """An SSE event that tells a streaming SDK the stream failed, in its dialect.

    Both SDKs raise an error when they read it, instead of silently returning
    a truncated answer.
    """
    if dialect is Dialect.ANTHROPIC:
        payload = json.dumps(error_body(dialect, 502, message, "upstream_stream_failed"))
        return f"event: error\ndata: {payload}\n\n".encode()
    payload = json.dumps(error_body(dialect, 502, message, "upstream_stream_failed"))
    return f"data: {payload}\n\n".encode()
