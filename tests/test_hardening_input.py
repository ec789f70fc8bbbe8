"""Hostile or mistaken input that must be refused with a message, never crash.

Config values out of range, credentials in the LiteLLM URL, odd ``limit`` query
values, User-Agents no YAML rule can be made from, and command-line mistakes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from memproxy.app import create_app
from memproxy.config import ConfigError, Settings, load_settings, parse_settings
from memproxy.detection import build_detector_chain
from memproxy.inbox import rule_as_yaml, suggest_rule
from memproxy.routing import client_request
from tests.helpers import ProxyFactory

HUGE = "9" * 400
PASSWORD = "hunter2-secret"


def check_config(path: Path, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memproxy", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=60, env=env)


def memproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memproxy", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def assert_refused(result: subprocess.CompletedProcess[str], says: str) -> None:
    """Exit status 2, and a short message on stderr without a traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert says in result.stderr
    assert len(result.stderr.splitlines()) <= 3, result.stderr
    assert len(result.stderr) < 500, result.stderr


# -- config values that used to crash ----------------------------------------------------

CRASHING_CONFIGS = {
    "huge max_body_size": (f"memproxy:\n  max_body_size: {HUGE}\n", "memproxy.max_body_size"),
    "huge max_body_size text": (f"memproxy:\n  max_body_size: '{HUGE}MB'\n",
                                "memproxy.max_body_size"),
    "zero max_body_size text": ("memproxy:\n  max_body_size: '0'\n", "memproxy.max_body_size"),
    "huge connect timeout": (f"memproxy:\n  timeouts:\n    connect: {HUGE}\n",
                             "memproxy.timeouts.connect"),
    "nan connect timeout": ("memproxy:\n  timeouts:\n    connect: .nan\n",
                            "memproxy.timeouts.connect"),
    "port in superscript digits": ("memproxy:\n  port: '²'\n", "memproxy.port"),
    "priority in circled digits": (
        "memproxy:\n  detectors:\n    default: {priority: '①'}\n",
        "memproxy.detectors.default.priority"),
    "priority of 5000 digits": (
        f"memproxy:\n  detectors:\n    default: {{priority: '{'9' * 5000}'}}\n",
        "memproxy.detectors.default.priority"),
    "deep list": ("memproxy:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", "nests"),
    "integer of 5000 digits": (f"memproxy:\n  port: {'9' * 5000}\n", "value YAML cannot read"),
    "impossible date": ("memproxy:\n  host: 2024-13-45\n", "value YAML cannot read"),
}


@pytest.mark.parametrize("name", CRASHING_CONFIGS)
def test_check_config_refuses_values_that_used_to_crash(tmp_path: Path, name: str) -> None:
    text, says = CRASHING_CONFIGS[name]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert_refused(check_config(path), says)


@pytest.mark.parametrize("memproxy_section, key", [
    ({"max_body_size": int(HUGE)}, "memproxy.max_body_size"),
    ({"max_body_size": "0"}, "memproxy.max_body_size"),
    ({"max_body_size": "0.4"}, "memproxy.max_body_size"),
    ({"max_body_size": "1025GiB"}, "memproxy.max_body_size"),
    ({"max_body_size": 10**5000}, "memproxy.max_body_size"),
    ({"timeouts": {"connect": int(HUGE)}}, "memproxy.timeouts.connect"),
    ({"timeouts": {"between_chunks": float("inf")}}, "memproxy.timeouts.between_chunks"),
    ({"timeouts": {"total": 8 * 24 * 3600}}, "memproxy.timeouts.total"),
    ({"port": "٣"}, "memproxy.port"),
    ({"port": "9" * 5000}, "memproxy.port"),
    ({"detectors": {"default": {"priority": "²"}}}, "memproxy.detectors.default.priority"),
    ({"detectors": {"default": {"priority": 10**9}}}, "memproxy.detectors.default.priority"),
])
def test_out_of_range_values_are_config_errors_naming_the_key(
    memproxy_section: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"memproxy": memproxy_section})
    assert caught.value.key == key
    assert len(str(caught.value)) < 300


def test_the_largest_accepted_values_load() -> None:
    loaded = parse_settings({"memproxy": {
        "max_body_size": "1024GiB", "timeouts": {"connect": 7 * 24 * 3600},
        "port": "8080", "detectors": {"default": {"priority": "-1000000"}}}})
    assert loaded.max_body_size == 1024**4
    assert loaded.timeouts.connect == 7 * 24 * 3600
    assert loaded.port == 8080
    assert loaded.detector("default").priority == -1_000_000


