"""The command line: ``serve``, ``check-config`` and ``explain``.

Every error a user can cause ends with one readable message on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from memproxy import __version__
from memproxy.app import create_app
from memproxy.config import (
    DEFAULT_LITELLM_URL,
    DEFAULT_PORT,
    OWN_MEMORY_BACKENDS,
    ConfigError,
    HeaderPattern,
    Settings,
    config_warnings,
    load_settings,
    parse_rule,
    reference,
    resolve_config_path,
)
from memproxy.detection import DetectorChain, PluginError, build_detector_chain
from memproxy.endpoints import FORWARDER, RELOAD
from memproxy.litellm_lint import lint
from memproxy.logs import bind_process, configure_logging
from memproxy.memory.backends import copy_memories, memory_store, store_at, where
from memproxy.memory.endpoints import (
    BadRequest,
    list_memories,
    list_users,
    memory_json,
    parse_limit,
    parse_user,
)
from memproxy.memory.store import MemoryStore
from memproxy.metrics import Metrics, UserIdLabels
from memproxy.routing import Refusal, RoutingPolicy, client_request
from memproxy.runner import STOP_SIGNALS, Drain, serve_until_signalled
from memproxy.supervisor import (
    DemoProviderError,
    DemoProviderSupervisor,
    LiteLLMPortInUse,
    LiteLLMStartError,
    LiteLLMSupervisor,
    check_port_free,
    find_litellm,
)
from memproxy.workers import WORKER_ENV, run_worker_pool

EXIT_USAGE = 2
GRACE_SECONDS = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memproxy",
        description="Memory-routing proxy: gives each AI client its own Supermemory user id "
                    "(x-sm-user-id) in front of a LiteLLM proxy.",
    )
    parser.add_argument("--version", action="version", version=f"memproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config_help = "config file (default: $LITELLM_CONFIG, then ./config.yaml)"
    serve = commands.add_parser(
        "serve", help="run memproxy in front of a LiteLLM proxy that is already running",
        description="Run memproxy in front of a LiteLLM proxy that is already running.",
    )
    serve.add_argument("--config", "-c", help=config_help)
    serve.add_argument("--host", help="address to listen on (default: memproxy.host, 127.0.0.1)")
    serve.add_argument("--port", "-p", type=int,
                       help=f"port to listen on (default: memproxy.port, {DEFAULT_PORT})")
    serve.add_argument("--litellm-url",
                       help=f"LiteLLM's base URL (default: $LITELLM_BASE_URL, then "
                            f"memproxy.litellm_url, then {DEFAULT_LITELLM_URL})")
    serve.add_argument("--workers", "-w", type=int, default=1,
                       help="processes sharing the port (SO_REUSEPORT); one per core at most "
                            "(default: 1)")
    serve.add_argument("--grace", type=float, default=GRACE_SECONDS,
                       help="seconds requests in flight get to finish on shutdown; a second "
                            f"Ctrl-C stops at once (default: {GRACE_SECONDS:.0f})")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    start = commands.add_parser(
        "start", aliases=["start-proxies"],
        help="run LiteLLM and memproxy in front of it (the whole chain)",
        description="Start the real LiteLLM proxy as a supervised child on the LiteLLM port, "
                    "wait until it is ready, then serve memproxy in front of it. LiteLLM is "
                    "restarted if it dies and stopped when memproxy stops.",
    )
    _add_start_flags(start, config_help)

    check = commands.add_parser(
        "check-config", help="validate the config and show the detector chain",
        description="Validate the config, print the detector chain in order and any warning. "
                    "Exit status 0 when the config is usable, 2 when it is not.",
    )
    check.add_argument("--config", "-c", help=config_help)
    check.add_argument("--keys", action="store_true",
                       help="list every memproxy config key with its default and meaning")

    memory = commands.add_parser(
        "memory", help="see, erase, copy what memproxy remembers (memory.backend: local, postgres)",
        description="See and erase the memories memproxy keeps, in the store of "
                    "memproxy.memory (the SQLite file or the PostgreSQL database); the same as "
                    "the /memory-routing/memory endpoints.")
    memory.add_argument("--config", "-c", help=config_help)
    memory_commands = memory.add_subparsers(dest="memory_command", metavar="ACTION",
                                            required=True)
    listing = memory_commands.add_parser(
        "list", help="users with their number of memories, or one user's memories")
    listing.add_argument("user", nargs="?", help="a memory user id (none: list the users)")
    listing.add_argument("--search", "-s", metavar="TEXT", help="the best matches for TEXT")
    listing.add_argument("--limit", "-n", default="50", help="at most this many (default 50)")
    export = memory_commands.add_parser("export", help="everything kept for a user, as JSON Lines")
    export.add_argument("user")
    delete = memory_commands.add_parser(
        "delete", help="erase one memory, or all of a user's (gone from the file too)")
    delete.add_argument("user")
    delete.add_argument("id", nargs="?", help="the memory's id (none: all of the user's)")
    memory_commands.add_parser(
        "compact", help="rewrite the store without free space (erased bytes gone from disk)",
        description="Rewrite the memory store so that no free space is left in it. PostgreSQL "
                    "keeps an erased row's bytes in its page until new rows overwrite them; "
                    "this runs VACUUM FULL, which locks the memory tables while it runs (recall "
                    "is skipped, writes wait). An SQLite file needs it only to shrink.")
    memory_commands.add_parser(
        "migrate-db", help="create or upgrade the PostgreSQL tables now (memory.migrate: false)",
        description="Create or upgrade memproxy's tables in the database of memproxy.memory.dsn, "
                    "under an advisory lock; safe to run while replicas run.")
    copy = memory_commands.add_parser(
        "copy", help="copy every memory from one store into another (resumable)",
        description="Copy every user's memories from one store into another, e.g. from the "
                    "SQLite file of one machine into the team's PostgreSQL database. Safe to "
                    "run again after an interruption: what arrived already is skipped.",
        epilog="example: python -m memproxy memory copy --from sqlite:memproxy-memory.db "
               "--to postgres:postgresql://memproxy@db.internal/memproxy")
    copy.add_argument("--from", dest="source", required=True, metavar="STORE",
                      help="sqlite:PATH or postgres:DSN")
    copy.add_argument("--to", dest="target", required=True, metavar="STORE",
                      help="sqlite:PATH or postgres:DSN")

    explain = commands.add_parser(
        "explain", help="show which user id a request with these headers would get",
        description="Dry run of detection, offline: which user id a request with these "
                    "headers gets, which detector decided, and why.",
        epilog="example: memproxy explain -H 'User-Agent: claude-cli/2.0.14 (external, cli)'",
    )
    explain.add_argument("--config", "-c", help=config_help)
    explain.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                         help="a request header; repeat for several")
    explain.add_argument("--remote", default="127.0.0.1", metavar="ADDRESS",
                         help="the client's address, for memproxy.explicit_id "
                              "(default: 127.0.0.1)")
    explain.add_argument("--path", default="/v1/chat/completions",
                         help="the request path, query string included "
                              "(default: /v1/chat/completions)")
    explain.add_argument("--rule", action="append", default=[], metavar="YAML",
                         help="try a header_patterns entry (e.g. one the unmatched inbox "
                              "suggests) before the configured ones; repeat for several")
    return parser


def _add_start_flags(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", "-c", help=config_help)
    parser.add_argument("--litellm-port", type=int, default=8765,
                        help="port for LiteLLM, on 127.0.0.1 (default: 8765)")
    parser.add_argument("--memoryproxy-port", "--port", dest="port", type=int,
                        help=f"port for memproxy (default: memproxy.port, {DEFAULT_PORT})")
    parser.add_argument("--host", help="address memproxy listens on (default: memproxy.host)")
    parser.add_argument("--grace", type=float, default=GRACE_SECONDS,
                        help="seconds in-flight requests get to finish on shutdown "
                             f"(default: {GRACE_SECONDS:.0f})")
    parser.add_argument("--ready-timeout", type=float, default=120.0,
                        help="seconds to wait for LiteLLM to start (default: 120)")
    parser.add_argument("--litellm-log", metavar="PATH",
                        help="file LiteLLM's output is appended to, colour codes removed; "
                             "memproxy's own log keeps only LiteLLM's warnings and errors "
                             "(default: litellm.log beside the config file)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command in ("start", "start-proxies"):
            return start(args)
        if args.command == "check-config":
            return check_config(args)
        if args.command == "memory":
            return memory_command(args)
        return explain(args)
    except PluginError as exc:
        print(f"memproxy: plugin error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"memproxy: {_where(args, exc)}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except LiteLLMStartError as exc:
        print(f"memproxy: cannot start LiteLLM: {exc}", file=sys.stderr)
        return 1
    except DemoProviderError as exc:
        print(f"memproxy: cannot start the demo provider: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head, less, ...: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def start_proxies() -> int:
    """The ``start-proxies`` console script: ``memproxy start`` under its original name."""
    return main(["start", *sys.argv[1:]])


def _where(args: argparse.Namespace, exc: ConfigError) -> str:
    """The prefix naming the config file, for a mistake made in it.

    A mistake in a command-line flag (``--workers``, ``--rule``, ``-H``) or in an
    environment variable (``LITELLM_BASE_URL``) has that name as its key, which is
    all the message needs.
    """
    if exc.key.startswith("-") or exc.key.isupper():
        return ""
    path, _ = resolve_config_path(getattr(args, "config", None))
    return f"config error in {path}: " if path else "config error: "


def _load(args: argparse.Namespace, **overrides: object) -> tuple[Settings, DetectorChain]:
    settings = load_settings(args.config, **overrides)  # type: ignore[arg-type]
    return settings, build_detector_chain(settings)


def serve(args: argparse.Namespace) -> int:
    if args.workers < 1:  # a flag mistake: reported before the config is read
        raise ConfigError("--workers", f"must be 1 or more, got {args.workers}")
    settings, chain = _load(args, host=args.host, port=args.port, litellm_url=args.litellm_url)
    configure_logging(settings.log.format, settings.log.level)
    log = structlog.get_logger("memproxy")
    if args.workers > 1:
        if settings.port == 0:
            raise ConfigError("--port", "several workers need a fixed port, not 0")
        for warning in [*config_warnings(settings), *lint(settings)]:
            log.warning("config_warning", message=warning)
        worker_argv = ["serve", "--host", settings.host, "--port", str(settings.port),
                       "--litellm-url", settings.litellm_url, "--reuse-port"]
        if settings.path is not None:
            worker_argv += ["--config", str(settings.path)]
        log.info("memproxy_workers", workers=args.workers,
                 listen=f"{settings.host}:{settings.port}")
        worker_argv += ["--grace", str(args.grace)]
        return run_worker_pool(worker_argv, args.workers, grace=args.grace)
    if WORKER_ENV in os.environ:
        bind_process(worker=int(os.environ[WORKER_ENV]))
    elif args.reuse_port is False:
        for warning in [*config_warnings(settings), *lint(settings)]:
            log.warning("config_warning", message=warning)
    _log_starting(settings, chain, settings.litellm_url)
    app = create_app(settings, chain=chain)
    return _run(app, settings, args.grace, reuse_port=args.reuse_port)


def _log_starting(settings: Settings, chain: DetectorChain, litellm_url: str) -> None:
    structlog.get_logger("memproxy").info(
        "memproxy_starting", version=__version__, listen=f"{settings.host}:{settings.port}",
        litellm_url=litellm_url, config=str(settings.path or "(none)"),
        event_loop=settings.event_loop,
        detector_chain=[f"{link.name}:{link.priority}" for link in chain.links])


def _run(app: web.Application, settings: Settings, grace: float,
         on_ready: Callable[[], None] | None = None, reuse_port: bool = False) -> int:
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            try:
                forwarder = app[FORWARDER]
                runner.run(serve_until_signalled(app, settings.host, settings.port,
                                                 grace=grace,
                                                 request_head=settings.timeouts.request_head,
                                                 max_header_size=settings.max_header_size,
                                                 on_ready=on_ready,
                                                 reuse_port=reuse_port,
                                                 on_hangup=app[RELOAD],
                                                 drain=Drain(lambda: forwarder.in_flight,
                                                             forwarder.stopping)))
            finally:
                # Closing the loop puts back the signals' default actions. Hold the stop
                # signals until they are ignored, so a late one cannot kill the exit.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except OSError as exc:
        print(f"memproxy: cannot listen on {settings.host}:{settings.port}: "
              f"{exc.strerror or exc}. Pick another port with --port.", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return 0


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``memproxy.event_loop`` asks for (``None``: asyncio's own)."""
    if event_loop == "uvloop":
        import uvloop  # checked by the config: installed

        return uvloop.new_event_loop
    return None


