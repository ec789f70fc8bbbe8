"""A team's memproxy: three replicas of two workers each behind nginx, one PostgreSQL.

Bounded and on loopback only. Fifty users hold interleaved conversations whose
requests nginx spreads round robin, so the turns of one conversation land on
different replicas and workers. What a team would notice is checked on what the
provider received: no block carries another user's words, every turn of a
conversation carries the bytes its first turn got, an erasure through one replica
holds on all of them at once, each replica's status page lists a client another
replica saw first, and PostgreSQL stopping in the middle of the traffic fails no
request and loses memory only for a moment (what was dropped is counted).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import unused_port

from memproxy.demo_provider import DemoProvider, RecordedRequest
from memproxy.memory.recall import BLOCK_CLOSE, BLOCK_OPEN
from tests.helpers import ServeProcess
from tests.postgres_server import REQUIRED_ENV, PostgresServer

USERS = 50
REPLICAS = 3
WORKERS = 2
#: How long the provider takes to answer: a model is never instant, and a conversation's
#: next turn comes after its answer (the first turn's block is pinned meanwhile).
ANSWER_DELAY = 0.05
#: The whole test stops by itself after this many seconds at most.
DEADLINE = 240

if shutil.which("nginx") is None:
    if os.environ.get(REQUIRED_ENV):
        raise RuntimeError(f"{REQUIRED_ENV} is set, but nginx is not installed")
    pytestmark = pytest.mark.skip(reason="nginx not found: apt-get install nginx to run the "
                                         "team test (.ci/run does)")


class Provider(DemoProvider):
    """The demo provider, answering after :data:`ANSWER_DELAY`."""

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/health/liveliness":
            return web.json_response("I'm alive!")
        await asyncio.sleep(ANSWER_DELAY)
        return await super()._handle(request)


@dataclass
class Team:
    nginx_url: str
    replicas: list[ServeProcess]
    provider: Provider
    postgres: PostgresServer
    logs: list[Path]

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.replicas[index].port}"


def nginx_conf(folder: Path, port: int, upstreams: Sequence[int]) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    return f"""\
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    upstream memproxy {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://memproxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


@pytest.fixture
async def team(running_postgres: PostgresServer, tmp_path: Path,
               request: pytest.FixtureRequest) -> AsyncIterator[Team]:
    """The team; ``indirect`` parametrisation gives its write queue's size (default 1,000)."""
    queue = getattr(request, "param", 1000)
    dsn = running_postgres.dsn(running_postgres.new_database())
    async with Provider(chunk_delay=0) as provider:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"memproxy": {
            "headers": {"supermemory_api_key": None},
            "log": {"format": "json"},
            "memory": {"backend": "postgres", "dsn": "os.environ/TEAM_DSN", "queue": queue,
                       "recall": {"timeout_ms": 1000}},
        }}))
        replicas: list[ServeProcess] = []
        logs = []
        nginx: subprocess.Popen[bytes] | None = None
        try:
            for index in range(REPLICAS):
                log = tmp_path / f"replica-{index}.log"
                logs.append(log)
                with log.open("w") as out:
                    replicas.append(ServeProcess.launch(
                        config, provider.url, "--workers", str(WORKERS),
                        env={**os.environ, "TEAM_DSN": dsn}, stdout=out.fileno()))
            for replica in replicas:
                await asyncio.to_thread(replica.wait_until_listening, 60)
            port = unused_port()
            conf = tmp_path / "nginx.conf"
            conf.write_text(nginx_conf(tmp_path, port, [r.port for r in replicas]))
            tmp_path.chmod(0o755)
            nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf),
                                      "-g", "daemon off;"], stderr=subprocess.DEVNULL)
            await _until_listening(port)
            yield Team(f"http://127.0.0.1:{port}", replicas, provider, running_postgres, logs)
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait(timeout=10)
            for replica in replicas:
                replica.stop()


async def _until_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


@dataclass
class Sent:
    user: str
    conversation: str
    turn: int
    status: int
    memories: int


