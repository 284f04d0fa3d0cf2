"""Weights of the sampled (random-sampling KD) estimator, from a `sampled` artifact's rows.

A `sampled` row holds the distinct ids of `n` draws from the proposal `r = p**s_r / Z_r` (the
stored distribution `p` tempered by `s_r = capture temperature / proposal temperature`), their
counts `c` and their exact log-probs `l = log p`. For a training temperature with scale `s`,
`p_s = p**s / Z_s`, the importance weights

    w = c / n * p_s / r = c / n * exp((s - s_r) * l - log Z_s + log Z_r)

make `sum_k w_k f(k)` an unbiased estimate of `E_{p_s}[f]` (`core.losses.config`); at `s == s_r`
they are the plain frequencies `c / n`. The artifact holds `log Z` at the proposal temperature
and at every `logz_temperatures` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampledWeights:
    """How a `sampled` artifact's rows become estimator weights for one loss temperature.

    Attributes:
        draws: `n`, draws per row (the manifest's `capture_params.draws`).
        target_scale: `s`, the loss's `target_logits_scale`.
        proposal_scale: `s_r`, capture temperature / proposal temperature.
        target_column, proposal_column: the `logz` columns at `s` and at `s_r`.
    """

    draws: int
    target_scale: float
    proposal_scale: float
    target_column: int
    proposal_column: int

    def __call__(self, counts: np.ndarray, logprobs: np.ndarray, logz: np.ndarray) -> np.ndarray:
        """(n, K) float32 weights of rows with `counts (n, K)` (0 at padding), stored
        log-probs `(n, K)` and log-normalizers `logz (n, T)`."""
        frequencies = np.asarray(counts, dtype=np.float64) / self.draws
        if self.target_scale == self.proposal_scale:
            return frequencies.astype(np.float32)
        log_ratio = ((self.target_scale - self.proposal_scale) * np.asarray(logprobs, dtype=np.float64)
                     - logz[:, self.target_column, None] + logz[:, self.proposal_column, None])
        # Padding has count 0 and log-prob -inf: its weight is 0, not 0 * inf.
        return np.where(frequencies > 0, frequencies * np.exp(np.where(frequencies > 0, log_ratio, 0.0)),
                        0.0).astype(np.float32)
