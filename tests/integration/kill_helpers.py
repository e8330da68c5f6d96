"""Helpers of the ``kill -9`` tests: kill a saving worker at a random moment, then check that
exactly one saved version and no temporary file is left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["kill_mid_save", "assert_one_version"]


def kill_mid_save(
    argv: list[str], ready: Path, rng: random.Random, kind: str, timeout_s: float
) -> None:
    """Run ``python argv...`` (one thread), wait until it touches ``ready`` (its first save is
    done; it fails the test if the worker dies or ``timeout_s`` passes), sleep a random 0-0.4 s
    of its save loop, then ``SIGKILL`` it and wait for it to end."""
    ready.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *argv], env=env)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        assert proc.poll() is None, f"the {kind} worker died (rc {proc.returncode})"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))  # a random moment of the save loop
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_one_version(saved: Path, n: int) -> None:
    """``saved`` holds exactly one ``v-*`` version and no ``*.tmp`` file (after kill ``n``)."""
    versions = [e for e in os.listdir(saved) if e.startswith("v-")]
    tmp = [e for e in os.listdir(saved) if e.endswith(".tmp")]
    assert len(versions) == 1 and tmp == [], f"kill {n}: leftovers {sorted(os.listdir(saved))}"