def _master_key_configured(settings: Settings) -> bool:
    general = settings.litellm_sections.get("general_settings")
    return bool(os.environ.get("LITELLM_MASTER_KEY")) or (
        isinstance(general, dict) and bool(general.get("master_key")))


def start(args: argparse.Namespace) -> int:
    litellm_url = f"http://127.0.0.1:{args.litellm_port}"
    settings, chain = _load(args, host=args.host, port=args.port, litellm_url=litellm_url)
    if settings.path is None:
        raise ConfigError("--config", "start needs a config file for LiteLLM",
                          "run it in the folder with config.yaml, or pass --config FILE")
    find_litellm()  # fail early, with the install hint, before anything starts
    try:
        # memproxy runs its own LiteLLM: whatever else answers on the port is not it.
        check_port_free("127.0.0.1", args.litellm_port)
    except LiteLLMPortInUse as exc:
        print(f"memproxy: cannot start LiteLLM: {exc}", file=sys.stderr)
        return EXIT_USAGE
    litellm_log = Path(args.litellm_log or Path(settings.path).parent / "litellm.log").absolute()
    try:
        litellm_log.open("a").close()
    except OSError as exc:
        raise ConfigError("--litellm-log", f"cannot write {litellm_log}: {exc.strerror or exc}",
                          "pass --litellm-log with a file memproxy may write") from exc
    configure_logging(settings.log.format, settings.log.level)
    log = structlog.get_logger("memproxy")
    for warning in [*config_warnings(settings), *lint(settings)]:
        log.warning("config_warning", message=warning)

    env = dict(os.environ)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    generated_key = None
    if not _master_key_configured(settings):
        generated_key = "sk-memproxy-" + secrets.token_urlsafe(24)
        env["LITELLM_MASTER_KEY"] = generated_key
    metrics = Metrics(UserIdLabels())
    supervisor = LiteLLMSupervisor(config=Path(settings.path), port=args.litellm_port, env=env,
                                   ready_timeout=args.ready_timeout,
                                   on_restart=metrics.litellm_restarts.inc,
                                   log_file=litellm_log)
    demo = None
    if settings.demo_provider is not None:
        demo = DemoProviderSupervisor(host=settings.demo_provider.host,
                                      port=settings.demo_provider.port)
    _log_starting(settings, chain, litellm_url)
    app = create_app(settings, chain=chain, supervisor=supervisor, metrics=metrics,
                     demo_provider=demo)

    def banner() -> None:
        url = f"http://{settings.host}:{settings.port}"
        key = generated_key or "$LITELLM_MASTER_KEY"
        lines = [
            "",
            f"memproxy {__version__} is up.",
            f"  memproxy  {url}   <- point your clients here (OpenAI or Anthropic base URL)",
            f"  LiteLLM   {litellm_url}   (pid {supervisor.pid}, config {settings.path})",
            f"            its output: {litellm_log}",
        ]
        if demo is not None:
            lines.append(f"  Demo      {demo.url}   (pid {demo.pid}) answers the demo models "
                         f"offline, streams included")
        if settings.memory.backend in OWN_MEMORY_BACKENDS:
            lines.append(f"  Memory    {where(settings)}   (see it: python -m memproxy "
                         f"memory list)")
        if generated_key:
            lines += ["  API key   " + generated_key,
                      "            generated for this run, since no LiteLLM master key is set;",
                      "            set LITELLM_MASTER_KEY to choose a lasting one."]
        lines += [
            "  Try it:",
            f"    curl -s {url}/v1/chat/completions -H \"Authorization: Bearer {key}\" \\",
            "      -H 'Content-Type: application/json' \\",
            "      -d '{\"model\": \"memproxy-demo\", "
            "\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}' -i",
            f"  Which memory space am I in?  curl -s {url}/memory-routing/info",
            "",
        ]
        print("\n".join(lines), file=sys.stderr, flush=True)

    try:
        return _run(app, settings, args.grace, on_ready=banner)
    except LiteLLMPortInUse as exc:  # taken since the check above
        print(f"memproxy: cannot start LiteLLM: {exc}", file=sys.stderr)
        return EXIT_USAGE


