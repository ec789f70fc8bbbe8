"""Config loading: what a user who makes a mistake sees, and the header-forwarding lint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memproxy.config import ConfigError, load_settings, parse_settings
from memproxy.litellm_lint import goes_through_supermemory, lint

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memproxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


SEED_CONFIG = """\
model_list:
  - model_name: gpt-4
    litellm_params: {model: openai/gpt-4, api_key: os.environ/OPENAI_API_KEY}
user_id_mappings:
  custom_header: "x-memory-user-id"
  header_patterns:
    - header: "user-agent"
      pattern: "Claude Code"
      user_id: "claude-code-user"
    - header: "user-agent"
      pattern: "JetBrains"
      user_id: "jetbrains-user"
  default_user_id: "default"
"""


def test_seed_format_config_loads_unchanged(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SEED_CONFIG))
    assert [p.user_id for p in settings.mappings.header_patterns] == [
        "claude-code-user", "jetbrains-user"]
    assert settings.mappings.custom_header == "x-memory-user-id"
    assert settings.port == 8764
    assert settings.litellm_url == "http://127.0.0.1:8765"


@pytest.mark.parametrize("text, key, hint", [
    ("user_id_mappings:\n  header_patterns:\n    - {header: user-agent, pattern: '(unclosed', "
     "user_id: x}\n", "user_id_mappings.header_patterns[0].pattern", "escape"),
    ("memproxy:\n  prot: 8000\n", "memproxy.prot", "did you mean 'port'"),
    ("memproxy:\n  port: eighty\n", "memproxy.port", "0 to 65535"),
    ("memproxy:\n  timeouts:\n    connect: -1\n", "memproxy.timeouts.connect", "positive"),
    ("memproxy:\n  max_body_size: lots\n", "memproxy.max_body_size", "256MiB"),
    ("memproxy:\n  litellm_url: localhost:8765\n", "memproxy.litellm_url", "http://"),
    ("memproxy:\n  log:\n    format: xml\n", "memproxy.log.format", "json"),
    ("memproxy:\n  detectors:\n    default:\n      priority: high\n",
     "memproxy.detectors.default.priority", "whole number"),
    ("user_id_mappings:\n  default_user_id: 'has space'\n", "user_id_mappings.default_user_id",
     "letters, digits"),
    ("user_id_mappings:\n  header_patterns:\n    - {header: user-agent, pattern: x}\n",
     "user_id_mappings.header_patterns[0].user_id", "missing"),
    ("memproxy: [1, 2]\n", "memproxy", "mapping"),
    ("memproxy:\n  event_loop: trio\n", "memproxy.event_loop", "asyncio, uvloop"),
])
def test_config_mistake_names_the_key_and_the_fix(
    tmp_path: Path, text: str, key: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert caught.value.key == key
    assert hint in str(caught.value)


def test_uvloop_without_uvloop_installed_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes find_spec() fail as if absent
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "memproxy:\n  event_loop: uvloop\n"))
    assert caught.value.key == "memproxy.event_loop"
    assert "pip install 'memproxy-llm[uvloop]'" in str(caught.value)


def test_check_config_reports_a_mistake_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "memproxy:\n  prot: 8000\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "memproxy.prot: unknown key" in result.stderr
    assert "did you mean 'port'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "memproxy:\n  port: 1\n   host: x\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "line 3" in result.stderr


def test_environment_references_are_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MP_PORT", "9001")
    monkeypatch.setenv("MP_KEY", "sm-from-env")
    path = write(tmp_path, "memproxy:\n  port: os.environ/MP_PORT\n"
                           "  headers:\n    supermemory_api_key: os.environ/MP_KEY\n")
    settings = load_settings(path)
    assert settings.port == 9001
    assert settings.headers.supermemory_api_key is not None
    assert settings.headers.supermemory_api_key.reveal() == "sm-from-env"


def test_seed_environment_variables_are_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "memproxy:\n  litellm_url: http://127.0.0.1:1111\n")
    monkeypatch.setenv("LITELLM_CONFIG", str(path))
    monkeypatch.setenv("LITELLM_BASE_URL", "http://127.0.0.1:2222/")
    settings = load_settings()
    assert settings.path == path
    assert settings.litellm_url == "http://127.0.0.1:2222"
    assert load_settings(litellm_url="http://10.0.0.1:3333").litellm_url == \
        "http://10.0.0.1:3333"


def test_sizes_accept_units() -> None:
    assert parse_settings({"memproxy": {"max_body_size": "10MB"}}).max_body_size == 10_000_000
    assert parse_settings({"memproxy": {"max_body_size": "1 MiB"}}).max_body_size == 1024**2
    assert parse_settings({"memproxy": {"max_body_size": 512}}).max_body_size == 512


SUPERMEMORY_MODEL = """\
  - model_name: claude
    litellm_params:
      model: anthropic/claude
      api_base: https://api.supermemory.ai/v3/api.anthropic.com
