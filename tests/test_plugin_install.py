"""Third-party detectors installed with pip are found through their entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "memproxy-openwebui"


def memproxy(*args: str, path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "memproxy", *args, "--config",
                           str(ROOT / "config.yaml")], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Open WebUI plugin, pip-installed into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(PLUGIN)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def test_installed_plugin_is_discovered_and_placed_by_its_priority(
    installed_plugin: Path,
) -> None:
    result = memproxy("check-config", path=installed_plugin)
    assert result.returncode == 0, result.stderr
    chain = [line.split()[1] for line in result.stdout.splitlines()
             if line.strip()[:2] in {f"{i}." for i in range(1, 10)}]
    assert chain == ["explicit_header", "openwebui", "header_patterns", "default"]
    assert "[plugin openwebui]" in result.stdout


def test_installed_plugin_decides_the_user(installed_plugin: Path) -> None:
    result = memproxy("explain", "-H", "X-OpenWebUI-User-Id: 7F3A-11",
                      "-H", "User-Agent: OpenAI/Python 1.99", path=installed_plugin)
    assert result.returncode == 0, result.stderr
    assert "user id:  openwebui-7f3a-11" in result.stdout
    assert "detector: openwebui" in result.stdout


def test_plugin_that_fails_to_import_stops_startup_naming_it(tmp_path: Path) -> None:
    dist = tmp_path / "memproxy_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: memproxy-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[memproxy.detectors]\nbroken = no_such_module_xyz\n")
    result = memproxy("check-config", path=tmp_path)
    assert result.returncode == 2
    assert "memproxy-broken" in result.stderr
    assert "no_such_module_xyz" in result.stderr
    assert "Traceback" not in result.stderr