def format_chain(chain: DetectorChain, patterns: Sequence[HeaderPattern] = ()) -> str:
    """The chain in order, one detector a line, with the header patterns under theirs.

    The patterns are listed because an empty or misplaced list is the usual reason
    every client lands in the default memory space.
    """
    lines = []
    for i, link in enumerate(chain.links, 1):
        lines.append(f"  {i}. {link.name:<16} priority {link.priority:>4}  {link.description}"
                     + ("" if link.plugin.startswith("memproxy.")
                        else f"  [plugin {link.plugin}]"))
        if link.options:
            shown = ", ".join(f"{name}={value}" for name, value in link.options.items())
            lines.append(f"     options: {shown}")
        if link.name == "header_patterns":
            lines += [f"     - {format_rule(rule)}" for rule in patterns] or [
                "     (no patterns: it recognises no client)"]
    return "\n".join(lines) if lines else "  (no detector enabled: every request gets the default)"


def format_rule(rule: HeaderPattern) -> str:
    """One header pattern on a line, as ``check-config`` and ``explain`` list it."""
    return f"{rule.header} ~ {rule.pattern.pattern!r} -> {rule.user_id}"


def format_source(settings: Settings) -> str:
    """The config file read, as an absolute path (a relative one hides which folder)."""
    if settings.path is None:
        return "none found: built-in defaults"
    return str(settings.path.absolute())


