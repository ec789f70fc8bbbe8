"""The status page as a person sees it, rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from html.parser import HTMLParser

import pytest
from aiohttp.test_utils import unused_port

from tests.helpers import ProxyFactory

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


class VisibleText(HTMLParser):
    """The text of a rendered DOM, without scripts and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(" ".join(data.split()))


async def render(url: str) -> str:
    """The page's visible text after its scripts ran, as Chromium renders it."""
    assert CHROMIUM is not None, "chromium must be installed for this test in CI"
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            "--dump-dom", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        dom, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    parser = VisibleText()
    parser.feed(dom.decode())
    return " | ".join(parser.parts)


async def test_status_page_shows_health_chain_spaces_and_unrecognised_clients(
    proxy: ProxyFactory,
) -> None:
    client = await proxy(user_id_mappings={"header_patterns": [
        {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"},
        {"header": "user-agent", "pattern": "^codex_cli_rs/", "user_id": "codex"}]})
    for _ in range(3):
        await client.post("/v1/messages", data=b"{}", headers={"User-Agent": "claude-cli/2.1"})
    for _ in range(5):  # busy, and failing every time
        await client.post("/status/500", data=b"{}", headers={"User-Agent": "codex_cli_rs/0.5"})
    await client.post("/v1/chat/completions", data=b"{}", headers={"User-Agent": "Zed/0.150"})
    await client.head("/", headers={"User-Agent": "Bun/1.2.0"})  # a probe, not a client
    text = await render(str(client.make_url("/memory-routing/")))
    assert "healthy" in text
    assert "LiteLLM at http://127.0.0.1" in text
    # the chain, in order, with priorities
    chain = text.index("explicit_header"), text.index("header_patterns"), text.index("| default")
    assert chain == tuple(sorted(chain))
    # requests per memory space: succeeded, then failed
    assert "succeeded (2xx) | failed" in text
    assert "codex | 0 | 5" in text
    assert "claude-code | 3 | 0" in text
    assert "default | 2 | 0" in text  # Zed's request, and the probe
    # the unrecognised client and the rule to paste
    assert "user-agent: Zed/0.150" in text
    assert "- {header: user-agent, pattern: '^Zed/', user_id: zed}" in text
    assert "Bun" not in text


async def test_status_page_shows_litellm_down(proxy: ProxyFactory) -> None:
    client = await proxy(litellm_url=f"http://127.0.0.1:{unused_port()}")
    text = await render(str(client.make_url("/memory-routing/")))
    assert "degraded" in text
    assert "unavailable (unreachable" in text
    assert "no requests in the last hour" in text
