"""benchmarks/gpu_check.py on a host without CUDA: every check skips with the reason, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: run benchmarks/gpu_check.py itself")
def test_without_cuda_every_check_skips_and_the_script_exits_0():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])]
    assert [line.split()[1] for line in lines] == list(gpu_check.CHECKS)
    assert all(line.startswith("SKIP") and "no CUDA device" in line for line in lines), done.stdout
    assert "all skipped: no CUDA device" in done.stdout


def test_an_unknown_check_is_refused_with_the_valid_names():
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "tpu-bf16"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "tpu-bf16" in done.stderr and "vllm-exact" in done.stderr