class Traffic:
    """Clients talking to the team through nginx; counts every answer."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.sent: list[Sent] = []

    async def conversation(self, user: str, name: str, turns: Sequence[str], *,
                           url: str | None = None) -> None:
        """One conversation, turn after turn, each request resending the history."""
        messages: list[dict[str, str]] = []
        for turn, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            async with self.session.post(
                    (url or self.url) + "/v1/chat/completions",
                    headers={"x-memory-user-id": user, "x-probe": f"{user}/{name}/{turn}"},
                    json={"model": "gpt-fake", "messages": messages}) as response:
                body = await response.read()
                memories = int(response.headers.get("x-memproxy-memories", "0"))
                self.sent.append(Sent(user, name, turn, response.status, memories))
                if response.status != 200:
                    continue
                answer = json.loads(body)["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": answer})


def block_of(request: RecordedRequest) -> str | None:
    body = request.body.decode()
    start = body.find(json.dumps(BLOCK_OPEN)[1:-1])
    if start < 0:
        return None
    end = body.index(BLOCK_CLOSE, start)
    return str(json.loads('"' + body[start:end + len(BLOCK_CLOSE)] + '"'))


def secret_of(user: str) -> str:
    return f"zq{user.replace('-', '')}x"


def facts(user: str) -> list[str]:
    return [f"My passphrase is {secret_of(user)} and I keep it in the blue notebook.",
            "I water the ferns on Sundays.", "The notebook sits beside the ferns."]


def probes(provider: DemoProvider) -> dict[str, RecordedRequest]:
    found = {}
    for request in provider.requests:
        probe = request.headers.get("x-probe")
        if probe:
            found[probe] = request
    return found


async def test_a_team_behind_nginx_keeps_users_apart_and_every_replica_agrees(
    team: Team,
) -> None:
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        traffic = Traffic(session, team.nginx_url)
        users = [f"user-{i:02d}-{secrets.token_hex(2)}" for i in range(USERS)]

        # Round 1: everyone tells their facts, all at once, interleaved by nginx.
        await asyncio.gather(*(traffic.conversation(u, "tell", facts(u)) for u in users))
        await asyncio.sleep(1.5)  # writes happen off the request path
        # Round 2: everyone asks, in a conversation of three turns.
        await asyncio.gather(*(traffic.conversation(u, "ask", [
            f"Where do I keep my passphrase, {u}?", "And when do I water the ferns?",
            "Thanks, what else do you know?"]) for u in users))
        assert [s for s in traffic.sent if s.status != 200] == []
        assert len(traffic.sent) == USERS * 6

        seen = probes(team.provider)
        landed_on = {r.headers.get("x-sm-user-id") for r in seen.values()}
        assert landed_on == set(users)
        # No block carries another user's words.
        for probe, request in seen.items():
            user = probe.split("/")[0]
            block = block_of(request) or ""
            others = [u for u in users if u != user and secret_of(u) in block]
            assert others == [], f"{probe} got the words of {others}"
        # Recall works across replicas: most users' question brought their passphrase.
        recalled = [u for u in users if secret_of(u) in (block_of(seen[f"{u}/ask/0"]) or "")]
        assert len(recalled) >= USERS * 0.9, f"{len(recalled)} of {USERS}"
        # Every turn of a conversation carries its first turn's block, byte for byte,
        # though nginx sent its turns to different replicas.
        for user in users:
            blocks = {block_of(seen[f"{user}/ask/{turn}"]) for turn in range(3)}
            assert len(blocks) == 1, f"{user}: {blocks}"

        # An erasure through one replica holds on every replica at once.
        victim = users[0]
        async with session.delete(f"{team.replica_url(0)}/memory-routing/memory/{victim}") as r:
            assert r.status == 200 and (await r.json())["deleted"] >= 6
        for index in range(REPLICAS):
            for worker_try in range(WORKERS * 2):  # either worker of the replica may answer
                name = f"after-erase-{index}-{worker_try}"
                await traffic.conversation(victim, name, [f"What is my passphrase {victim}?"],
                                           url=team.replica_url(index))
                block = block_of(probes(team.provider)[f"{victim}/{name}/0"]) or ""
                assert secret_of(victim) not in block

        # A client first seen by replica 0 is on the status page of replicas 1 and 2.
        agent = f"TeamTool/{secrets.token_hex(3)}"
        async with session.post(team.replica_url(0) + "/v1/chat/completions",
                                headers={"User-Agent": agent},
                                json={"model": "gpt-fake", "messages": [
                                    {"role": "user", "content": "hi"}]}) as response:
            assert response.status == 200
        for index in (1, 2):
            await _until(lambda i=index: _page_lists(session, team.replica_url(i), agent), 10)

    assert time.monotonic() - started < DEADLINE


async def _page_lists(session: aiohttp.ClientSession, url: str, agent: str) -> bool:
    async with session.get(url + "/memory-routing/status") as response:
        status = await response.json()
    return any(c["headers"].get("user-agent") == agent for c in status["unmatched"])


async def _until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s")
        await asyncio.sleep(0.2)


# A small write queue, so that the outage overflows it and drops are counted.
@pytest.mark.parametrize("team", [20], indirect=True)
async def test_postgres_stopping_mid_traffic_fails_no_request_and_memory_comes_back(
    team: Team,
) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        traffic = Traffic(session, team.nginx_url)
        users = [f"fault-{i:02d}-{secrets.token_hex(2)}" for i in range(20)]
        stop = asyncio.Event()

        async def keep_talking(user: str) -> None:
            n = 0
            while not stop.is_set():
                await traffic.conversation(user, f"c{n}", [f"Note {n} from {user}: "
                                                          f"{secrets.token_hex(4)}"])
                n += 1

        talkers = [asyncio.create_task(keep_talking(u)) for u in users]
        try:
            await asyncio.sleep(2)
            team.postgres.stop()
            down_at = len(traffic.sent)
            await asyncio.sleep(4)
            during = len(traffic.sent) - down_at
            team.postgres.start()
            back_at = time.monotonic()
            await asyncio.sleep(2)
        finally:
            stop.set()
            await asyncio.gather(*talkers)
        assert during > 20  # requests kept flowing while the database was down
        assert [s for s in traffic.sent if s.status != 200] == []

        # Memory is back within seconds: a fact told now is recalled in the next
        # conversation (what was told while the write queue was still full is dropped).
        user = users[0]

        async def recalled() -> bool:
            code = secrets.token_hex(4)
            await traffic.conversation(user, f"tell-{code}", [f"My bike lock code is {code}."])
            await asyncio.sleep(0.3)
            name = f"ask-{code}"
            await traffic.conversation(user, name, [f"What is my bike lock code {code}?"])
            return code in (block_of(probes(team.provider)[f"{user}/{name}/0"]) or "")

        await _until(recalled, 15)
        assert time.monotonic() - back_at < 20

        # What was dropped while the database was away is counted and logged.
        dropped = 0.0
        for index in range(REPLICAS):
            async with session.get(team.replica_url(index) + "/metrics") as response:
                text = await response.text()
            match = re.search(r'memproxy_memory_writes_total\{outcome="dropped"\} (\S+)', text)
            dropped += float(match.group(1)) if match else 0.0
    logged = sum(json.loads(line).get("memories", 0)
                 for log in team.logs for line in log.read_text().splitlines()
                 if '"memory_write_dropped"' in line)
    assert dropped > 0
    assert logged > 0
