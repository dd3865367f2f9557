"""Sampling on the device, for a whole batch of rows in tensor ops: nothing here reads a value back.

Per row: greedy (temperature below :data:`GREEDY_BELOW`, as in vLLM) or temperature + nucleus sampling;
EOS masked out of what is sampled before ``min_new_tokens`` (HF's ``MinNewTokensLogitsProcessor``); the
chosen token's log-prob and, when any row asks, the top :data:`TOP_LOGPROBS_MAX` log-probs, all from the
model's raw distribution (vLLM reports raw log-probs too).

Randomness is counter-based: a row's noise for its n-th token is a hash of (its seed, n, vocabulary
index), computed on the device (:func:`uniform`). So a seeded request samples the same tokens whatever
batch it shares and whichever slot it sits in, there is no generator object per row to step on the host,
and a CUDA graph can hold the whole sampler. Sampling is Gumbel-max: ``argmax(z + g)`` with
``g = -log(-log(u))`` draws from ``softmax(z)`` exactly. A request without a seed gets a random one when
it joins.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from faithlens.params import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures this small are greedy (as in vLLM); dividing by them overflows
TOP_LOGPROBS_MAX = 20  # OpenAI's limit; a step that reports top log-probs reports this many per row

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit avalanche multiplier (< 2**27, so x * _MIX never leaves int64)
_GOLDEN = 0x9E3779B1  # spreads consecutive vocabulary indices over 32 bits


@dataclass(frozen=True)
class SamplerFlags:
    """Which parts of the sampler a step needs: each combination is its own (compiled, captured) step,
    so a greedy batch never pays for sorting or noise."""

    sampled: bool = False
    nucleus: bool = False
    top_logprobs: int = 0  # 0 or TOP_LOGPROBS_MAX

    @classmethod
    def of(cls, rows: Iterable[tuple[SamplingParams, int]]) -> SamplerFlags:
        """The flags for rows given as (params, top log-probs asked for)."""
        sampled = nucleus = top = False
        for params, num_top in rows:
            hot = params.temperature >= GREEDY_BELOW
            sampled |= hot
            nucleus |= hot and params.top_p < 1
            top |= num_top > 0
        return cls(sampled, nucleus, TOP_LOGPROBS_MAX if top else 0)


@dataclass
class RowSampling:
    """Each slot's sampling parameters and token counter, as device tensors allocated once."""

    temperature: torch.Tensor  # (S,) float32
    top_p: torch.Tensor  # (S,) float32
    seed: torch.Tensor  # (S,) int64 in [0, 2**63)
    min_new: torch.Tensor  # (S,) int64
    count: torch.Tensor  # (S,) int64: tokens sampled so far (the RNG counter)

    @classmethod
    def allocate(cls, slots: int, device: torch.device) -> RowSampling:
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(slots, dtype=dtype, device=device)

        return cls(
            zeros(torch.float32), torch.ones(slots, device=device), *(zeros(torch.long) for _ in range(3))
        )

    def rows(self, start: int, stop: int) -> RowSampling:
        return RowSampling(*(t[start:stop] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.temperature, self.top_p, self.seed, self.min_new, self.count

    def set(self, slot: int, params: SamplingParams, seed: int) -> None:
        """A joining request's parameters (host writes; no read)."""
        self.temperature[slot] = params.temperature
        self.top_p[slot] = params.top_p
        self.seed[slot] = seed
        self.min_new[slot] = params.min_new_tokens
        self.count[slot] = 0


def request_seed(params: SamplingParams) -> int:
    """The row's RNG seed: the request's own (any int a client sends, OpenAI allows negatives), else random."""
    return secrets.randbits(63) if params.seed is None else params.seed % 2**63


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(B, vocab)`` float32 in (0, 1): a hash of (seed, counter, column), independent across rows,
    counters and columns, and the same for the same inputs on any batch."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    key = _mix32(_mix32(_mix32(lo) ^ hi) ^ (counter & _M32))
    second = _mix32(key ^ 0x5BD1E995)
    columns = (torch.arange(vocab, device=seed.device, dtype=torch.long) * _GOLDEN) & _M32
    return unit_interval(_mix32(_mix32(key[:, None] ^ columns[None, :]) ^ second[:, None]))


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32 hash bits as a float32 strictly inside (0, 1). 23 bits, so the largest value, 1 - 2**-24, is
    exact in float32: with 24, 2**24 - 0.5 rounds to 2**24 and u = 1 gives infinite Gumbel noise (a
    random token, or NaN on a masked one)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def nucleus(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``z`` with the tokens outside each row's nucleus set to -inf; the top token always stays, and rows
    with ``top_p`` 1 keep every token (a float32 cumulative sum can reach 1 before the tail)."""
    probs = torch.softmax(z, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) | (top_p >= 1)[:, None]
    return z.masked_fill(~keep, float("-inf"))


@dataclass
class Sampled:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32, the raw log-prob of each token
    top_ids: torch.Tensor  # (B, k) int64, k = flags.top_logprobs (0: empty)
    top_logprobs: torch.Tensor  # (B, k) float32

    def packed(self) -> torch.Tensor:
        """One float32 tensor ``(B, 2 + 2k)``: token, log-prob, top ids, top log-probs, so the host reads
        the step's result in one copy. Token ids are exact in float32 below 2**24."""
        return torch.cat(
            [
                self.tokens.to(torch.float32)[:, None],
                self.logprobs[:, None],
                self.top_ids.to(torch.float32),
                self.top_logprobs,
            ],
            dim=1,
        )


def sample(logits: torch.Tensor, rows: RowSampling, eos: torch.Tensor, flags: SamplerFlags) -> Sampled:
    """Choose one token per row of ``logits`` (B, V). ``eos`` is a (V,) bool mask of end tokens."""
    raw = logits.float()
    logp = torch.log_softmax(raw, dim=-1)
    suppress = (rows.count < rows.min_new)[:, None] & eos[None, :]
    scores = raw.masked_fill(suppress, float("-inf"))
    tokens = scores.argmax(dim=-1)
    if flags.sampled:
        hot = rows.temperature >= GREEDY_BELOW
        z = scores / rows.temperature.clamp_min(GREEDY_BELOW)[:, None]
        if flags.nucleus:
            z = nucleus(z, rows.top_p)
        noise = -torch.log(-torch.log(uniform(rows.seed, rows.count, z.shape[-1])))
        tokens = torch.where(hot, (z + noise).argmax(dim=-1), tokens)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    if flags.top_logprobs:
        top_logprobs, top_ids = logp.topk(flags.top_logprobs, dim=-1)
    else:
        top_ids = tokens.new_empty(tokens.shape[0], 0)
        top_logprobs = logp.new_empty(tokens.shape[0], 0)
    return Sampled(tokens, chosen, top_ids, top_logprobs)
