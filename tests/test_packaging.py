"""What a user gets from ``pip install memproxy-llm``, and the systemd unit example.

The distribution is called ``memproxy-llm``: the name ``memproxy`` on the package index belongs
to an unrelated project, so ``pip install memproxy`` would install that instead. The import
name and ``python -m memproxy`` stay ``memproxy``.

The wheel is built from a copy of the sources (so the checkout gets no build/ or egg-info
folder) and installed with ``--no-deps`` into a fresh virtualenv made by ``python -m venv``. Its
runtime dependencies (aiohttp, PyYAML, ...) are not downloaded again: a ``.pth`` file in the
new venv appends the site-packages folders of the Python running the tests. That keeps the
test to a few seconds and lets it pass offline, while memproxy itself still comes from the
wheel alone (the tests check that ``memproxy.__file__`` lies inside the new venv, and they run
it from a scratch folder with no ``PYTHONPATH``, so the checkout cannot stand in for it).
"""

from __future__ import annotations

import configparser
import grp
import inspect
import json
import os
import pwd
import re
import shutil
import site
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from memproxy import __version__
from memproxy.__main__ import GRACE_SECONDS
from memproxy.supervisor import LiteLLMSupervisor

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "memproxy-llm"
UNIT = ROOT / "examples" / "memproxy.service"
STEP_TIMEOUT = 180


@dataclass
class Installed:
    wheel: Path
    venv: Path
    scratch: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=STEP_TIMEOUT, cwd=self.scratch, env=env)


def _run(argv: list[str | Path], cwd: Path | None = None) -> None:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=STEP_TIMEOUT, cwd=cwd)
    assert result.returncode == 0, f"{argv[:4]} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in ("setup.cfg", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "memproxy", source / "memproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--no-build-isolation", "-w", wheels, source])
    [wheel] = wheels.glob("*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv])
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet",
          "--disable-pip-version-check", "--no-index", "--no-deps", wheel])

    # The runtime dependencies, from the Python running the tests (see the module docstring).
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, timeout=STEP_TIMEOUT).stdout.strip()
    ours = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(purelib) / "zz_test_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in ours if Path(path).is_dir()))

    scratch = base / "scratch"
    scratch.mkdir()
    return Installed(wheel=wheel, venv=venv, scratch=scratch)


def test_wheel_has_the_new_name_and_the_package_data(installed: Installed) -> None:
    assert installed.wheel.name.startswith("memproxy_llm-"), installed.wheel.name
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = wheel.read(metadata).decode()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    assert re.search(r"^Name: memproxy-llm$", headers, re.MULTILINE), headers[:300]
    assert f"\nVersion: {__version__}\n" in headers
    assert {"memproxy/__init__.py", "memproxy/status_page.html", "memproxy/py.typed"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "plugins/"))]
    assert "memproxy = memproxy.__main__:main" in scripts


def test_installed_distribution_is_memproxy_llm_and_comes_from_the_wheel(
    installed: Installed,
) -> None:
    probe = (
        "import importlib.metadata as m, importlib.resources as r, json, memproxy\n"
        "d = m.distribution('memproxy-llm')\n"
        "print(json.dumps({'name': d.metadata['Name'], 'version': d.version,\n"
        "  'module': memproxy.__file__,\n"
        "  'page': len(r.files('memproxy').joinpath('status_page.html').read_text()),\n"
        "  'typed': r.files('memproxy').joinpath('py.typed').is_file(),\n"
        "  'recorded': str(d.locate_file('memproxy/status_page.html'))}))\n"
    )
    result = installed.run(installed.python, "-c", probe)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["name"] == DIST_NAME
    assert found["version"] == __version__
    assert Path(found["module"]).is_relative_to(installed.venv), found["module"]
    assert Path(found["recorded"]).is_relative_to(installed.venv), found["recorded"]
    assert found["page"] > 1000
    assert found["typed"] is True


