"""The one place the tests start processes from: the repository root, the environment a child gets,
a free port, and one launcher (its own session, the whole group killed afterwards) that
``pretrain_mmbert.py`` runs, torchrun workers and tool CLIs all go through.

Every test that launches a process (through these helpers or otherwise) is marked
``@pytest.mark.slow``; tests/conftest.py fails a test that launches one unmarked.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def subprocess_env(**extra: str) -> Dict[str, str]:
    """This environment plus the source tree on PYTHONPATH, one OpenMP thread (the processes share
    two cores) and no warnings; ``extra`` adds or replaces variables."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process(cmd: Sequence[str], *, timeout: int = 300, env: Optional[Dict[str, str]] = None,
                cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end (or ``timeout``) in its own session, then SIGKILL what is left of the
    group -- a SIGKILLed trainer leaves megatron-core's multiprocessing Manager behind, holding our
    output -- and return its exit status, stdout and stderr (text)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), env=env if env is not None else subprocess_env(), stdout=out,
                                stderr=err, text=True, start_new_session=True, cwd=cwd)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, rc, out.read(), err.read())


def torchrun_command(nproc: int, script: str, *args: str) -> list:
    """``python -m torch.distributed.run`` with ``nproc`` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), script, *args]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc`` when it exited 0; else an AssertionError with its output's tail and the first
    traceback (the cause; later ones are peers noticing the crash)."""
    if proc.returncode != 0:
        err = proc.stderr
        first = err.find("Traceback")
        raise AssertionError(f"exit {proc.returncode}: {' '.join(map(str, proc.args))[:300]}\n"
                             f"{proc.stdout[-3000:]}\n{err[max(first, 0):][:6000]}")
    return proc


def launch(config: str, *overrides: str, nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run pretrain_mmbert.py on ``config`` (``nproc=0``: a plain single process; else torchrun with
    gloo over ``nproc`` processes)."""
    script = os.path.join(ROOT, "pretrain_mmbert.py")
    cmd = torchrun_command(nproc, script) if nproc else [sys.executable, script]
    return run_process(cmd + ["--config", config, *overrides], timeout=timeout)


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600,
             env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` under torchrun with ``nproc`` CPU processes (gloo); ``env``
    adds variables for the workers. Fails with the first traceback when a worker fails."""
    proc = run_process(torchrun_command(nproc, os.path.join(ROOT, "tests", "workers", script), *args),
                       timeout=timeout, env=subprocess_env(**(env or {})))
    try:
        return check(proc)
    except AssertionError as e:
        raise AssertionError(f"torchrun {script} failed: {e}") from None
