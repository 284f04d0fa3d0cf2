"""The teacher's LM head on trained rows only, reduced to top-k log-probs.

The head is applied only to the hidden rows of trained positions (prompt and padding positions
never get logits), in row chunks written into one reused buffer; top-k comes first, its first
value is the row max, and logsumexp is then computed in place on the chunk (`sub_`, `exp_`,
`sum`): no extra full-vocabulary copy and no separate max pass. The same exp-shifted buffer
gives each row's log-normalizer at every configured temperature (`tempered_log_sums`): one
fused reduction per temperature, a few bytes per row, so that training can temper the stored
top-k exactly. The `top_p` and `sampled` capture modes (`extraction.capture`) select their
variable rows from the same chunk: `top_p` cuts the top-k prefix, `sampled` draws from the
exp-shifted buffer before the log-normalizers reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kd_pipeline.core.extraction.capture import CaptureConfig, row_keys, row_uniforms, sample_rows, top_p_lengths
from kd_pipeline.core.extraction.plan import BatchInputs, make_batch
from kd_pipeline.core.models.device_map import materialized
from kd_pipeline.core.models.head import decoder_and_head, head_transform


@dataclass
class HeadRows:
    """Per trained row: top-k ids / log-probs (descending) and the target log-prob; variable
    rows (`top_p`, `sampled`) padded per `topk_store.codec.pad_rows`."""

    topk_ids: torch.Tensor  # [N, k] int32
    topk_logprobs: torch.Tensor  # [N, k] float32
    target_logprobs: torch.Tensor  # [N] float32
    logz: torch.Tensor  # [N, T] float32: log sum_v p(v)**s per scale s (`TopKArrays.logz`)
    row_lengths: torch.Tensor | None = None  # [N] int32 (top_p, sampled)
    counts: torch.Tensor | None = None  # [N, k] int32 draw counts (sampled)

    def host_tensors(self) -> tuple:
        """Its tensors (None where absent), in field order."""
        return (self.topk_ids, self.topk_logprobs, self.target_logprobs, self.logz, self.row_lengths, self.counts)


def tempered_log_sums(exp_shifted: torch.Tensor, scales: Sequence[float], log_sum: torch.Tensor) -> torch.Tensor:
    """`(C, T)` `log sum_v e_v**s` per scale, from `e = exp(a - max a)` (every row's max entry is
    1, so no sum is 0; entries that underflowed in `e` are below `exp(-87 s)` of the sum).

    Scale 1 is the given `log_sum` (`(C, 1)`, already computed); 2 is a squared 2-norm, one
    fused reduction; 1/2 takes the square root in place, last (so `exp_shifted` is overwritten
    when 0.5 is among the scales); any other scale is a `pow` reduction (several times slower
    than the exp pass).
    """
    out = torch.empty(exp_shifted.shape[0], len(scales), dtype=torch.float32, device=exp_shifted.device)
    halves = []
    for column, scale in enumerate(scales):
        if scale == 1.0:
            out[:, column] = log_sum[:, 0]
        elif scale == 2.0:
            out[:, column] = torch.linalg.vector_norm(exp_shifted, 2, dim=-1).log().mul(2.0)
        elif scale == 0.5:
            halves.append(column)
        else:
            out[:, column] = torch.linalg.vector_norm(exp_shifted, scale, dim=-1).log().mul(scale)
    if halves:
        out[:, halves] = exp_shifted.sqrt_().sum(dim=-1).log().unsqueeze(1)
    return out


class TopKHead:
    """Applies the LM head to selected hidden rows and reduces each row to top-k log-probs.

    Works chunk by chunk: logits of `chunk_rows` rows go into one reused buffer; top-k (whose
    first value is the row max) and the target logit are read first, then the buffer is
    turned in place into `exp(logit - max)` and summed. Nothing else of size [rows, V] exists.

    A head offloaded by a `device_map` (`cpu`/`disk`) has its weights brought to its execution
    device for each call (accelerate's `align_module_device`), as its own forward would.
    """

    def __init__(self, model, k: int, temperature: float = 1.0, chunk_rows: int = 1024, fp32_logits: bool = True,
                 logz_scales: Sequence[float] = (1.0,), num_tokens: int | None = None,
                 capture: CaptureConfig | None = None):
        """`logz_scales`: `temperature / t` for each log-normalizer temperature `t` (the
        artifact's `logz_scales`); `num_tokens`: `len(tokenizer)`, when the head is padded
        beyond it (padded rows never get probability mass); `capture`: what a row stores
        (default `topk`)."""
        _, self.head = decoder_and_head(model)
        self.weight = self.head.weight
        self.bias = getattr(self.head, "bias", None)
        # A bf16 teacher's logits rounded to bf16 are 0.06-0.125 apart at |z| of 16-32 (they
        # reorder near-ties and shift log-probs by as much): with `fp32_logits` the head runs on
        # a float32 copy of its weights, which keeps the error to the weights' own rounding. The
        # decoder still runs in bf16.
        self.fp32_logits = fp32_logits
        self._float32_copy: tuple | None = None
        self.vocab_size = int(self.weight.shape[0])
        if k > self.vocab_size:
            raise ValueError(f"teacher_logits.k = {k} exceeds the teacher vocabulary size {self.vocab_size}")
        self.k = k
        self.capture = capture or CaptureConfig()
        self.width = self.capture.row_width(k)
        self.temperature = float(temperature)
        self.proposal_scale = self.temperature / self.capture.proposal(self.temperature)
        self.chunk_rows = chunk_rows
        self.logz_scales = tuple(float(scale) for scale in logz_scales)
        self.transform = head_transform(model, num_tokens)
        if self.width > (self.transform.vocab_size or self.vocab_size):
            raise ValueError(f"teacher_logits.k / capture.draws = {self.width} exceeds the tokenizer's "
                             f"{self.transform.vocab_size or self.vocab_size} tokens")
        self._buffer: torch.Tensor | None = None

    def _head_parameters(self) -> tuple:
        """(weight, bias) the head runs with: its own, or their float32 copy (`fp32_logits`),
        made once per weight tensor (an offloaded head brings a fresh one to each call)."""
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        if not self.fp32_logits or weight.dtype == torch.float32:
            return weight, bias
        if self._float32_copy is None or self._float32_copy[0] is not weight:
            self._float32_copy = (weight, weight.float(), None if bias is None else bias.float())
        return self._float32_copy[1], self._float32_copy[2]

    def _logits_into_buffer(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        hidden = hidden.to(self.weight.dtype)
        if self.weight.dtype == torch.float32 and hidden.device.type == "cpu":
            # CPU fp32: matmul straight into a reused buffer (no fresh [rows, V] allocation,
            # whose page faults cost as much as the exp pass).
            if self._buffer is None or self._buffer.shape[0] < rows:
                self._buffer = torch.empty(max(rows, self.chunk_rows), self.vocab_size, dtype=torch.float32)
            logits = self._buffer[:rows]
            torch.matmul(hidden, self.weight.t(), out=logits)
            if self.bias is not None:
                logits.add_(self.bias)
        else:
            # bf16/fp16 (or CUDA): the model's own head output, then one fp32 copy per chunk.
            logits = torch.nn.functional.linear(hidden, self.weight, self.bias).float()
        return logits

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor, keys: np.ndarray | None = None) -> HeadRows:
        """`hidden [N, H]` rows at trained positions, `labels [N]` the actual next tokens, `keys
        [N]` the rows' identities (`capture.row_keys`; needed by `sampled`)."""
        if self.capture.mode == "sampled" and (keys is None or len(keys) != hidden.shape[0]):
            raise ValueError("the sampled capture needs one row key per row")
        with materialized(self.head):
            self.weight, self.bias = self._head_parameters()
            try:
                return self._rows(hidden.to(self.weight.device), labels.to(self.weight.device), keys)
            finally:
                self.weight, self.bias = self.head.weight, getattr(self.head, "bias", None)

    def _rows(self, hidden: torch.Tensor, labels: torch.Tensor, keys: np.ndarray | None) -> HeadRows:
        n, mode = hidden.shape[0], self.capture.mode
        device = hidden.device
        out_ids = torch.empty(n, self.width, dtype=torch.int32, device=device)
        out_lp = torch.empty(n, self.width, dtype=torch.float32, device=device)
        out_tgt = torch.empty(n, dtype=torch.float32, device=device)
        out_logz = torch.empty(n, len(self.logz_scales), dtype=torch.float32, device=device)
        out_lengths = None if mode == "topk" else torch.empty(n, dtype=torch.int32, device=device)
        out_counts = torch.empty(n, self.width, dtype=torch.int32, device=device) if mode == "sampled" else None
        scales = torch.tensor(self.logz_scales, dtype=torch.float32, device=device)
        for start in range(0, n, self.chunk_rows):
            stop = min(start + self.chunk_rows, n)
            logits = self._logits_into_buffer(hidden[start:stop])
            self.transform.apply_(logits)
            if self.temperature != 1.0:
                logits.div_(self.temperature)
            if mode == "sampled":
                values = ids = None
                row_max = logits.amax(dim=-1, keepdim=True)
            else:
                values, ids = torch.topk(logits, self.k, dim=-1, largest=True, sorted=True)
                row_max = values[:, :1]
            target = logits.gather(1, labels[start:stop, None].long())
            # In place: logits <- exp(logits - max); lse = max + log(sum).
            exp_shifted = logits.sub_(row_max).exp_()
            log_sum = exp_shifted.sum(dim=-1, keepdim=True).log_()
            lse = log_sum + row_max
            if mode == "sampled":  # before the log-normalizers, which may overwrite the buffer
                uniforms = torch.from_numpy(row_uniforms(keys[start:stop], self.width)).to(device)
                ids, logprobs, out_counts[start:stop], out_lengths[start:stop] = sample_rows(
                    exp_shifted, log_sum, uniforms, self.proposal_scale)
            else:
                logprobs = values - lse
                if mode == "top_p":
                    lengths = out_lengths[start:stop] = top_p_lengths(logprobs, self.capture.p)
                    padding = torch.arange(self.k, device=device)[None, :] >= lengths[:, None]
                    ids = torch.where(padding, ids[:, :1], ids)
                    logprobs = logprobs.masked_fill(padding, -torch.inf)
            out_ids[start:stop] = ids
            out_lp[start:stop] = logprobs
            out_tgt[start:stop] = (target - lse).squeeze(1)
            # log Z_s = log sum exp(s (a - max)) - s log sum exp(a - max): the max cancels.
            out_logz[start:stop] = tempered_log_sums(exp_shifted, self.logz_scales, log_sum) - scales * log_sum
        return HeadRows(out_ids, out_lp, out_tgt, out_logz, out_lengths, out_counts)


@torch.no_grad()
def teacher_rows(model, head: TopKHead, batch: BatchInputs, device: torch.device) -> HeadRows:
    """Decoder forward, gather the trained rows' hidden states, head on those rows only."""
    decoder, _ = decoder_and_head(model)
    input_ids = batch.input_ids.to(device, non_blocking=True)
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.flat_positions.to(device))
    keys = None
    if head.capture.mode == "sampled":
        if batch.sample_ids is None or len(batch.sample_ids) != len(batch.positions):
            # Every sample drawing from the same key would give identical draws at equal positions.
            raise ValueError(f"the sampled capture seeds each row's draws by its sample_id, but the batch's field "
                             f"'sample_ids' is {batch.sample_ids!r} for {len(batch.positions)} samples: pass them "
                             "to make_batch(..., sample_ids=...)")
        keys = row_keys(batch.sample_ids, batch.positions, head.capture.seed)
    return head(rows, batch.labels.to(device), keys)


@torch.no_grad()
def bare_forward(model, batch: BatchInputs, device: torch.device) -> torch.Tensor:
    """The baseline: the causal LM's own forward (logits at every position) on the same batch."""
    return model(input_ids=batch.input_ids.to(device), use_cache=False).logits


def check_head_path(model, head: TopKHead, input_ids: np.ndarray, device: torch.device,
                    atol: float | None = None) -> float:
    """Compare the decoder + trained-row head path with `log_softmax(model(...).logits)` on one
    short sequence; raise if they disagree (an architecture whose logits need more than the
    head, scaling and soft-capping). Returns the max abs error of the top-k log-probs."""
    ids = np.asarray(input_ids[: min(len(input_ids), 24)], dtype=np.int64)
    if len(ids) < 2:
        return 0.0
    mask = np.ones(len(ids), dtype=np.int8)
    mask[0] = 0
    batch = make_batch([ids], [mask], sample_ids=["check_head_path"])  # a name for the sampled draws' seed
    got = teacher_rows(model, head, batch, device)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits[0, :-1].float()
    logits = logits[:, : head.transform.vocab_size or logits.shape[-1]] / head.temperature
    reference = torch.log_softmax(logits, dim=-1)
    ref_lp = reference.gather(1, got.topk_ids.long())
    ref_tgt = reference.gather(1, batch.labels.to(device)[:, None]).squeeze(1)
    ref_logz = torch.stack([(scale * reference).logsumexp(-1) for scale in head.logz_scales], -1)
    stored = torch.isfinite(got.topk_logprobs)  # variable rows: their padding is -inf
    error = max(float((ref_lp - got.topk_logprobs)[stored].abs().max()),
                float((ref_tgt - got.target_logprobs).abs().max()), float((ref_logz - got.logz).abs().max()))
    if head.capture.mode != "sampled":  # the first entry is the row's top
        ref_top = reference.max(dim=-1).values
        error = max(error, float((ref_top - got.topk_logprobs[:, 0]).abs().max()))
    if atol is None:
        # The model's own logits come out of its head in the model's dtype (bf16: ~0.1 apart at |z| ~ 20).
        atol = 1e-3 if head.head.weight.dtype == torch.float32 else 0.25
    if not error <= atol:
        raise ValueError(
            f"{type(model).__name__}: the trained-row head path differs from the model's own logits "
            f"by {error:.3g} (> {atol}); this architecture post-processes logits in a way the "
            "extraction does not reproduce"
        )
    return error