def format_reference() -> str:
    """Every config key as a Markdown table (docs/configuration.md holds the same)."""
    lines = ["| key | default | what it does |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{default}` | {meaning} |" for key, default, meaning in reference()]
    return "\n".join(lines)


def check_config(args: argparse.Namespace) -> int:
    if args.keys:
        print(format_reference())
        return 0
    settings, chain = _load(args)
    print(f"config: {format_source(settings)}")
    print(f"listen: {settings.host}:{settings.port}  ->  LiteLLM at {settings.litellm_url}")
    print("detector chain (first answer wins):")
    print(format_chain(chain, settings.mappings.header_patterns))
    print(f"default user id: {settings.mappings.default_user_id}")
    warnings = [*config_warnings(settings), *lint(settings)]
    for warning in warnings:
        print(f"\nWARNING: {warning}")
    if not warnings:
        print("ok")
    return 0


def memory_command(args: argparse.Namespace) -> int:
    """``memproxy memory ...``: the admin API's functions on the memory store itself."""
    if args.memory_command == "copy":
        return asyncio.run(_copy(store_at(args.source, "--from"), store_at(args.target, "--to"),
                                 args.source, args.target))
    settings = load_settings(args.config)
    store = memory_store(settings)
    if store is None:
        raise ConfigError("memproxy.memory.backend",
                          f"is {settings.memory.backend}: memproxy keeps no memory of its own",
                          "set memproxy.memory.backend: local (or postgres)")
    if args.memory_command == "migrate-db":
        if settings.memory.backend != "postgres":
            raise ConfigError("memproxy.memory.backend", "is local: an SQLite file is upgraded "
                              "when memproxy opens it", "migrate-db is for backend: postgres")
        return asyncio.run(_migrate(store, where(settings)))
    return asyncio.run(_memory_command(args, store, where(settings)))


