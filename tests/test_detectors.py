"""Which memory space a request lands in, and in which order detectors are asked."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from memproxy import ClientRequest, Detection, DetectorContext, DetectorSpec, hookimpl
from memproxy.config import ConfigError, parse_settings
from memproxy.detection import (
    Decision,
    DetectorChain,
    PluginError,
    RejectedRequest,
    build_detector_chain,
)
from tests.helpers import FakeLiteLLM, ProxyFactory

SECRET = "a-test-secret-of-enough-length"
PATTERNS = [
    {"header": "user-agent", "pattern": "^claude-cli/", "user_id": "claude-code"},
    {"header": "user-agent", "pattern": "^OpenAIClient(Async)?Impl/Java", "user_id": "jetbrains"},
    {"header": "x-app", "pattern": "^cli$", "user_id": "x-app-cli"},
]


def chain_for(config: dict[str, Any], *plugins: object) -> DetectorChain:
    return build_detector_chain(parse_settings(config), extra_plugins=plugins,
                                entry_points=False)


def detect(chain: DetectorChain, **headers: str) -> Decision:
    items = CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items())
    return chain.detect_user(ClientRequest(CIMultiDictProxy(items)))


BASE: dict[str, Any] = {"user_id_mappings": {"header_patterns": PATTERNS}}


def test_builtin_chain_runs_explicit_then_patterns_then_default() -> None:
    chain = chain_for(BASE)
    assert [(link.name, link.priority) for link in chain.links] == [
        ("explicit_header", 100), ("header_patterns", 80), ("default", 0)]


def test_explicit_header_beats_every_pattern() -> None:
    decision = detect(chain_for(BASE), x_memory_user_id="alice",
                      user_agent="claude-cli/2.0.14 (external, cli)")
    assert (decision.user_id, decision.detector) == ("alice", "explicit_header")


@pytest.mark.parametrize("agent, expected", [
    ("claude-cli/2.0.14 (external, cli)", "claude-code"),
    ("claude-cli/2.1.197 (external, sdk-cli)", "claude-code"),
    ("claude-cli/2.1.197 (external, claude-vscode)", "claude-code"),
    ("OpenAIClientImpl/Java 2.1.0", "jetbrains"),
    ("OpenAIClientAsyncImpl/Java", "jetbrains"),
    ("CLAUDE-CLI/1.0", "claude-code"),  # patterns are case-insensitive
])
def test_patterns_recognise_real_client_user_agents(agent: str, expected: str) -> None:
    decision = detect(chain_for(BASE), user_agent=agent)
    assert (decision.user_id, decision.detector) == (expected, "header_patterns")


def test_patterns_match_any_header_not_only_user_agent() -> None:
    assert detect(chain_for(BASE), x_app="cli").user_id == "x-app-cli"


def test_unrecognised_client_gets_the_default_user() -> None:
    config = {"user_id_mappings": {"header_patterns": PATTERNS, "default_user_id": "shared"}}
    decision = detect(chain_for(config), user_agent="Mozilla/5.0")
    assert (decision.user_id, decision.detector) == ("shared", "default")


@pytest.mark.parametrize("value", ["a" * 129, "alice\r\nx-evil: 1", "bob smith", "é", "",
                                   "tab\tid"])
def test_unusable_explicit_id_is_refused_not_passed_on(value: str) -> None:
    with pytest.raises(RejectedRequest, match="x-memory-user-id"):
        detect(chain_for(BASE), x_memory_user_id=value)


def test_custom_explicit_header_name_from_config() -> None:
    chain = chain_for({"user_id_mappings": {"custom_header": "X-Who"}})
    assert detect(chain, x_who="carol").user_id == "carol"
    assert detect(chain, x_memory_user_id="carol").user_id == "default"


def hashed(key: str, secret: str = SECRET, length: int = 16, prefix: str = "key-") -> str:
    return prefix + hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()[:length]


API_HASH: dict[str, Any] = {"memproxy": {"detectors": {"api_key_hash": {
    "enabled": True, "options": {"secret": SECRET}}}}}


def test_api_key_hash_is_off_unless_enabled() -> None:
    decision = detect(chain_for({}), authorization="Bearer sk-one")
    assert decision.detector == "default"


@pytest.mark.parametrize("header, value", [
    ("authorization", "Bearer sk-one"), ("x_api_key", "sk-one"), ("api_key", "sk-one"),
])
def test_api_key_hash_gives_each_key_its_own_stable_id(header: str, value: str) -> None:
    decision = detect(chain_for(API_HASH), **{header: value})
    assert (decision.user_id, decision.detector) == (hashed("sk-one"), "api_key_hash")
    # Another replica with the same secret gives the same id; another key does not.
    assert detect(chain_for(API_HASH), **{header: value}).user_id == hashed("sk-one")
    assert detect(chain_for(API_HASH), x_api_key="sk-two").user_id == hashed("sk-two")


def test_api_key_hash_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROXY_HASH_SECRET", "another-secret-0123456789")
    config = {"memproxy": {"detectors": {"api_key_hash": {
        "enabled": True, "options": {"prefix": "u-", "length": 32}}}}}
    decision = detect(chain_for(config), x_api_key="sk-one")
    assert decision.user_id == hashed("sk-one", "another-secret-0123456789", 32, "u-")


def test_api_key_hash_without_a_secret_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MEMPROXY_HASH_SECRET", raising=False)
    with pytest.raises(ConfigError, match="MEMPROXY_HASH_SECRET") as caught:
        chain_for({"memproxy": {"detectors": {"api_key_hash": {"enabled": True}}}})
    assert caught.value.key == "memproxy.detectors.api_key_hash.options.secret"


def test_config_priority_reorders_the_chain() -> None:
    config = {"user_id_mappings": {"header_patterns": PATTERNS},
              "memproxy": {"detectors": {"header_patterns": {"priority": 150}}}}
    chain = chain_for(config)
    assert chain.links[0].name == "header_patterns"
    decision = detect(chain, x_memory_user_id="alice", user_agent="claude-cli/2.0.14")
    assert decision.user_id == "claude-code"


def test_disabled_detector_is_skipped() -> None:
    config = {"user_id_mappings": {"header_patterns": PATTERNS},
              "memproxy": {"detectors": {"explicit_header": {"enabled": False}}}}
    chain = chain_for(config)
    assert "explicit_header" not in [link.name for link in chain.links]
    assert detect(chain, x_memory_user_id="alice").user_id == "default"


def test_unknown_detector_in_config_names_the_installed_ones() -> None:
    with pytest.raises(ConfigError, match=r"installed detectors: .*header_patterns") as caught:
        chain_for({"memproxy": {"detectors": {"header_patern": {"priority": 1}}}})
    assert caught.value.key == "memproxy.detectors.header_patern"


def test_unknown_detector_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        chain_for({"memproxy": {"detectors": {"api_key_hash": {
            "enabled": True, "options": {"secret": SECRET, "lenght": 8}}}}})
    assert caught.value.key == "memproxy.detectors.api_key_hash.options.lenght"


class TeamPlugin:
    """A third-party detector: the x-team header, with its own options."""

    @hookimpl
    def memproxy_detectors(self) -> list[DetectorSpec]:
        def build(ctx: DetectorContext):  # type: ignore[no-untyped-def]
            prefix = ctx.options.get("prefix", "team-")

            def detect(headers: CIMultiDictProxy[str]) -> Detection | None:
                team = headers.get("x-team")
                return Detection(prefix + team, "x-team header") if team else None

            return detect

        return [DetectorSpec(name="team", priority=90, build=build, description="x-team")]


def test_third_party_detector_is_placed_by_its_priority() -> None:
    chain = chain_for(BASE, TeamPlugin())
    assert [link.name for link in chain.links] == [
        "explicit_header", "team", "header_patterns", "default"]
    decision = detect(chain, x_team="red", user_agent="claude-cli/2.0")
    assert (decision.user_id, decision.detector) == ("team-red", "team")


def test_third_party_detector_gets_its_options_and_priority_from_config() -> None:
    config = {"memproxy": {"detectors": {"team": {"priority": 10,
                                                  "options": {"prefix": "t:"}}}}}
    chain = chain_for(config, TeamPlugin())
    assert [link.name for link in chain.links] == [
        "explicit_header", "header_patterns", "team", "default"]
    assert detect(chain, x_team="blue").user_id == "t:blue"


def test_detector_answer_that_is_not_a_valid_id_is_ignored() -> None:
    chain = chain_for({}, TeamPlugin())
    decision = detect(chain, x_team="red\r\nx-evil: 1")
    assert decision.detector == "default"


def test_detector_that_raises_is_skipped() -> None:
    class Broken:
        @hookimpl
        def memproxy_detectors(self) -> list[DetectorSpec]:
            def build(ctx: DetectorContext):  # type: ignore[no-untyped-def]
                def detect(headers: CIMultiDictProxy[str]) -> str:
                    raise RuntimeError("boom")
                return detect
            return [DetectorSpec(name="broken", priority=500, build=build)]

    assert detect(chain_for({}, Broken())).detector == "default"


@pytest.mark.parametrize("returned, message", [
    (["not a spec"], "must return DetectorSpec objects"),
    (None, "must return a list"),
    ([DetectorSpec(name="default", priority=1, build=lambda ctx: lambda h: None)],
     "declared by both"),
    ([DetectorSpec(name="bad name", priority=1, build=lambda ctx: lambda h: None)],
     "identifier"),
    ([DetectorSpec(name="p", priority="high", build=lambda ctx: lambda h: None)],  # type: ignore[arg-type]
     "whole number"),
    ([DetectorSpec(name="nb", priority=1, build=lambda ctx: "not callable")],  # type: ignore[arg-type,return-value]
     "must return a function"),
])
def test_plugin_breaking_the_contract_stops_startup_naming_it(
    returned: object, message: str
) -> None:
    class Bad:
        @hookimpl
        def memproxy_detectors(self) -> object:
            return returned

    with pytest.raises(PluginError, match=message) as caught:
        chain_for({}, Bad())
    assert "Bad" in str(caught.value) or "plugin" in str(caught.value)


def test_plugin_with_a_misspelt_hook_stops_startup() -> None:
    class Typo:
        @hookimpl
        def memproxy_detector(self) -> list[DetectorSpec]:
            return []

    with pytest.raises(PluginError, match="memproxy_detector"):
        chain_for({}, Typo())


async def test_detection_through_the_proxy_end_to_end(
    proxy: ProxyFactory, fake_litellm: FakeLiteLLM
) -> None:
    client = await proxy(user_id_mappings={"header_patterns": PATTERNS}, **API_HASH)
    cases = [
        ({"x-memory-user-id": "alice", "User-Agent": "claude-cli/2.0"}, "alice"),
        ({"User-Agent": "OpenAIClientImpl/Java"}, "jetbrains"),
        ({"Authorization": "Bearer sk-zzz"}, hashed("sk-zzz")),
        ({}, "default"),
    ]
    for headers, expected in cases:
        resp = await client.post("/v1/chat/completions", data=b"{}", headers=headers)
        assert resp.status == 200
        assert fake_litellm.last.all("x-sm-user-id") == [expected]
