"""Shared fixtures: the real embedded fast model, loaded once per session, offline; a local
two-node Ray cluster for the Ray tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from thinklab.config import ModelSpec  # noqa: E402


@pytest.fixture(scope="session")
def fast_backend():
    """The transformers backend on the embedded SmolLM2-135M-Instruct (materialized once)."""
    # Loaded outside the runner's cache: a test that runs another model through the runner
    # replaces (and closes) the cached backend, which must not be this shared one.
    from thinklab.backends import load_backend

    backend = load_backend(ModelSpec(name="default", backend="hf"))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def chat_prompts(fast_backend):
    """Token-id prompts of different lengths (so the batch is left-padded)."""
    tok = fast_backend.tokenizer
    questions = [
        "What is 7 + 5?",
        "Name three colors of the rainbow and explain where rainbows come from.",
        "Is 91 a prime number? Think it through.",
        "Write one sentence about the sea.",
    ]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster: a head and a second node joined with `ray start --address`, both on
    127.0.0.1 with one CPU each; yields the head's address and stops both after the module."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    temp = Path(f"/tmp/ray_t{os.getpid()}")  # Ray's socket paths must stay short
    common = ["--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    try:
        for cmd in ([ray_bin, "start", "--head", "--port", str(port), "--include-dashboard=false",
                     "--temp-dir", str(temp), *common],
                    [ray_bin, "start", "--address", f"127.0.0.1:{port}", *common]):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            if res.returncode != 0:
                pytest.fail(f"{' '.join(cmd[1:3])} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Temporary data and figures folders (inherited by notebook kernels and Ray actors); the
    materialized models are shared read-only."""
    from thinklab import models, paths

    real_models = paths.models_dir()
    data = tmp_path / "data"
    data.mkdir()
    if models.is_materialized("default"):
        (data / "models").symlink_to(real_models, target_is_directory=True)
    monkeypatch.setenv("THINKLAB_DATA", str(data))
    monkeypatch.setenv("THINKLAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path
