"""install.sh on a bare machine: no `python` on the PATH, no activated environment, a system Python
that refuses pip installs (PEP 668). It must pick the active environment when there is one, else
this checkout's .venv, and a second run must install nothing."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.launch import ROOT as HELPERS_ROOT

ROOT = Path(HELPERS_ROOT)
VENV = ROOT / ".venv"
BARE_PATH = "PATH=/usr/bin:/bin"


def _bare(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run install.sh with nothing but a system PATH, a fresh HOME and `env`."""
    extra = [f"{k}={v}" for k, v in env.items()]
    return subprocess.run(["env", "-i", BARE_PATH, f"HOME={tmp_path}", *extra, "bash", str(ROOT / "install.sh"),
                           *args], capture_output=True, text=True, timeout=900)


def _print_python(tmp_path, **env: str) -> str:
    proc = _bare(tmp_path, "--print-python", **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
def test_print_python_follows_the_active_environment(tmp_path):
    assert _print_python(tmp_path) == str(VENV / "bin" / "python")
    assert _print_python(tmp_path, VIRTUAL_ENV="/opt/env") == "/opt/env/bin/python"
    assert _print_python(tmp_path, CONDA_PREFIX="/opt/conda") == "/opt/conda/bin/python"
    assert _print_python(tmp_path, PYTHON="/opt/py/bin/python3", VIRTUAL_ENV="/opt/env") == "/opt/py/bin/python3"
    # A virtual environment first on the PATH, not activated (a container's ENV PATH=/venv/bin:...).
    venv = tmp_path / "path-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert _print_python(tmp_path, PATH=f"{venv}/bin:/usr/bin:/bin") == str(venv / "bin" / "python")


def _install_state() -> dict:
    """What a reinstall or a re-created .venv would change: every distribution's METADATA and the
    environment's pyvenv.cfg (inode and mtime)."""
    site = Path(sysconfig.get_paths()["purelib"])
    state = {p.name: (p / "METADATA").stat().st_mtime_ns for p in site.glob("*.dist-info")}
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    state["pyvenv.cfg"] = (cfg.stat().st_ino, cfg.stat().st_mtime_ns)
    return state


@pytest.mark.slow
def test_install_on_a_bare_path_uses_the_repo_venv_and_installs_nothing(tmp_path):
    if Path(sys.prefix).resolve() != VENV.resolve():
        pytest.skip(f"the tests run from {sys.prefix}, not this checkout's .venv (as CI's fresh clone does)")
    before = _install_state()
    proc = _bare(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    version = "%d.%d.%d" % sys.version_info[:3]
    assert f"[install] Python {version}: {VENV}/bin/python (this repository's .venv)" in proc.stdout, out
    assert "[install] already installed, nothing to do" in proc.stdout, out
    assert "[install] megatron-mmbert ready (megatron-core 0.16.1)" in proc.stdout, out
    assert _install_state() == before, "the second install.sh run changed the environment"
