"""The command line: explain, and help for every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_explain_says_who_decided_and_why() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memproxy", "explain", "--config",
         str(Path(__file__).parent.parent / "config.yaml"),
         "-H", "User-Agent: claude-cli/2.0.14 (external, cli)",
         "-H", "X-Claude-Code-Session-Id: 42-abc"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "user id:  claude-code" in result.stdout
    assert "detector: header_patterns" in result.stdout
    assert "why:      user-agent matches '^claude-cli/'" in result.stdout
    assert "x-sm-conversation-id: 42-abc" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["check-config", "--help"],
                                  ["explain", "--help"]])
def test_every_command_has_help(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "memproxy", *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: memproxy" in result.stdout
