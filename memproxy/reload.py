"""Live reload: re-read config.yaml and swap the detector chain without dropping anything.

Triggered by SIGHUP or ``POST /memory-routing/reload``. A config that does not
load (bad YAML, a bad regex, a broken plugin) is refused with a log line saying
why, and the running config stays in force.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from memproxy.config import ConfigError, Settings, config_warnings, load_settings
from memproxy.detection import PluginError, build_detector_chain
from memproxy.forwarding import Forwarder
from memproxy.litellm_lint import lint

log = structlog.get_logger("memproxy")

# Settings that belong to the running server: a reload notes them but cannot apply them.
RESTART_ONLY = ("host", "port", "litellm_url", "timeouts", "max_header_size", "log",
                "event_loop", "memory")


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    message: str
    detector_chain: list[str]


def reload_config(forwarder: Forwarder, extra_plugins: Sequence[object] = ()) -> ReloadResult:
    """Load the config file again and hand it to ``forwarder``; keep the old one on error."""
    running = forwarder.settings
    chain_now = [f"{link.name}:{link.priority}" for link in forwarder.policy.chain.links]
    if running.path is None:
        return ReloadResult(False, "memproxy was started without a config file; nothing to "
                                   "reload", chain_now)
    try:
        settings = load_settings(running.path, host=running.host, port=running.port,
                                 litellm_url=running.litellm_url)
        chain = build_detector_chain(settings, extra_plugins=extra_plugins)
    except (ConfigError, PluginError) as exc:
        log.error("config_reload_refused", config=str(running.path), error=str(exc),
                  kept="the running config")
        return ReloadResult(False, f"{running.path}: {exc}", chain_now)
    settings = _keep_restart_only(running, settings)
    forwarder.configure(settings, chain)
    # The same warnings as at start-up: a reload is when a new mistake arrives.
    for warning in [*config_warnings(settings), *lint(settings)]:
        log.warning("config_warning", message=warning)
    chain_new = [f"{link.name}:{link.priority}" for link in chain.links]
    log.info("config_reloaded", config=str(running.path), detector_chain=chain_new)
    return ReloadResult(True, "reloaded", chain_new)


def _keep_restart_only(running: Settings, loaded: Settings) -> Settings:
    changed = [name for name in RESTART_ONLY
               if getattr(running, name) != getattr(loaded, name)]
    if changed:
        log.warning("config_reload_needs_restart", settings=changed,
                    message="these settings take effect at the next restart")
    return replace(loaded, **{name: getattr(running, name) for name in RESTART_ONLY})