async def _migrate(store: MemoryStore, place: str) -> int:
    from memproxy.memory.postgres import PostgresMemoryStore

    assert isinstance(store, PostgresMemoryStore)
    try:
        before, after = await store.migrate()
    except Exception as exc:
        print(f"memproxy: cannot migrate {place}: {store.redact(f'{type(exc).__name__}: {exc}')}",
              file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"{place}: layout {after}" + (f" (was {before})" if before != after else
                                        " (already up to date)"))
    return 0


async def _copy(source: MemoryStore, target: MemoryStore, source_name: str,
                target_name: str) -> int:
    def progress(user_id: str, read: int, written: int) -> None:
        print(f"  {user_id}: {read} memories read", file=sys.stderr)

    try:
        report = await copy_memories(source, target, progress=progress)
    except Exception as exc:
        print(f"memproxy: the copy stopped: {_redacted(exc, source, target)}\n"
              "Run the same command again: it skips what was copied already.", file=sys.stderr)
        return 1
    finally:
        await source.close()
        await target.close()
    print(f"copied {report.users} users: {report.read} memories read, {report.written} "
          f"written, {report.read - report.written} already there")
    return 0


def _redacted(exc: Exception, *stores: MemoryStore) -> str:
    text = f"{type(exc).__name__}: {exc}"
    for store in stores:
        redact = getattr(store, "redact", None)
        if redact is not None:
            text = redact(text)
    return text


