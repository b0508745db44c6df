"""The benchmark scripts' Python packages: from the system where it has them, else from PyPI into
target/bench-venv, into which the calling script then re-runs itself."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent.parent / "target" / "bench-venv"


def ensure(*modules):
    """Imports `modules` (PyPI names equal to module names) or installs them into the venv and
    re-executes the calling script there."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if not missing:
        return
    py = VENV / "bin" / "python3"
    if os.environ.get("BENCH_IN_VENV"):
        sys.exit(f"{', '.join(missing)} still missing inside {VENV}")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *missing], check=True)
    os.environ["BENCH_IN_VENV"] = "1"
    os.execv(str(py), [str(py), *sys.argv])