def test_python_dash_m_memproxy_version(installed: Installed) -> None:
    result = installed.run(installed.python, "-m", "memproxy", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"memproxy {__version__}"


def test_console_script_help(installed: Installed) -> None:
    result = installed.run(installed.venv / "bin" / "memproxy", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: memproxy")
    for command in ("serve", "start", "check-config", "explain"):
        assert command in result.stdout


def test_plugin_example_depends_on_the_distribution_name() -> None:
    ours = configparser.ConfigParser()
    ours.read(ROOT / "setup.cfg")
    assert ours["metadata"]["name"] == DIST_NAME
    plugin = configparser.ConfigParser()
    plugin.read(ROOT / "plugins" / "memproxy-openwebui" / "setup.cfg")
    requires = plugin["options"]["install_requires"].split()
    assert requires == [DIST_NAME]


def test_no_install_hint_names_the_unrelated_memproxy_distribution() -> None:
    places = [ROOT / "README.md", ROOT / "config.yaml", *(ROOT / "docs").glob("*.md"),
              *(ROOT / "examples").iterdir(), *(ROOT / "memproxy").rglob("*.py")]
    wrong = re.compile(r"pip install\s+['\"]?memproxy(\[|['\"\s]|$)", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in places
                 if p.is_file() and wrong.search(p.read_text(errors="replace"))]
    assert offenders == []


# --- the systemd unit example -------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_example_stops_gracefully_and_restarts_on_failure() -> None:
    unit = _unit_settings(UNIT.read_text())
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # Only memproxy gets SIGTERM: it drains, then stops LiteLLM itself.
    assert unit["KillMode"] == ["mixed"]
    litellm_stop = inspect.signature(LiteLLMSupervisor).parameters["stop_timeout"].default
    assert float(unit["TimeoutStopSec"][0]) > GRACE_SECONDS + litellm_stop
    [exec_start] = unit["ExecStart"]
    assert re.match(r"^/\S+/bin/python -m memproxy start\b", exec_start), exec_start
    assert unit["NoNewPrivileges"] == ["true"]
    assert unit["ProtectSystem"] == ["strict"]
    # The memory file lives beside config.yaml: that folder must stay writable.
    assert unit["ReadWritePaths"] == unit["WorkingDirectory"]
    assert any("LITELLM_MASTER_KEY" in line for line in UNIT.read_text().splitlines()
               if line.startswith("#"))
    assert unit["EnvironmentFile"]


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


def test_unit_example_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: on Debian or Ubuntu, "
                    "apt-get install systemd")
    folder = tmp_path / "srv"
    folder.mkdir()
    env_file = tmp_path / "memproxy.env"
    env_file.write_text("LITELLM_MASTER_KEY=sk-test-not-a-real-key\n")
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    python = Path(sys.executable)  # a real interpreter, so verify can check ExecStart

    text = UNIT.read_text()
    replacements = {
        r"^User=.*$": f"User={user}",
        r"^Group=.*$": f"Group={group}",
        r"^WorkingDirectory=.*$": f"WorkingDirectory={folder}",
        r"^ReadWritePaths=.*$": f"ReadWritePaths={folder}",
        r"^EnvironmentFile=.*$": f"EnvironmentFile={env_file}",
        r"^ExecStart=\S+": f"ExecStart={python}",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, lambda _m, v=value: v, text, flags=re.MULTILINE)
        assert count == 1, pattern
    unit = tmp_path / "memproxy.service"
    unit.write_text(text)

    result = _verify(unit)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify only warns (exit 0) about unknown keys and bad values: none may name this unit.
    complaints = [line for line in output.splitlines() if "memproxy.service" in line]
    assert complaints == [], output

    # The check is real: the same unit with a missing ExecStart binary is refused.
    broken = tmp_path / "broken" / "memproxy.service"
    broken.parent.mkdir()
    broken.write_text(text.replace(f"ExecStart={python}", "ExecStart=/nonexistent/python"))
    assert _verify(broken).returncode != 0