async def _memory_command(args: argparse.Namespace, store: MemoryStore, place: str) -> int:
    try:
        await store.open()
        if args.memory_command == "list" and args.user is None:
            users = await list_users(store)
            for user in users:
                print(f"{user['user_id']:<40} {user['memories']:>8} memories, "
                      f"last {user['last_write']}")
            if not users:
                print(f"no memories in {place}")
        elif args.memory_command == "list":
            for memory in await list_memories(store, parse_user(args.user),
                                              query=args.search, limit=parse_limit(args.limit)):
                text = " ".join(memory["text"].split())
                print(f"[{memory['id']}] {memory['created_at']} {memory['role']}: "
                      f"{text[:200]}{'...' if len(text) > 200 else ''}")
        elif args.memory_command == "export":
            for kept in await store.export(parse_user(args.user)):
                print(json.dumps(memory_json(kept), ensure_ascii=False))
        elif args.memory_command == "compact":
            before = await store.size_bytes()
            await store.compact()
            print(f"compacted {place}: {before} bytes before, {await store.size_bytes()} after")
        else:
            user_id = parse_user(args.user)
            if args.id is None:
                deleted = await store.delete_user(user_id)
            elif args.id.isascii() and args.id.isdigit():
                deleted = await store.delete(user_id, int(args.id))
            else:
                raise BadRequest("a memory id is a whole number, as 'memory list USER' shows")
            print(f"deleted {deleted} memories of {user_id}")
    except BadRequest as exc:
        print(f"memproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a store that cannot be read: say which, and why, briefly
        print(f"memproxy: cannot use the memory store {place}: {_redacted(exc, store)}",
              file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError("-H", f"{text!r} is not a header", "write it as 'Name: value'")
    return name.strip(), value.strip()


def explain(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(f"config:   {format_source(settings)}")
    # On stderr, so the answer on stdout stays the same to read or to pipe.
    for warning in config_warnings(settings):
        print(f"WARNING: {warning}", file=sys.stderr)
    if args.rule:
        rules = tuple(parse_rule(text) for text in args.rule)
        settings = replace(settings, mappings=replace(
            settings.mappings, header_patterns=rules + settings.mappings.header_patterns))
        for rule in rules:
            print(f"trying rule: {format_rule(rule)}")
    chain = build_detector_chain(settings)
    policy = RoutingPolicy(settings, chain)
    path, _, query = args.path.partition("?")
    headers: CIMultiDict[str] = CIMultiDict(parse_header(h) for h in args.header)
    _, client = client_request(CIMultiDictProxy(headers), path=path, query_string=query,
                               remote=args.remote)
    try:
        route = policy.route(client)
    except Refusal as exc:
        print(f"refused with {exc.status} ({exc.code}): {exc}")
        return 1
    shown = policy.describe(route, client)
    print(f"user id:  {route.user_id or '(none: forwarded without memory headers)'}")
    print(f"detector: {route.decision.detector}")
    print(f"why:      {shown['reason']}")
    print("headers sent to LiteLLM:")
    for name, value in route_headers(shown).items():
        print(f"  {name}: {value}")
    print("detector chain:")
    print(format_chain(chain, settings.mappings.header_patterns))
    return 0


def route_headers(shown: dict[str, object]) -> dict[str, str]:
    headers = shown.get("injected_headers")
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
