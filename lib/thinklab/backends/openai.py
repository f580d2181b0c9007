"""The OpenAI-compatible backend: the `Backend` contract over a running server's /v1/completions.

For a model already served by vLLM (`vllm serve`, any `--data-parallel-size`), SGLang, the
llama.cpp server or anything else that speaks the completions API. Each sample is one
request: the prompt as token ids, its own `seed`, the stop strings, and `logprobs=K`.
Requests go out from a bounded thread pool (`max_concurrency`, which changes how fast,
not what comes back: every request carries its own seed), and a request that meets a 429,
a 5xx or a dropped connection is retried with exponential backoff.

What this module needs from the server beyond the OpenAI fields, all of them vLLM's
(SGLang accepts the same names; see docs/scale.md for the llama.cpp server):
  - `return_token_ids` (or `return_tokens_as_token_ids`): the generated token ids, so the
    rows hold the exact tokens and budget forcing can continue from them;
  - `include_stop_str_in_output` and `stop_reason`: the matched stop string stays in the
    tokens and is named, as the other backends do;
  - `top_k`, `skip_special_tokens`.

`token_logprob` is the server's own log-probability of each token; `token_entropy` is
estimated from the top-K (`thinklab.backends.entropy.topk_entropy`, as the vLLM backend
does). Which distribution those describe is the server's setting (vLLM: `--logprobs-mode`,
`raw_logprobs` by default, i.e. before temperature; `processed_logprobs` matches
backend="vllm"); the backend records that it cannot see it.

The tokenizer is loaded locally through `thinklab.models.resolve(spec.name)`; it must be
the served model's. The API key comes from THINKLAB_OPENAI_API_KEY or OPENAI_API_KEY and
is never written anywhere. This module knows nothing about tasks, budgets or storage.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Callable, Sequence

import numpy as np

from thinklab import models
from thinklab.backends.base import Backend, BackendInfo, Completion
from thinklab.backends.entropy import ENTROPY_ESTIMATORS, topk_entropy
from thinklab.config import ModelSpec, SamplingSpec

BASE_URL_ENV = "THINKLAB_OPENAI_BASE_URL"
API_KEY_ENVS = ("THINKLAB_OPENAI_API_KEY", "OPENAI_API_KEY")
CONCURRENCY_ENV = "THINKLAB_OPENAI_CONCURRENCY"
PROMPT_FORMATS = ("tokens", "text")
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
MASKED_LOGPROB = -9999.0  # vLLM sends a masked token's -inf (top-k/top-p) as this, JSON having no -inf


class ServerError(RuntimeError):
    """The server refused a request, or kept failing after every retry."""


def _api_key() -> tuple[str | None, str | None]:
    for name in API_KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name], name
    return None, None


def request_json(
    url: str,
    payload: dict | None = None,
    headers: dict | None = None,
    timeout_s: float = 600.0,
    max_retries: int = 6,
    backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """GET (payload None) or POST JSON, retrying 408/409/429/5xx and connection errors.

    The wait before retry i (0-based) is `backoff_s * 2**i` (capped at `max_backoff_s`),
    with up to 10% jitter so that many threads do not retry in step, or the server's
    `Retry-After` seconds when it sends them. Any other HTTP status fails at once with the
    server's message.
    """
    data = None if payload is None else json.dumps(payload).encode()
    hdrs = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    last = ""
    for attempt in range(max_retries + 1):
        req = urllib.request.Request(url, data=data, headers=hdrs, method="GET" if data is None else "POST")
        wait = min(backoff_s * 2**attempt, max_backoff_s) * (1 + 0.1 * random.random())
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:2000]
            if exc.code not in RETRY_STATUS:
                raise ServerError(f"{url} answered HTTP {exc.code}: {body}") from exc
            last = f"HTTP {exc.code}: {body}"
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            if retry_after and retry_after.strip().isdigit():
                wait = min(float(retry_after), max_backoff_s)
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < max_retries:
            sleep(wait)
    raise ServerError(f"{url} still failing after {max_retries + 1} attempts; last error: {last}")


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(
        self,
        spec: ModelSpec,
        base_url: str | None = None,  # None = spec.base_url, then THINKLAB_OPENAI_BASE_URL
        served_model: str | None = None,  # the server's model name; None = picked from /models
        # logprobs=K per request; servers cap it (vLLM: --max-logprobs, 20 by default).
        # None = the spec's entropy_top_k / entropy_estimator where the spec has them, else 20 / "lower".
        entropy_top_k: int | None = None,
        entropy_estimator: str | None = None,  # see topk_entropy
        max_concurrency: int | None = None,  # None = THINKLAB_OPENAI_CONCURRENCY, else 8
        prompt_format: str = "tokens",  # "text" for servers that refuse token-id prompts
        timeout_s: float = 600.0,  # per request
        max_retries: int = 6,
        backoff_s: float = 1.0,
    ):
        super().__init__(spec)
        server_side = {"moe_top_k": spec.moe_top_k, "kv_cache_dtype": spec.kv_cache_dtype,
                       "distributed_executor_backend": spec.distributed_executor_backend,
                       "tensor_parallel_size": spec.tensor_parallel_size if spec.tensor_parallel_size != 1 else None,
                       "pipeline_parallel_size": spec.pipeline_parallel_size if spec.pipeline_parallel_size != 1 else None}
        for key, value in server_side.items():
            if value is not None:
                raise ValueError(f"{key}={value!r} cannot be applied by backend='openai': it is a setting of the server "
                                 "(set it where the model is served) and thinklab cannot check it; leave it at its default")
        url = base_url or spec.base_url or os.environ.get(BASE_URL_ENV)
        if not url:
            raise ValueError(
                f"backend='openai' needs a server: set ModelSpec.base_url (e.g. 'http://127.0.0.1:8000/v1') "
                f"or the {BASE_URL_ENV} environment variable"
            )
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={url!r} is not valid; use an http:// or https:// URL")
        if entropy_top_k is None:
            entropy_top_k = getattr(spec, "entropy_top_k", 20)
            if entropy_top_k is None:
                raise ValueError("entropy_top_k=None (exact entropy) is not available from a server, which returns "
                                 "at most its top-K log-probabilities; use a positive int such as 20")
        entropy_estimator = entropy_estimator or getattr(spec, "entropy_estimator", "lower")
        if entropy_top_k < 1:
            raise ValueError(f"entropy_top_k={entropy_top_k} is not valid; use a positive int (the server's logprobs=K)")
        if entropy_estimator not in ENTROPY_ESTIMATORS:
            raise ValueError(f"entropy_estimator={entropy_estimator!r} is not valid; choose one of {ENTROPY_ESTIMATORS}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r} is not valid; choose one of {PROMPT_FORMATS}")
        if max_concurrency is None:
            raw = os.environ.get(CONCURRENCY_ENV, "8")
            if not raw.isdigit():
                raise ValueError(f"{CONCURRENCY_ENV}={raw!r} is not valid; use a positive int")
            max_concurrency = int(raw)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency} is not valid; use a positive int")
        self.base_url = url.rstrip("/")
        self.entropy_top_k = entropy_top_k
        self.entropy_estimator = entropy_estimator
        self.max_concurrency = max_concurrency
        self.prompt_format = prompt_format
        self._retry = dict(timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s)
        key, self.api_key_env = _api_key()
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="thinklab-openai")

        self.resolved = models.resolve(spec.name)
        from transformers import AutoConfig, AutoTokenizer

        kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path, **kw)
        try:
            self.vocab_size = int(AutoConfig.from_pretrained(self.resolved.path, **kw).vocab_size)
        except (OSError, ValueError, AttributeError, TypeError):
            self.vocab_size = len(self._tokenizer)

        served = [m.get("id") for m in self._get("/models").get("data", [])]
        self.served_model = served_model or self._pick_model(served)
        try:
            self.server_version = self._get("/version", base=self.base_url.removesuffix("/v1")).get("version")
        except ServerError:
            self.server_version = None  # only vLLM has /version

    def _get(self, path: str, base: str | None = None) -> dict:
        return request_json((base or self.base_url) + path, headers=self._headers, **self._retry)

    def _pick_model(self, served: list[str]) -> str:
        """The served name of spec.name: itself, its resolved path, or the one model the server has."""
        for candidate in (self.spec.name, self.resolved.name, self.resolved.path):
            if candidate in served:
                return candidate
        if len(served) == 1:
            return served[0]
        raise ValueError(
            f"{self.base_url} serves {served or 'no models'}; none is {self.spec.name!r}. "
            "Pass served_model=... to OpenAIBackend, or serve the model under that name (vLLM: --served-model-name)"
        )

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def entropy_mode(self) -> str:
        return f"top-{self.entropy_top_k}"

    @property
    def identity(self) -> dict:
        # The server's weights and arithmetic are out of sight: the served model's name and the
        # server's version stand in for the fingerprint and the forward.
        return {"model": self.resolved.name, "fingerprint": f"served:{self.served_model}", "dtype": "server",
                "forward": f"openai-server {self.server_version or 'unknown version'} at {self.base_url}"}

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name,
            entropy_mode=self.entropy_mode,
            entropy_distribution=(
                "the server's log-probabilities, whose distribution is the server's setting and not visible to the "
                "client (vLLM: --logprobs-mode; raw_logprobs by default = softmax(logits) before temperature, top-k "
                "and top-p; processed_logprobs = the distribution sampled from, as backend='vllm'); at temperature 0 "
                "both are the raw softmax(logits). token_logprob is the server's value; token_entropy is estimated "
                f"from the top-{self.entropy_top_k} with the '{self.entropy_estimator}' tail term "
                "(thinklab.backends.entropy.topk_entropy)"
            ),
            extra={
                "base_url": self.base_url,
                "served_model": self.served_model,
                "server_version": self.server_version,
                "vocab_size": self.vocab_size,
                "entropy_estimator": self.entropy_estimator,
                "prompt_format": self.prompt_format,
                "max_concurrency": self.max_concurrency,
                "api_key_from": self.api_key_env,  # the variable's name only
                "rng": "the server's per-request generator seeded with each sample's seed",
            },
        )

    def _payload(self, prompt: Sequence[int], seed: int, sampling: SamplingSpec, max_new_tokens: int,
                 stop: Sequence[str]) -> dict:
        greedy = sampling.temperature == 0
        body = {
            "model": self.served_model,
            "prompt": [int(t) for t in prompt] if self.prompt_format == "tokens"
            else self._tokenizer.decode(list(prompt), skip_special_tokens=False),
            "max_tokens": int(max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": 1.0 if greedy else float(sampling.top_p),
            "logprobs": self.entropy_top_k,
            "n": 1,
            "stream": False,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,  # stop strings match text with special tokens, as in the other backends
            "add_special_tokens": False,  # the prompt already holds the chat template's tokens
        }
        if not greedy:
            body["seed"] = int(seed)
            if sampling.top_k:
                body["top_k"] = int(sampling.top_k)
        if stop:
            body["stop"] = list(stop)
        return body

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        sampling: SamplingSpec,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: bool = True,
    ) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        url = self.base_url + "/completions"

        def one(args):
            prompt, seed = args
            body = self._payload(prompt, seed, sampling, max_new_tokens, stop)
            return self._completion(request_json(url, body, headers=self._headers, **self._retry))

        results = self._pool.map(one, zip(prompts, seeds))  # in order; at most max_concurrency in flight
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(prompts), desc=f"openai {self.served_model}", leave=False)
        return list(results)

    def _completion(self, response: dict) -> Completion:
        choices = response.get("choices") or []
        if len(choices) != 1:
            raise ServerError(f"the server returned {len(choices)} choices for one request (n=1): {str(response)[:500]}")
        choice = choices[0]
        lp = choice.get("logprobs") or {}
        chosen = lp.get("token_logprobs")
        tops = lp.get("top_logprobs")
        if chosen is None or tops is None:
            raise ServerError("the server returned no log-probabilities; it must support the completions 'logprobs' field")
        ids = choice.get("token_ids")
        if ids is None:
            tokens = lp.get("tokens") or []
            if not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
                raise ServerError(
                    "the server returned no token ids (neither 'token_ids' from return_token_ids nor 'token_id:N' "
                    "tokens from return_tokens_as_token_ids); thinklab needs the exact generated tokens"
                )
            ids = [int(t.split(":", 1)[1]) for t in tokens]
        ids = [int(t) for t in ids]
        if not (len(ids) == len(chosen) == len(tops)):
            raise ServerError(f"the server returned {len(ids)} tokens but {len(chosen)} log-probabilities "
                              f"and {len(tops)} top-K lists")
        k = self.entropy_top_k
        rows = np.full((len(ids), k), -np.inf)
        for i, top in enumerate(tops):
            # vLLM adds the chosen token when it is outside the top K, so keep the K largest.
            values = sorted((float(v) for v in (top or {}).values()), reverse=True)[:k]
            if len(values) < min(k, self.vocab_size):
                raise ServerError(
                    f"the server returned {len(values)} top log-probabilities where logprobs={k} was asked; it caps "
                    f"them (vLLM: --max-logprobs; other servers fix a maximum): use entropy_top_k={len(values) or 1}"
                )
            rows[i, : len(values)] = values
        rows[rows <= MASKED_LOGPROB] = -np.inf
        entropy = topk_entropy(rows, self.vocab_size, self.entropy_estimator) if len(ids) else np.zeros(0)
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise ServerError(f"the server ended a request with finish_reason={reason!r}; expected 'stop' or 'length'")
        stop_reason = choice.get("stop_reason")
        return Completion(
            token_ids=ids,
            token_entropy=entropy.astype(np.float32).tolist(),
            token_logprob=np.asarray([np.nan if v is None else v for v in chosen], dtype=np.float32).tolist(),
            finish_reason=reason,
            stop_string=stop_reason if isinstance(stop_reason, str) else None,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["OpenAIBackend", "ServerError", "request_json"]