"""
GLOBAL_FORWARDING = "general_settings:\n  forward_client_headers_to_llm_api: true\n"


def with_models(*entries: str) -> str:
    """SEED_CONFIG (one plain OpenAI model, gpt-4) with more model_list entries."""
    return SEED_CONFIG.replace("user_id_mappings:", "".join(entries) + "user_id_mappings:")


def forwarding_for(*models: str) -> str:
    return ("litellm_settings:\n  model_group_settings:\n"
            f"    forward_client_headers_to_llm_api: [{', '.join(models)}]\n")


@pytest.fixture
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """memproxy takes its Supermemory key from the environment when the config has none."""
    monkeypatch.delenv("SUPERMEMORY_API_KEY", raising=False)


@pytest.mark.parametrize("api_base, routed", [
    ("https://api.supermemory.ai/v3/api.anthropic.com", True),
    ("https://API.SUPERMEMORY.AI/v3/https://api.openai.com/v1", True),
    ("http://127.0.0.1:8080/v3/api.anthropic.com", True),  # a local stand-in for the router
    ("http://router.internal/v3/api.openai.com/v1", True),
    ("https://api.openai.com/v1", False),
    ("http://127.0.0.1:8080/v3/", False),
    ("http://127.0.0.1:8080/v3/anthropic", False),
    ("http://[::1", False),
    (None, False),
    ("os.environ/MP_TEST_API_BASE", True),
])
def test_which_models_go_through_supermemory(
    monkeypatch: pytest.MonkeyPatch, api_base: str | None, routed: bool
) -> None:
    monkeypatch.setenv("MP_TEST_API_BASE", "https://api.supermemory.ai/v3/api.anthropic.com")
    assert goes_through_supermemory(api_base) is routed


def test_lint_warns_when_litellm_would_drop_the_user_id_header(
    tmp_path: Path, no_key_in_env: None
) -> None:
    warnings = lint(load_settings(write(tmp_path, with_models(SUPERMEMORY_MODEL))))
    assert len(warnings) == 1
    assert "silently drop x-sm-user-id" in warnings[0]
    assert "requests to claude reach the Supermemory router" in warnings[0]
    assert "forward_client_headers_to_llm_api: [claude]" in warnings[0]
    assert "forward_client_headers_to_llm_api: true" not in warnings[0]
    result = run_cli("check-config", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 0
    assert "WARNING: LiteLLM will silently drop x-sm-user-id" in result.stdout


def test_lint_is_quiet_when_forwarding_reaches_the_supermemory_models(
    tmp_path: Path, no_key_in_env: None
) -> None:
    for forwarding in (GLOBAL_FORWARDING, forwarding_for("claude")):
        config = with_models(SUPERMEMORY_MODEL) + forwarding
        assert lint(load_settings(write(tmp_path, config))) == [], forwarding


def test_lint_names_models_left_out_of_a_per_model_forwarding_list(
    tmp_path: Path, no_key_in_env: None
) -> None:
    second = SUPERMEMORY_MODEL.replace("name: claude", "name: claude-2")
    text = with_models(SUPERMEMORY_MODEL, second) + forwarding_for("claude")
    warnings = lint(load_settings(write(tmp_path, text)))
    assert len(warnings) == 1
    assert "requests to claude-2 reach the provider without x-sm-user-id" in warnings[0]
    # gpt-4 is not listed either, and rightly so: it does not go through Supermemory.
    assert "gpt-4" not in warnings[0].split("\n")[0]


@pytest.mark.parametrize("key_from", ["config", "environment"])
def test_lint_warns_when_global_forwarding_sends_the_supermemory_key_to_other_providers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_from: str
) -> None:
    config = with_models(SUPERMEMORY_MODEL) + GLOBAL_FORWARDING
    if key_from == "config":
        monkeypatch.delenv("SUPERMEMORY_API_KEY", raising=False)
        config += "memproxy:\n  headers:\n    supermemory_api_key: sm-from-config\n"
    else:
        monkeypatch.setenv("SUPERMEMORY_API_KEY", "sm-from-env")
    warnings = lint(load_settings(write(tmp_path, config)))
    assert len(warnings) == 1
    first_line = warnings[0].split("\n")[0]
    assert "providers of gpt-4 receive your Supermemory key and x-sm-user-id" in first_line
    assert "claude" not in first_line
    assert "forward_client_headers_to_llm_api: [claude]" in warnings[0]
    assert "extra_headers: {x-supermemory-api-key: os.environ/SUPERMEMORY_API_KEY}" in warnings[0]
    assert "supermemory_api_key: null" in warnings[0]
    assert "sm-from" not in warnings[0]


def test_lint_lets_memproxy_send_the_key_when_only_supermemory_models_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPERMEMORY_API_KEY", "sm-from-env")
    demo = ("  - model_name: demo\n    litellm_params: {model: openai/demo, "
            "mock_response: hi}\n")
    safe = with_models(SUPERMEMORY_MODEL, demo) + forwarding_for("claude", "demo")
    assert lint(load_settings(write(tmp_path, safe))) == []
    leaky = with_models(SUPERMEMORY_MODEL) + forwarding_for("claude", "gpt-4")
    warnings = lint(load_settings(write(tmp_path, leaky)))
    assert len(warnings) == 1
    assert "providers of gpt-4 receive your Supermemory key" in warnings[0]
    assert "take gpt-4 off the forwarding list" in warnings[0]


def test_lint_warns_when_no_model_goes_through_supermemory(
    tmp_path: Path, no_key_in_env: None
) -> None:
    for forwarding in ("", GLOBAL_FORWARDING, forwarding_for("gpt-4")):
        warnings = lint(load_settings(write(tmp_path, SEED_CONFIG + forwarding)))
        assert len(warnings) == 1, forwarding
        assert "No model in model_list goes through the Supermemory memory router" \
            in warnings[0]


def test_bundled_config_keeps_memory_locally_and_sends_no_provider_memory_headers() -> None:
    env = {**os.environ, "SUPERMEMORY_API_KEY": "sm-in-the-environment"}
    result = run_cli("check-config", "--config", str(ROOT / "config.yaml"), env=env)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stdout
    assert "1. explicit_header" in result.stdout

    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert raw["memproxy"]["memory"]["backend"] == "local"
    # No provider gets client headers, the Supermemory key or the memory user id, but for
    # the demo provider on this machine (its answers show the memory space).
    assert "forward_client_headers_to_llm_api" not in (raw.get("general_settings") or {})
    forwarded = raw["litellm_settings"]["model_group_settings"][
        "forward_client_headers_to_llm_api"]
    demo_port = raw["memproxy"]["demo_provider"]["port"]
    bases = {m["model_name"]: m["litellm_params"].get("api_base") for m in raw["model_list"]}
    assert forwarded == ["memproxy-demo", "memproxy-demo-claude"]
    assert all(bases[name].startswith(f"http://127.0.0.1:{demo_port}") for name in forwarded)
    assert not [m for m in raw["model_list"]
                if goes_through_supermemory(m["litellm_params"].get("api_base"))
                or m["litellm_params"].get("extra_headers")]
    # memproxy sends no key of its own, even with the variable set.
    assert raw["memproxy"]["headers"]["supermemory_api_key"] is None


@pytest.mark.parametrize("agent, expected", [
    ("claude-cli/2.0.14 (external, cli)", "claude-code"),
    ("claude-cli/2.1.197 (external, sdk-cli)", "claude-code"),
    ("OpenAIClientImpl/Java", "jetbrains"),
    ("OpenAIClientAsyncImpl/Java", "jetbrains"),
    ("codex_cli_rs/0.50.0 (Mac OS 15.0; arm64)", "codex"),
    ("codex_exec/0.50.0 (Linux; x86_64)", "codex"),
    ("OpenAI/Python 1.99.0", "openai-python"),
    ("AsyncOpenAI/Python 1.99.0", "openai-python"),
    ("Anthropic/Python 0.60.0", "anthropic-python"),
    ("curl/8.5.0", "curl"),
    ("Bun/1.2.0", "default"),
])
def test_bundled_patterns_match_what_real_clients_send(agent: str, expected: str) -> None:
    result = run_cli("explain", "--config", str(ROOT / "config.yaml"), "-H", f"User-Agent: {agent}")
    assert result.returncode == 0, result.stderr
    assert f"user id:  {expected}\n" in result.stdout


def test_every_config_key_is_documented_in_the_reference() -> None:
    from memproxy.__main__ import format_reference
    from memproxy.config import reference

    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert format_reference() in documented, (
        "docs/configuration.md is out of date: paste in the output of "
        "'python -m memproxy check-config --keys'")
    for key, _, meaning in reference():
        assert meaning, f"{key} has no help text"
