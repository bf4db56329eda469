"""nox sessions for sam2-qbench. All sessions share one virtualenv (.venv) so that torch (about
5.5 GB) installs once; a stamp file records what was installed, and a second invocation with the
same pins and pyproject.toml reinstalls nothing.

    nox -s suite -- smoke [dotted.key=value ...]
    nox -s report -- smoke
    nox -s search -- proxy_search [--workers N]
    nox -s tests
    nox -s lint
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
PY = str(BIN / "python")
# What CI and the embedded default install. GPU users may preinstall their own CUDA torch builds in
# .venv (QBENCH_TORCH="" skips these pins).
TORCH = os.environ.get("QBENCH_TORCH", "torch==2.14.1 torchvision==0.29.1").split()
SAM2 = "sam2==1.1.0"

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]


def _stamp() -> str:
    h = hashlib.sha256()
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(" ".join([*TORCH, SAM2, sys.version]).encode())
    return h.hexdigest()


def _env(session: nox.Session) -> None:
    """Create .venv and install the project into it, unless the stamp says it is already done."""
    stamp = VENV / ".qbench-installed"
    if stamp.is_file() and stamp.read_text() == _stamp():
        return
    if not (BIN / "python").exists():
        session.run(sys.executable, "-m", "venv", str(VENV), external=True)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if TORCH:
        session.run(*pip, *TORCH, external=True)
    # sam2's sdist builds a CUDA extension in an isolated env by default; the extension only
    # fills mask holes, so build it off and against the torch installed above.
    session.run(*pip, "--no-build-isolation", SAM2, env={"SAM2_BUILD_CUDA": "0"}, external=True)
    session.run(*pip, "-e", ".[test]", external=True)
    stamp.write_text(_stamp())


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU only), one pytest-xdist worker per core (at most 4; QBENCH_TEST_WORKERS
    sets it, 0 runs in this process), each test file on one worker so that its fixtures build once.
    `nox -s tests -- -m "not e2e"` leaves out the end-to-end process runs."""
    _env(session)
    workers = os.environ.get("QBENCH_TEST_WORKERS", str(min(4, os.cpu_count() or 1)))
    session.run(PY, "-m", "pytest", "-n", workers, "--dist", "loadfile", *session.posargs, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    _env(session)
    session.run(PY, "-m", "ruff", "check", ".", external=True)
    session.run(PY, "-m", "ruff", "format", "--check", ".", external=True)


def _harness(session: nox.Session, command: str) -> None:
    if not session.posargs:
        session.error(f"usage: nox -s {command} -- SUITE_NAME [dotted.key=value ...]")
    _env(session)
    session.run(PY, "-m", "harness", command, *session.posargs, external=True)


@nox.session
def suite(session: nox.Session) -> None:
    """Run a suite: `nox -s suite -- NAME [dotted.key=value ...]` (resumable)."""
    _harness(session, "suite")


@nox.session
def report(session: nox.Session) -> None:
    """Tables and figures of a suite's recorded runs: `nox -s report -- NAME [dotted.key=value ...]`."""
    _harness(session, "report")


@nox.session
def search(session: nox.Session) -> None:
    """An Optuna search from a suite's `search:` section: `nox -s search -- NAME [--workers N]` (resumable)."""
    _harness(session, "search")


@nox.session
def gpu_check(session: nox.Session) -> None:
    """The GPU path in one call (harness/gpu_check.py): benches, rehearsal, DDP; needs CUDA."""
    _env(session)
    session.run(PY, "-m", "harness.gpu_check", *session.posargs, external=True)
