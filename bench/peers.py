"""Provision peer merge tools in isolated virtualenvs under bench/.work/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work"
MERGEKIT_VENV = WORK / "venv-mergekit"
MERGEKIT_VERSION = "0.1.5"
# Pinned and installed first: an unpinned resolve from mergekit's requirements
# would pull a multi-GB CUDA build of torch.
TORCH_VERSION = "2.13.0"


def mergekit_yaml(venv: Path = MERGEKIT_VENV) -> Path:
    return venv / "bin" / "mergekit-yaml"


def mergekit_version(venv: Path = MERGEKIT_VENV) -> str:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    mk, torch = out.stdout.split()
    return f"mergekit {mk} (torch {torch})"


def ensure_mergekit(venv: Path = MERGEKIT_VENV, version: str = MERGEKIT_VERSION) -> Path:
    """Create the mergekit virtualenv (mergekit `version`) if needed and return the
    mergekit-yaml path. Each version gets its own folder, so benchmarks pinned to
    different releases never reinstall over each other."""
    exe = mergekit_yaml(venv)
    if not exe.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
        subprocess.run([*pip, f"mergekit=={version}"], check=True)
    subprocess.run([str(exe), "--help"], check=True, capture_output=True)
    return exe


if __name__ == "__main__":
    print(ensure_mergekit())
    print(mergekit_version())
