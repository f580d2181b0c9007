"""How a token is chosen from logits, and what is traced about the distribution it came from.

Per step, for a batch of b rows and a vocabulary of V:
  logits (b, V) -> temperature, top-k, top-p -> log-probabilities (b, V)
  token   = inverse CDF of exp(logp) at the row's next uniform (its own random stream)
  entropy = -sum p log p over the processed distribution, logprob = logp[token]
At temperature 0 the token is the argmax and entropy/logprob describe the raw (T=1)
distribution, since the sampled one is a point mass. Every sum runs in an order that does
not depend on the number of rows, so a sample's trace is the same bits in any batch.
"""

from __future__ import annotations

import math

import torch

from thinklab.config import SamplingSpec


def process_logits(logits: torch.Tensor, sampling: SamplingSpec) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from. (B, V) float32 -> (B, V)."""
    return torch.log_softmax(sampling_logits(logits, sampling), dim=-1)


def sampling_logits(logits: torch.Tensor, sampling: SamplingSpec) -> torch.Tensor:
    """The logits whose softmax tokens are drawn from: divided by the temperature (none at
    temperature 0, where the argmax is taken), top-k and top-p masked to -inf."""
    x = logits.float()
    if sampling.temperature == 0:
        return x
    if sampling.temperature != 1:
        x = x / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= sampling.top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, -math.inf)
    return x


def sample_inverse_cdf(p: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One token per row of probabilities p (b, V) from uniforms u (b,) in [0, 1): the first
    token whose cumulative mass exceeds u times the row's total mass.

    Cumulative sums are float64 (a float32 running sum over 150k tokens drifts by ~1e-5,
    which would misweight rare tokens). To keep that cheap the search is two-level: float64
    totals of blocks of `block` tokens locate the block, then a float64 cumulative sum
    inside that one block locates the token. Tokens of zero probability have empty
    intervals and are never drawn."""
    b, V = p.shape
    pad = (-V) % block
    blocks = (torch.nn.functional.pad(p, (0, pad)) if pad else p).view(b, -1, block)
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # (b, blocks)
    total = block_cdf[:, -1:].contiguous()
    x = u[:, None].to(torch.float64) * total
    # First block whose cumulative mass exceeds x; never past the last block with any mass.
    bi = torch.minimum(torch.searchsorted(block_cdf, x, right=True), torch.searchsorted(block_cdf, total))
    before = torch.where(bi > 0, block_cdf.gather(-1, (bi - 1).clamp_min(0)), torch.zeros_like(x))
    inner = blocks[torch.arange(b, device=p.device), bi.squeeze(-1)].to(torch.float64).cumsum(dim=-1) + before
    ti = torch.searchsorted(inner, x, right=True)
    ti = torch.minimum(ti, torch.searchsorted(inner, inner[:, -1:].contiguous()))  # rounding guard
    return (bi * block + ti).squeeze(-1)


def row_sums(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The sum of each row of x (b, V), added in an order that does not depend on b: within
    blocks of `block` columns, then across blocks. (`x.sum(-1)` splits a lone row across
    threads but not the rows of a batch, so a sample's entropy would change in its last
    bits with the number of rows decoding beside it.)"""
    b, V = x.shape
    pad = (-V) % block
    blocks = (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(b, -1, block)
    return blocks.sum(dim=-1).sum(dim=-1)


def entropy_from_logp(logp: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities (p = exp(logp) if already computed);
    masked (-inf) entries count 0."""
    p = logp.exp() if p is None else p
    return -row_sums(p * logp.clamp_min(torch.finfo(logp.dtype).min))


def choose_tokens(logits: torch.Tensor, sampling: SamplingSpec, u: torch.Tensor | None, native=None):
    """(token, logprob, entropy) per row of raw logits (b, V): the token drawn at the row's
    uniform u (b,) float64 by inverse CDF, or the argmax when u is None, traced over the
    distribution it was drawn from. `native`: the native kernels, whose fused pass does
    the same (native/sampling.cpp)."""
    if native is not None:
        return native.trace_and_sample(sampling_logits(logits, sampling), u)
    logp = process_logits(logits, sampling)  # (b, V)
    p = logp.exp()
    tok = logp.argmax(dim=-1) if u is None else sample_inverse_cdf(p, u)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1), entropy_from_logp(logp, p)
