"""A DeepSpeed op build killed mid-way must not hang every later learner start.

torch guards JIT builds with a bare `lock` file; a SIGKILLed builder leaves it behind and
the next DeepSpeed start waits on it forever (a fresh-clone suite hung so in RMLearner.init).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r2m_ray.actors.distributed import load_cpu_comm_op


def test_a_stale_build_lock_is_cleared_not_waited_on(tmp_path: Path) -> None:
    built = load_cpu_comm_op()  # the real op, in the user's cache (built once, ~45 s)
    if built is None:
        pytest.skip("DeepSpeed has no shared-memory comm op on this accelerator")
    assert any(built.glob("*.so"))
    ext = tmp_path / "extensions"
    shutil.copytree(built, ext / built.name)  # an up-to-date build in a cache of its own
    lock = ext / built.name / "lock"
    lock.touch()  # what a builder killed mid-way leaves
    code = "from r2m_ray.actors.distributed import load_cpu_comm_op; print(load_cpu_comm_op())"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    # without the guard this waits on the lock until the timeout
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(ext / built.name)
    assert not lock.exists()
    assert any((ext / built.name).glob("*.so"))