async def test_reload_refuses_a_config_that_used_to_crash(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("memproxy:\n  max_body_size: 1MiB\n")
    client = await aiohttp_client(create_app(load_settings(path)))
    for text in (f"memproxy:\n  max_body_size: {HUGE}\n",
                 "memproxy:\n  x: " + "[" * 5000 + "]" * 5000 + "\n"):
        path.write_text(text)
        response = await client.post("/memory-routing/reload", json={})
        assert response.status == 400
        assert (await response.json())["reloaded"] is False


# -- credentials in the LiteLLM URL ------------------------------------------------------

CREDENTIAL_URL = f"http://memproxy:{PASSWORD}@127.0.0.1:8765"


def assert_credentials_refused(error: ConfigError, key: str) -> None:
    assert error.key == key
    assert "credentials do not belong in the URL" in str(error)
    assert PASSWORD not in str(error)


def test_litellm_url_with_credentials_is_refused_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"memproxy:\n  litellm_url: {CREDENTIAL_URL}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert_credentials_refused(caught.value, "memproxy.litellm_url")


def test_litellm_url_with_credentials_is_refused_from_the_environment(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LITELLM_CONFIG", raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no config.yaml here
    monkeypatch.setenv("LITELLM_BASE_URL", CREDENTIAL_URL)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert_credentials_refused(caught.value, "LITELLM_BASE_URL")


@pytest.mark.parametrize("url", [
    CREDENTIAL_URL, f"http://{PASSWORD}@localhost", f"https://user:{PASSWORD}@[::1]:4000/",
    f"ftp://user:{PASSWORD}@host", f"user:{PASSWORD}@host:8765", f"http://u:{PASSWORD}@[::1",
])
def test_litellm_url_flag_with_credentials_is_refused_without_showing_them(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(litellm_url=url)
    assert caught.value.key == "--litellm-url"
    assert PASSWORD not in str(caught.value)


def test_serve_with_credentials_in_the_url_says_so_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("memproxy: {}\n")
    result = memproxy("serve", "--config", str(config), "--litellm-url", CREDENTIAL_URL)
    assert_refused(result, "memproxy: --litellm-url: must not hold a user name or password")
    assert PASSWORD not in result.stderr


# -- the unmatched inbox's limit ---------------------------------------------------------

@pytest.mark.parametrize("limit", ["²", "①", "٣", "-1", "1.5", "ten", ""])
async def test_unmatched_limit_that_is_not_a_number_is_a_400(
    proxy: ProxyFactory, limit: str
) -> None:
    client = await proxy()
    response = await client.get("/memory-routing/unmatched", params={"limit": limit})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_limit"
    assert "1 to 200" in error["message"]


@pytest.mark.parametrize("limit, listed", [
    (None, 3), ("0", 1), ("2", 2), ("0002", 2), ("200", 3), ("9" * 5000, 3)])
async def test_unmatched_limit_is_clamped_to_1_to_200(
    proxy: ProxyFactory, limit: str | None, listed: int
) -> None:
    client = await proxy()
    for tool in ("zed", "bun", "deno"):
        await client.get("/v1/models", headers={"User-Agent": f"{tool}/1.0"})
    params = {"limit": limit} if limit is not None else {}
    response = await client.get("/memory-routing/unmatched", params=params)
    assert response.status == 200
    assert len((await response.json())["unmatched"]) == listed


# -- suggested rules from any User-Agent -------------------------------------------------

#: What a product token is made of, as memproxy reads one.
PRODUCT = re.compile(r"[A-Za-z0-9._+-]*")


def load_suggestion(line: str) -> Settings:
    """``line`` pasted under header_patterns, loaded as memproxy loads a config file."""
    text = "user_id_mappings:\n  header_patterns:\n    " + line + "\n"
    return parse_settings(yaml.safe_load(text))


def assert_suggestion_is_sound(fingerprint: dict[str, str]) -> None:
    rule = suggest_rule(fingerprint)
    if rule is None:
        return
    loaded = load_suggestion(rule_as_yaml(rule))
    (pattern,) = loaded.mappings.header_patterns
    assert (pattern.header, pattern.pattern.pattern, pattern.user_id) == (
        rule["header"], rule["pattern"], rule["user_id"])
    chain = build_detector_chain(loaded, entry_points=False)
    _, request = client_request(CIMultiDictProxy(CIMultiDict(fingerprint)))
    decision = chain.detect_user(request)
    assert (decision.detector, decision.user_id) == ("header_patterns", rule["user_id"])
    agent = fingerprint.get("user-agent", "")
    if rule["header"] == "user-agent":
        token = PRODUCT.match(agent)
        assert token is not None
        # A tool whose name only starts the same way is another client.
        other = agent[:token.end()] + "x" + agent[token.end():]
        assert not pattern.pattern.search(other), (rule, other)


TRICKY = ["\u2028", "\u0085", "\u2029", "\udcff", "\ud800", "\x00", "\x7f", "\t", "é", "'",
          '"', "\\", "/", " ", ";", "(", ")", ":", "#", "{", "}", "[", "]", ",", "&", "*", "!",
          "|", ">", "%", "@", "`", "?", "-", ".", "+", "_", "~", "$", "^"]
AGENTS = st.one_of(
    st.text(alphabet=st.one_of(st.sampled_from(TRICKY), st.characters(codec="ascii")),
            max_size=24),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=24),
    st.builds(lambda word, rest: word + rest,
              st.sampled_from(["Yes", "null", "123", "0x1F", "1e3", ".5", "~", "on", "N",
                               "2001-12-14", "<<", "=", "1_000", "Zed"]),
              st.text(alphabet=st.sampled_from([*TRICKY, "/", "1"]), max_size=6)),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agent=AGENTS, others=st.dictionaries(
    st.sampled_from(["x-app", "originator", "x-title"]), AGENTS, max_size=2))
def test_every_suggested_rule_loads_and_matches_only_its_client(
    agent: str, others: dict[str, str]
) -> None:
    fingerprint = {"user-agent": agent, **others} if agent else others
    assert_suggestion_is_sound(fingerprint)


@pytest.mark.parametrize("agent, user_id", [
    ("Yes/1", "yes"), ("null/2", "null"), ("123/4", "123"), ("0x1F/1", "0x1f"),
    ("Zed/0.150.2 (macos)", "zed"),
])
def test_ids_yaml_would_misread_are_quoted(agent: str, user_id: str) -> None:
    rule = suggest_rule({"user-agent": agent})
    assert rule is not None
    assert load_suggestion(rule_as_yaml(rule)).mappings.header_patterns[0].user_id == user_id
    assert_suggestion_is_sound({"user-agent": agent})


@pytest.mark.parametrize("agent", [
    "Z\u2028ed/1", "Z\u0085ed/1", "Zed\udcff/1", "\udcffZed/1", "Zed\u2028",
])
def test_no_rule_is_suggested_from_characters_yaml_cannot_keep(agent: str) -> None:
    assert suggest_rule({"user-agent": agent}) is None
    # A clean header beside it still gives a rule.
    rule = suggest_rule({"user-agent": agent, "x-app": "cli"})
    assert rule == {"header": "x-app", "pattern": "^cli$", "user_id": "cli"}


# -- command-line mistakes are not config errors -----------------------------------------

def test_workers_0_is_a_flag_mistake(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("memproxy: {}\n")
    result = memproxy("serve", "--config", str(config), "--workers", "0")
    assert_refused(result, "memproxy: --workers: must be 1 or more, got 0")
    assert "config error" not in result.stderr


def test_a_bad_rule_is_a_flag_mistake() -> None:
    result = memproxy("explain", "--rule", "{pattern: '(', user_id: x}")
    assert_refused(result, "memproxy: --rule[0].pattern: ")
    assert "config error" not in result.stderr


def test_a_bad_base_url_variable_names_the_variable(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("memproxy: {}\n")
    result = check_config(config, env={**os.environ, "LITELLM_BASE_URL": "localhost:1"})
    assert_refused(result, "memproxy: LITELLM_BASE_URL: ")
    assert "config error" not in result.stderr


def test_a_broken_plugin_is_a_plugin_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist = site / "broken_detector-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-detector\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text("[memproxy.detectors]\nbroken = broken_detector\n")
    (site / "broken_detector.py").write_text("raise RuntimeError('this plugin is broken')\n")
    config = tmp_path / "config.yaml"
    config.write_text("memproxy: {}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), str(Path(__file__).resolve().parent.parent)])}
    result = check_config(config, env=env)
    assert_refused(result, "memproxy: plugin error: detector plugin broken")
    assert "this plugin is broken" in result.stderr
    assert "config error" not in result.stderr


def test_a_mistake_in_the_file_still_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("memproxy:\n  port: eighty\n")
    result = check_config(config)
    assert_refused(result, f"memproxy: config error in {config}: memproxy.port: ")
