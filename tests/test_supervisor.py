"""The LiteLLM child process, without LiteLLM: what a user sees when it is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memproxy import supervisor
from memproxy.supervisor import LiteLLMStartError, find_litellm


def test_missing_litellm_says_how_to_install_it_or_use_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(supervisor.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LiteLLMStartError) as caught:
        find_litellm()
    message = str(caught.value)
    assert "pip install 'memproxy[litellm]'" in message
    assert "serve --litellm-url" in message


def test_litellm_beside_the_running_python_is_preferred(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "litellm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(supervisor.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_litellm() == str(fake)


def test_start_proxies_is_the_start_command_under_its_old_name() -> None:
    script = Path(sys.executable).parent / "start-proxies"
    if not script.exists():
        pytest.skip("memproxy is not installed as a package here")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--litellm-port" in result.stdout
    assert "--memoryproxy-port" in result.stdout
