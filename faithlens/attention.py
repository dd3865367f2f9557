"""Reads and steers attention through transformers' attention-function interface.

Every model loaded by faithlens runs its attention through :func:`faithlens_attention`, registered
under the name ``"faithlens"``. On an ordinary forward pass it is a pass-through to SDPA, so generation
keeps the fused kernels. Two optional keyword arguments, threaded by transformers from ``model(...)``
down to each attention call, switch on our extras:

* ``faithlens_probe``: an :class:`AttentionProbe` (one sequence) or a :class:`BatchProbe` (one per
  row of a right-padded batch) that reads query and key (after RoPE) of selected layers and
  accumulates per-head metric vectors in row chunks, never holding an N×N map of all layers
  (spec §1). It reads detached tensors, so it can ride on a training forward pass.
* ``faithlens_key_bias``: a ``(batch, keys)`` float tensor added to the pre-softmax scores of every
  layer, head and query row (AtMan suppression, spec §7). It may require grad.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from faithlens.slicing import checkpoint

ATTN_IMPLEMENTATION = "faithlens"


def faithlens_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    probe: AttentionProbe | BatchProbe | None = kwargs.pop("faithlens_probe", None)
    key_bias: torch.Tensor | None = kwargs.pop("faithlens_key_bias", None)
    if key_bias is not None:
        attention_mask = with_key_bias(attention_mask, key_bias, query, key)
    if probe is not None:
        probe.observe(module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install(model: torch.nn.Module) -> None:
    """Route ``model``'s attention through :func:`faithlens_attention`."""
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, faithlens_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def _additive_mask(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The attention mask as an additive float tensor ``(B|1, 1|H, q_len, k_len)``.

    ``None`` means plain causal attention; queries are the last ``q_len`` of the ``k_len`` keys.
    """
    neg = torch.finfo(dtype).min
    if attention_mask is None:
        rows = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        cols = torch.arange(k_len, device=device)[None, :]
        mask = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(cols > rows, neg)
        return mask[None, None]
    if attention_mask.dtype == torch.bool:
        zeros = torch.zeros((), dtype=dtype, device=device)
        return torch.where(attention_mask, zeros, torch.tensor(neg, dtype=dtype, device=device))
    return attention_mask.to(dtype)


def with_key_bias(
    attention_mask: torch.Tensor | None, key_bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """Fold a per-key additive bias into the attention mask (an additive float mask for SDPA)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    mask = _additive_mask(attention_mask, q_len, k_len, query.dtype, query.device)
    bias = key_bias[:, :k_len].to(query.dtype)[:, None, None, :]
    return mask + bias


@dataclass
class AttentionProbe:
    """Streams per-head metric vectors out of one scoring forward pass (batch size 1).

    For each observed layer and head it keeps, over response rows t (positions ≥ ``response_start``):

    * ``distance[h]``: Σ_t Σ_s A[t,s]·(t−s), the numerator of the mean backward distance d (spec §2);
    * ``waad[h, t]``: Σ_s A[t,s]·min(t−s, W) (spec §3, per head);
    * ``fai_sum[h, s]``: Σ_{t∈T(s)} A[t,s], the numerator of FAI (spec §4, per head).

    Everything is linear in A, so group means are taken afterwards from these vectors. Rows are
    processed ``row_chunk`` at a time, bounded by ``memory_budget_bytes``.
    """

    layers: list[int]
    response_start: int
    window: int = 10
    h_lo: int = 10
    h_hi: int | None = 100
    memory_budget_bytes: int = 256 * 2**20
    distance: dict[int, torch.Tensor] = field(default_factory=dict)
    waad: dict[int, torch.Tensor] = field(default_factory=dict)
    fai_sum: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None = None,
    ) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer not in self.layers:
            return
        if query.shape[0] != 1 or query.shape[-2] != key.shape[-2]:
            raise ValueError("AttentionProbe needs one full sequence per forward pass (batch 1, no KV cache)")
        with torch.no_grad():
            self._observe(
                layer, query[0].detach().float(), key[0].detach().float(), attention_mask, scaling, softcap
            )

    def _observe(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
    ) -> None:
        n_heads, n = q.shape[0], q.shape[1]
        k = k.repeat_interleave(n_heads // k.shape[0], dim=0)  # GQA: head h reads kv head h // n_rep
        scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
        p = self.response_start
        self.distance[layer] = torch.zeros(n_heads, dtype=torch.float64, device=q.device)
        self.waad[layer] = torch.zeros(n_heads, n - p, dtype=torch.float32, device=q.device)
        self.fai_sum[layer] = torch.zeros(n_heads, n, dtype=torch.float32, device=q.device)
        chunk = self.row_chunk(n_heads, n)
        for r0 in range(p, n, chunk):
            checkpoint()  # a row chunk is one unit of work (faithlens.slicing)
            r1 = min(n, r0 + chunk)
            rows_mask = None if attention_mask is None else attention_mask[0, :, r0:r1, :r1]
            probs = self._attention_rows(q[:, r0:r1], k[:, :r1], rows_mask, r0, scale, softcap)
            self._accumulate(layer, probs, r0, r1)

    def row_chunk(self, n_heads: int, n: int) -> int:
        """Rows per chunk: about four float32 (heads × rows × keys) temporaries fit the budget."""
        per_row = 4 * 4 * n_heads * max(n, 1)
        return max(1, min(n, self.memory_budget_bytes // per_row))

    @staticmethod
    def _attention_rows(
        q: torch.Tensor,
        k: torch.Tensor,
        rows_mask: torch.Tensor | None,
        r0: int,
        scale: float,
        softcap: float | None,
    ) -> torch.Tensor:
        """Post-softmax attention of query rows r0.. over keys 0..r1-1, shape (heads, rows, r1)."""
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        r1 = k.shape[-2]
        if rows_mask is None:
            rows = torch.arange(r0, r0 + q.shape[-2], device=q.device)[:, None]
            cols = torch.arange(r1, device=q.device)[None, :]
            scores.masked_fill_(cols > rows, float("-inf"))
        elif rows_mask.dtype == torch.bool:
            scores.masked_fill_(~rows_mask, float("-inf"))
        else:
            scores.add_(rows_mask.float())
        return torch.softmax(scores, dim=-1)

    def _accumulate(self, layer: int, probs: torch.Tensor, r0: int, r1: int) -> None:
        device = probs.device
        t = torch.arange(r0, r1, device=device, dtype=torch.float32)
        s = torch.arange(r1, device=device, dtype=torch.float32)
        # d: Σ_s A[t,s](t−s) = t − Σ_s A[t,s]·s, since rows sum to one.
        mean_key = torch.matmul(probs, s)  # (H, rows)
        self.distance[layer] += (t[None, :] - mean_key).sum(-1, dtype=torch.float64)
        # WAAD: only the last W keys weigh less than W, so WAAD = W − Σ_{t−s<W} A[t,s](W − (t−s)).
        w = self.window
        c0 = max(0, r0 - w + 1)
        lag = t[:, None] - s[None, c0:]
        short = (w - lag).clamp(min=0) * (lag >= 0)
        p = self.response_start
        self.waad[layer][:, r0 - p : r1 - p] = w - (probs[:, :, c0:] * short).sum(-1)
        # FAI numerator: column sums over rows t with H_lo ≤ t−s ≤ H_hi.
        hi = r1 if self.h_hi is None else self.h_hi
        col_lo, col_hi = max(0, r0 - hi), r1 - self.h_lo  # columns any row of the chunk can reach
        if col_hi <= col_lo:
            return
        lag = t[:, None] - s[None, col_lo:col_hi]
        band = (lag >= self.h_lo) & (lag <= hi)
        self.fai_sum[layer][:, col_lo:col_hi] += (probs[:, :, col_lo:col_hi] * band).sum(-2)


@dataclass
class BatchProbe:
    """One :class:`AttentionProbe` per row of a padded batch: row b holds its ``lengths[b]`` tokens at
    positions ``starts[b]`` on (0 when ``starts`` is None: right padding).

    A row's real tokens attend only to each other (padding is masked), so each probe sees its own
    sequence as an unpadded pass would; this lets a trainer read γ's metrics off its own forward pass.
    ``starts`` serves TRL's layout (left-padded prompt, right-padded completion), where a row's tokens
    begin after its prompt's left padding.
    """

    probes: list[AttentionProbe]
    lengths: list[int]
    starts: list[int] | None = None
    seconds: float = 0.0  # time spent observing: what the probe adds to the pass it rides on

    def observe(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None = None,
    ) -> None:
        if query.shape[0] != len(self.probes):
            raise ValueError(f"BatchProbe holds {len(self.probes)} rows, the batch has {query.shape[0]}")
        started = time.perf_counter()
        starts = self.starts or [0] * len(self.probes)
        for b, (probe, n, s) in enumerate(zip(self.probes, self.lengths, starts, strict=True)):
            rows_mask = None
            if attention_mask is not None:
                rows_mask = attention_mask[min(b, attention_mask.shape[0] - 1), None, :, s : s + n, s : s + n]
            query_b, key_b = query[b : b + 1, :, s : s + n], key[b : b + 1, :, s : s + n]
            probe.observe(module, query_b, key_b, rows_mask, scaling, softcap)
        self.seconds += time.perf_counter() - started
