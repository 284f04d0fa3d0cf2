"""What each trained row of the artifact holds (`teacher_logits.capture`), and the per-row
selection of the `top_p` and `sampled` modes on one chunk of the teacher's logits.

- `topk`: the `k` most probable ids (the default).
- `top_p`: the smallest set of most probable ids whose probability (at the capture temperature)
  reaches `p`, capped at `k`: peaked rows store one or two entries, flat rows up to `k`.
- `sampled` (random-sampling KD, Anshumann et al. 2025, "Sparse Logit Sampling"): `draws` ids
  drawn with replacement from the teacher's distribution at `proposal_temperature` (the
  proposal `r`), stored as distinct ids with their counts and their log-probs (as the codec
  keeps them: exact with `raw`, rounded by `logquant_zstd`). With the counts `c_v`,
  `sum_v c_v / n * p_s(v) / r(v) * f(v)` is an estimate of `E_{p_s}[f]`, unbiased up to codec
  rounding, for any training temperature whose log-normalizer the artifact holds (the proposal
  temperature is always among `logz_temperatures`), so the KD gradient is an estimate of the
  full-vocabulary one unbiased up to codec rounding (`core.losses.sampled.SampledWeights`).

Draws are reproducible: row `(sample_id, position)` draws its uniforms from a counter-based
hash of `(seed, sample_id, position, draw index)` (splitmix64), independent of the batch it is
computed in, of the process count and of restarts; a resumed extraction writes identical shards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kd_pipeline.core.params import dataclass_from_params, is_number, require, require_choice, require_int
from kd_pipeline.core.topk_store.codec import CAPTURE_MODES

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CDF_ROWS = 256  # rows per inverse-CDF step
_CDF_BLOCK = 64  # vocabulary entries per block of the two-level inverse CDF


@dataclass(frozen=True)
class CaptureConfig:
    """`teacher_logits.capture`.

    Attributes:
        mode: `topk`, `top_p` or `sampled` (module docstring).
        p: `top_p`: the probability mass each row's set reaches (capped at `teacher_logits.k`).
        draws: `sampled`: draws per row; the artifact's `k` is then `draws` (the most distinct ids
            a row can hold) and `teacher_logits.k` is not used.
        proposal_temperature: `sampled`: the temperature of the distribution drawn from; None =
            the capture temperature (then the estimator's weights at that temperature are the
            plain frequencies `c / n`).
        seed: `sampled`: the draws' seed.
    """

    mode: str = "topk"
    p: float = 0.9
    draws: int = 32
    proposal_temperature: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        what = "teacher_logits.capture"
        require_choice(what, "mode", self.mode, CAPTURE_MODES)
        require(is_number(self.p) and 0 < self.p <= 1, what, "p", "a number in (0, 1]", self.p)
        require_int(what, "draws", self.draws, minimum=1)
        require(self.draws < 1 << 16, what, "draws", "below 65536", self.draws)
        require_int(what, "seed", self.seed, minimum=0)
        require(self.proposal_temperature is None or (is_number(self.proposal_temperature)
                                                      and math.isfinite(self.proposal_temperature)
                                                      and self.proposal_temperature > 0),
                what, "proposal_temperature", "null or a finite number > 0", self.proposal_temperature)
        object.__setattr__(self, "p", float(self.p))

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "CaptureConfig":
        return dataclass_from_params(cls, params, "teacher_logits.capture")

    def to_dict(self) -> dict:
        return asdict(self)

    def manifest_params(self, k: int, capture_temperature: float) -> dict:
        """The manifest's `capture_params`: what the mode's rows depend on."""
        if self.mode == "top_p":
            return {"p": self.p, "k_max": int(k)}
        if self.mode == "sampled":
            return {"draws": self.draws, "proposal_temperature": self.proposal(capture_temperature),
                    "seed": self.seed}
        return {}

    def proposal(self, capture_temperature: float) -> float:
        return float(self.proposal_temperature or capture_temperature)

    def row_width(self, k: int) -> int:
        """Entries per row in memory (the artifact's `k`)."""
        return self.draws if self.mode == "sampled" else k


def top_p_lengths(topk_logprobs: torch.Tensor, p: float) -> torch.Tensor:
    """(C,) int32: per row the length of the smallest prefix of the descending `topk_logprobs`
    whose probability reaches `p`, at most their k."""
    below = torch.cumsum(topk_logprobs.exp(), dim=1) < p
    return (below.sum(dim=1) + 1).clamp_max(topk_logprobs.shape[1]).to(torch.int32)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 (wrapping arithmetic)."""
    z = values.copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def row_keys(sample_ids: Sequence[str], positions: Sequence[np.ndarray], seed: int) -> np.ndarray:
    """(N,) uint64: one key per trained row `(sample_id, position)`, samples in order."""
    keys = []
    for sample_id, sample_positions in zip(sample_ids, positions):
        digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode("utf-8"), digest_size=8).digest()
        base = np.uint64(int.from_bytes(digest, "little"))
        with np.errstate(over="ignore"):
            keys.append(_splitmix64(base + (np.asarray(sample_positions, dtype=np.uint64) + np.uint64(1)) * _GOLDEN))
    return np.concatenate(keys) if keys else np.zeros(0, np.uint64)


def row_uniforms(keys: np.ndarray, draws: int) -> np.ndarray:
    """(N, draws) float64 uniforms in [0, 1) of each row key (53 random bits each)."""
    with np.errstate(over="ignore"):
        counters = keys[:, None] ^ _splitmix64((np.arange(draws, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)[None, :]
        bits = _splitmix64(_splitmix64(counters))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(R, n) ids drawn with probability `weights / weights.sum(-1)` ((R, V) float, >= 0) by
    inverse CDF at `uniforms` ((R, n) float64 in [0, 1)), in two levels: the float64 cumulative
    sum of the blocks' sums (`_CDF_BLOCK` entries each, summed pairwise in float32: ~1e-7
    relative) picks a block, then a float64 cumulative sum inside the drawn blocks only picks the
    entry. Costs a few passes over the row (one float64 cumulative sum over the whole row was
    ~20x one exp pass); exact up to that rounding. Zero-weight entries are never drawn."""
    rows, vocab = weights.shape
    padded = -(-vocab // _CDF_BLOCK) * _CDF_BLOCK
    if padded != vocab:
        weights = torch.nn.functional.pad(weights, (0, padded - vocab))
    blocks = weights.view(rows, padded // _CDF_BLOCK, _CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum_(dim=-1)  # (R, B)
    total = block_cdf[:, -1:]
    targets = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True: the first block whose cumulative mass exceeds the target (never an empty one)
    block = torch.searchsorted(block_cdf, targets, right=True).clamp_max_(block_cdf.shape[1] - 1)
    below = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)
    inner_cdf = blocks.gather(1, block[..., None].expand(-1, -1, _CDF_BLOCK)).double().cumsum_(dim=-1)  # (R, n, b)
    inner_total = inner_cdf[..., -1:]
    remainder = (targets - below)[..., None].clamp_min(0.0)
    remainder = torch.minimum(remainder, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    offset = torch.searchsorted(inner_cdf, remainder, right=True).squeeze(-1).clamp_max_(_CDF_BLOCK - 1)
    return block * _CDF_BLOCK + offset


def sample_rows(exp_shifted: torch.Tensor, log_sum: torch.Tensor, uniforms: torch.Tensor, proposal_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw each row's ids from the proposal `p**proposal_scale / Z` and reduce them to
    distinct ids with counts, by descending log-prob.

    Args:
        exp_shifted: (C, V) float32 `exp(a - max a)` of the capture-tempered logits (not changed).
        log_sum: (C, 1) its row sums' log (`log p(v) = log exp_shifted - log_sum`).
        uniforms: (C, n) float64 on the same device (`row_uniforms`).
        proposal_scale: `capture_temperature / proposal_temperature`.

    Returns:
        (ids (C, n) int64, log-probs (C, n) float32 at the capture temperature, counts (C, n)
        int32, lengths (C,) int32), padded per `topk_store.codec.pad_rows`.
    """
    rows, draws = uniforms.shape
    drawn = torch.empty(rows, draws, dtype=torch.int64, device=exp_shifted.device)
    for start in range(0, rows, _CDF_ROWS):
        stop = min(start + _CDF_ROWS, rows)
        weights = exp_shifted[start:stop]
        if proposal_scale != 1.0:
            weights = weights.pow(proposal_scale)
        drawn[start:stop] = _inverse_cdf(weights, uniforms[start:stop])
    drawn, _ = drawn.sort(dim=1)
    is_new = torch.ones_like(drawn, dtype=torch.bool)
    is_new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = torch.cumsum(is_new, dim=1) - 1  # (C, n): the distinct id's slot
    lengths = slot[:, -1] + 1
    ids = torch.zeros_like(drawn).scatter_(1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    logprobs = exp_shifted.gather(1, ids).log_() - log_sum
    padding = torch.arange(draws, device=drawn.device)[None, :] >= lengths[:, None]
    logprobs.masked_fill_(padding, -math.inf)
    logprobs, order = logprobs.sort(dim=1, descending=True, stable=True)
    ids, counts = ids.gather(1, order), counts.gather(1, order)
    ids = torch.where(padding, ids[:, :1], ids)  # padding repeats the row's first id, count 0
    counts.masked_fill_(padding, 0)
    return ids, logprobs, counts.to(torch.int32), lengths.to(torch.int32)
