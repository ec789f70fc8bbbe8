"""Configs that load without an error yet send every client to the default memory space.

Each test does what a newcomer did: misspell a section, run from another folder,
misspell a detector's name, and checks that memproxy says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from memproxy.config import ConfigError, load_settings, section_warnings
from memproxy.detection import build_detector_chain
from tests.helpers import FakeLiteLLM, ServeFactory

ROOT = Path(__file__).resolve().parent.parent
PATTERN = "    - {header: user-agent, pattern: '^codex_', user_id: codex}\n"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command line, with no $LITELLM_CONFIG to find a config by."""
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)  # run from another folder, memproxy is still importable
    return subprocess.run([sys.executable, "-m", "memproxy", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


@pytest.mark.parametrize("text, typo, meant", [
    ("user_id_mapping:\n  header_patterns:\n" + PATTERN, "user_id_mapping", "user_id_mappings"),
    ("User_Id_Mappings:\n  header_patterns:\n" + PATTERN, "User_Id_Mappings",
     "user_id_mappings"),
    ("user_id_mappings:\n  header_patterns:\n" + PATTERN + "memproxi:\n  unidentified: refuse\n",
     "memproxi", "memproxy"),
])
def test_check_config_warns_about_a_misspelt_section_instead_of_saying_ok(
    tmp_path: Path, text: str, typo: str, meant: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model_list: []\n" + text)
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"top-level key '{typo}' is not read" in result.stdout
    assert f"did you mean '{meant}'?" in result.stdout
    assert "\nok" not in result.stdout


def test_a_pattern_list_that_lost_its_indentation_is_named() -> None:
    warnings = section_warnings({"user_id_mappings": None, "header_patterns": []})
    assert warnings == ["top-level key 'header_patterns' is not read: it belongs inside "
                        "user_id_mappings (indent it under 'user_id_mappings:')"]


def test_litellm_sections_and_unrelated_keys_are_not_taken_for_misspellings() -> None:
    keys = ["model_list", "general_settings", "litellm_settings", "router_settings",
            "environment_variables", "callback_settings", "guardrails", "mcp_servers",
            "credential_list", "vector_store_registry", "files_settings", "search_tools",
            "prompts", "include", "memory", "proxy", "user_id_mappings", "memproxy", 1]
    assert section_warnings(dict.fromkeys(keys)) == []


def test_check_config_names_the_file_and_lists_the_patterns() -> None:
    result = run_cli("check-config", "--config", str(ROOT / "config.yaml"), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"config: {ROOT / 'config.yaml'}\n" in result.stdout
    patterns = result.stdout.split("2. header_patterns")[1].split("3. default")[0]
    assert "- user-agent ~ '^claude-cli/' -> claude-code" in patterns
    assert "- user-agent ~ '^curl/' -> curl" in patterns
    assert result.stdout.rstrip().endswith("ok")


def test_commands_run_from_another_folder_say_no_config_was_found(tmp_path: Path) -> None:
    check = run_cli("check-config", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "config: none found: built-in defaults" in check.stdout
    assert "(no patterns: it recognises no client)" in check.stdout
    assert f"WARNING: no config file found: no --config, $LITELLM_CONFIG is not set, and " \
           f"{tmp_path} has no config.yaml" in check.stdout
    assert "\nok" not in check.stdout

    explain = run_cli("explain", "-H", "User-Agent: codex_cli_rs/0.50.0", cwd=tmp_path)
    assert explain.returncode == 0, explain.stderr
    assert explain.stdout.startswith("config:   none found: built-in defaults\n")
    assert "user id:  default\n" in explain.stdout
    assert "WARNING: no config file found" in explain.stderr


def test_explain_warns_when_no_pattern_is_configured(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("user_id_mappings:\n  default_user_id: shared\n")
    result = run_cli("explain", "--config", str(config), "-H", "User-Agent: Zed/1.0")
    assert result.returncode == 0, result.stderr
    assert f"config:   {config}\n" in result.stdout
    assert f"WARNING: no user_id_mappings.header_patterns in {config}" in result.stderr
    assert "every client shares the memory space 'shared'" in result.stderr


def warnings_logged(out: str) -> list[str]:
    """The ``config_warning`` messages among memproxy's JSON log lines."""
    return [event["message"] for event in map(json.loads, out.splitlines())
            if event["event"] == "config_warning"]


def test_serve_logs_the_warnings_at_start_up(
    tmp_path: Path, fake_litellm: FakeLiteLLM, serve_memproxy: ServeFactory
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("user_id_mapping:\n  header_patterns:\n" + PATTERN)
    process = serve_memproxy(config, fake_litellm.url)
    warnings = warnings_logged(process.stop(timeout=30)[0])
    assert len(warnings) == 2, warnings
    assert "did you mean 'user_id_mappings'?" in warnings[0]
    assert "no user_id_mappings.header_patterns" in warnings[1]


def test_a_reload_logs_the_warnings_of_the_config_it_loaded(
    tmp_path: Path, fake_litellm: FakeLiteLLM, serve_memproxy: ServeFactory
) -> None:
    good = "user_id_mappings:\n  header_patterns:\n" + PATTERN
    (tmp_path / "config.yaml").write_text(good)
    process = serve_memproxy(tmp_path / "config.yaml", fake_litellm.url)
    (tmp_path / "config.yaml").write_text(good + "memproxi:\n  unidentified: refuse\n")
    reloaded = httpx.post(f"http://127.0.0.1:{process.port}/memory-routing/reload", timeout=10)
    assert reloaded.json()["reloaded"] is True
    # None at start-up (that config was fine); the reloaded one's, once.
    assert warnings_logged(process.stop(timeout=30)[0]) == [
        "top-level key 'memproxi' is not read by memproxy nor by LiteLLM, so its settings are "
        "ignored: did you mean 'memproxy'?"]


def test_a_misspelt_detector_name_gets_the_closest_installed_one(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("memproxy:\n  detectors:\n    api_key_hashing: {enabled: true}\n")
    with pytest.raises(ConfigError) as caught:
        build_detector_chain(load_settings(config))
    assert caught.value.key == "memproxy.detectors.api_key_hashing"
    assert caught.value.fix.startswith("did you mean 'api_key_hash'? installed detectors: ")
