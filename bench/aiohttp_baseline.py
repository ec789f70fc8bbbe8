"""The smallest useful aiohttp reverse proxy: a reference point for memproxy's own cost.

Same building blocks as memproxy (an aiohttp server, one shared
``ClientSession``, small bodies read whole, responses relayed chunk by chunk)
and the same header rewrite done the simplest way (``x-sm-user-id`` from a
User-Agent regex), but no logging, metrics, error dialects, limits or checks.
The difference between this and memproxy is what memproxy's own features cost.

Run: ``python -m bench.aiohttp_baseline PORT UPSTREAM_URL``.
"""

from __future__ import annotations

import re
import sys

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                        "host", "content-length"})
RULES = (
    (re.compile(r"^claude-cli/", re.I), "claude-code"),
    (re.compile(r"^OpenAIClient(Async)?Impl/Java", re.I), "jetbrains"),
    (re.compile(r"^codex_(cli_rs|exec)/", re.I), "codex"),
    (re.compile(r"^(Async)?Anthropic/Python", re.I), "anthropic-python"),
    (re.compile(r"^(Async)?OpenAI/Python", re.I), "openai-python"),
    (re.compile(r"^curl/", re.I), "curl"),
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def user_id(user_agent: str) -> str:
    for pattern, uid in RULES:
        if pattern.search(user_agent):
            return uid
    return "default"


def make_app(upstream: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["x-sm-user-id"] = user_id(request.headers.get("User-Agent", ""))
        body = await request.read() if request.body_exists else None
        async with request.app[SESSION].request(
                request.method, upstream + request.raw_path, headers=headers, data=body,
                allow_redirects=False) as answer:
            out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            if answer.content_length is not None and answer.content_length < 1 << 20:
                return web.Response(status=answer.status, body=await answer.read(),
                                    headers=out)
            response = web.StreamResponse(status=answer.status, headers=out)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    web.run_app(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]),
                access_log=None, print=None)
