"""The student with the distillation loss inside its `forward`, for FSDP2 (and DDP).

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps each parameter sharded as a `DTensor` and
all-gathers a module's parameters in that module's forward pre-hook. The fused top-k loss reads
the `lm_head` weight directly (it never calls `lm_head(...)`, so that [N, V] logits are never
held), so it must run inside the forward of the module that owns the weight's FSDP group; run
after `model(...)` returns, it would see a resharded `DTensor`. `StudentWithLoss` is that module:
the root that the Trainer (through accelerate's `fsdp2_prepare_model`) or `training.fsdp.shard_student`
shards.

Public practice followed (TRL's chunked SFT loss under FSDP2, huggingface/trl#6077):

- the `lm_head` weight is gathered once per micro-batch, before the chunk loop: the fused loss
  gets one plain tensor and computes the weight gradient during its forward, so no chunk causes
  an all-gather, in forward or backward;
- a micro-batch without trained tokens still touches every parameter
  (`(hidden_states.sum() + weight.sum()) * 0`), so every rank takes part in the same gradient
  reduce-scatters and none waits forever;
- tied embeddings: `lm_head.weight is embed_tokens.weight` is one parameter, hence one FSDP
  parameter in one group (FSDP refuses a parameter shared by two groups); both uses add to its
  gradient.

The same wrapper serves DDP, so that there is one loss path.
"""

from __future__ import annotations

from typing import Any

import torch

from kd_pipeline.core.losses import KDLossConfig, LossOutput, fused_topk_kd_loss
from kd_pipeline.core.models.head import head_transform
from kd_pipeline.core.training.data import flat_labels

#: Prefix of the student's parameters in `StudentWithLoss.state_dict()`.
STUDENT_PREFIX = "student."


class StudentWithLoss(torch.nn.Module):
    """A `*ForCausalLM` student whose `forward` returns the fused KD + SFT loss of a batch.

    Args:
        student: the causal LM (a base model plus `get_output_embeddings()`).
        loss_config: the loss hyperparameters.
        num_tokens: `len(tokenizer)`, when the student's head is padded beyond it (those rows get
            no probability mass); the loss applies the student's own post-head transform
            (`models.head.head_transform`).

    Attributes that HF `Trainer` / accelerate read are forwarded to the student: `config`,
    `_no_split_modules` (FSDP2 auto wrap: one group per decoder layer), activation checkpointing,
    `tie_weights` and `_keys_to_ignore_on_save` (checkpoint loading).
    `get_output_embeddings` is deliberately not forwarded: accelerate then leaves the head in
    the root group (gathered at the root's forward, kept until backward) instead of carving it
    into a unit of its own.
    """

    def __init__(self, student: torch.nn.Module, loss_config: KDLossConfig, num_tokens: int | None = None):
        super().__init__()
        if getattr(student, "base_model", student) is student:
            raise ValueError(f"{type(student).__name__} has no separate base model (decoder) to take the final "
                             "hidden states from; the student must be a *ForCausalLM with a base model")
        if student.get_output_embeddings() is None:
            raise ValueError(f"{type(student).__name__} has no output embeddings (lm_head)")
        self.student = student
        self.loss_config = loss_config
        self.head_transform = head_transform(student, num_tokens)

    # ---- what HF Trainer and accelerate look up on the model ----------------------------------

    @property
    def config(self):
        return self.student.config

    @property
    def _no_split_modules(self):
        return getattr(self.student, "_no_split_modules", None)

    @property
    def _keys_to_ignore_on_save(self):
        return getattr(self.student, "_keys_to_ignore_on_save", None)

    def tie_weights(self, *args, **kwargs):
        return self.student.tie_weights(*args, **kwargs)

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.student, "supports_gradient_checkpointing", False))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """`distill.trainer.activation_checkpointing` (HF Trainer calls this): recompute each
        (every n-th) decoder layer's activations in the backward instead of keeping them."""
        self.student.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                     every_n_layers=every_n_layers, offload=offload)

    def activation_checkpointing_disable(self) -> None:
        self.student.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(self.student, "is_activation_checkpointing", False))

    def student_state_dict(self, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
        """The student's own keys (`model.layers.0...`) of a `StudentWithLoss` state dict."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {key[len(STUDENT_PREFIX):]: value for key, value in state_dict.items()
                if key.startswith(STUDENT_PREFIX)}

    # ---- the loss ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        kd_positions_mask: torch.Tensor,
        token_weights: torch.Tensor,
        labels: torch.Tensor | None = None,
        kd_topk_ids: torch.Tensor | None = None,
        kd_topk_logprobs: torch.Tensor | None = None,
        kd_teacher_logz: torch.Tensor | None = None,
        kd_topk_weights: torch.Tensor | None = None,
    ) -> LossOutput:
        """Fused KD + SFT loss of one micro-batch (a `DistillCollator` batch).

        Args:
            input_ids, attention_mask: (B, T).
            kd_positions_mask: (B, T) bool, the trained positions (N of them).
            token_weights: (N,) float reduction weights (`loss = sum_i w_i loss_i`), in the
                row-major order of `kd_positions_mask`.
            labels: (B, T) next-token labels, or None for KD only.
            kd_topk_ids, kd_topk_logprobs: (N, K) teacher top-k, or None for SFT only.
            kd_teacher_logz: (N,) the teacher's log-normalizer at the loss's temperature (exact
                tempered tail for `tail_bucket`), or None.
            kd_topk_weights: (N, K) the sampled estimator's weights (`sampled` artifacts), or None.

        Returns:
            `LossOutput` (see `fused_topk_kd_loss`).
        """
        hidden_states, hidden, weight, bias = self._trained_hidden_and_head(input_ids, attention_mask,
                                                                            kd_positions_mask)
        sft_labels = None if labels is None else flat_labels(
            {"labels": labels, "kd_positions_mask": kd_positions_mask})
        out = fused_topk_kd_loss(hidden, weight, bias, kd_topk_ids, kd_topk_logprobs, sft_labels, token_weights,
                                 self.loss_config, teacher_logz=kd_teacher_logz, head=self.head_transform,
                                 topk_weights=kd_topk_weights)
        return _touch_all_if_empty(out, hidden_states, hidden, weight, bias)

    def _trained_hidden_and_head(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 kd_positions_mask: torch.Tensor):
        """(final hidden states (B, T, H), the trained rows' (N, H), lm_head weight, bias) in the
        dtype the loss's GEMMs run in."""
        decoded = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden_states = decoded.last_hidden_state if hasattr(decoded, "last_hidden_state") else decoded[0]
        weight, bias = gathered_head_parameters(self.student.get_output_embeddings())
        # Under bf16 autocast (precision bf16) the loss's three lm_head GEMMs run in bf16 too: the
        # fused loss turns autocast off and computes in the dtypes it is given, accumulating in
        # float32; the casts' backward hands the gradients to the float32 weights.
        device_type = hidden_states.device.type
        if torch.is_autocast_enabled(device_type):
            gemm_dtype = torch.get_autocast_dtype(device_type)
            weight = weight.to(gemm_dtype)
            bias = None if bias is None else bias.to(gemm_dtype)
        # Boolean indexing is row-major: the rows line up with kd_topk_* and the flat labels.
        hidden = hidden_states[kd_positions_mask].to(weight.dtype)  # (N, H)
        return hidden_states, hidden, weight, bias


#: The `CrossTokenizerCollator` batch keys of the aligned groups (`cross_tokenizer.data.group_batch`).
CROSS_TOKENIZER_INPUTS = ("ct_row_start", "ct_row_stop", "ct_topk_ids", "ct_topk_logprobs", "ct_teacher_chain")


class CrossTokenizerStudentWithLoss(StudentWithLoss):
    """`StudentWithLoss` for a student with its own tokenizer: `forward` takes the aligned
    groups' teacher rows (`ct_*`, `CrossTokenizerCollator`) and returns the cross-tokenizer
    KD + ULD + SFT loss (`cross_tokenizer.loss.cross_tokenizer_kd_loss`); without them (SFT
    only) the plain fused loss.

    Args (beyond `StudentWithLoss`'s):
        projection: the pair's `VocabMap.projection()` (moved to the student's device on use).
        options: the `CrossTokenizerOptions`.
    """

    def __init__(self, student: torch.nn.Module, loss_config: KDLossConfig, projection, options,
                 num_tokens: int | None = None):
        super().__init__(student, loss_config, num_tokens=num_tokens)
        if not self.head_transform.is_identity:
            # cross_tokenizer_kd_loss scores the bare lm_head output.
            raise ValueError(f"the cross-tokenizer loss scores the bare lm_head: {type(student).__name__}'s head "
                             f"transform {self.head_transform.settings} is not supported; use a student without "
                             "logit soft-capping, scaling or padded head rows")
        # A plain attribute, not buffers: DDP would broadcast buffers and checkpoints would hold them.
        self.projection = projection
        self.options = options

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        kd_positions_mask: torch.Tensor,
        token_weights: torch.Tensor,
        labels: torch.Tensor | None = None,
        kd_topk_ids: torch.Tensor | None = None,
        kd_topk_logprobs: torch.Tensor | None = None,
        kd_teacher_logz: torch.Tensor | None = None,
        kd_topk_weights: torch.Tensor | None = None,  # the shared trainer passes it: must be None here
        ct_row_start: torch.Tensor | None = None,
        ct_row_stop: torch.Tensor | None = None,
        ct_topk_ids: torch.Tensor | None = None,
        ct_topk_logprobs: torch.Tensor | None = None,
        ct_teacher_chain: torch.Tensor | None = None,
    ):
        """Cross-tokenizer loss of one micro-batch (a `CrossTokenizerCollator` batch).

        Args:
            input_ids, attention_mask, kd_positions_mask, token_weights, labels: as
                `StudentWithLoss.forward`, in the student's tokens.
            kd_topk_ids, kd_topk_logprobs, kd_teacher_logz: not used with groups (SFT-only batches
                pass None).
            kd_topk_weights: must be None: the cross-tokenizer loss has no sampled estimator
                (`train_student` refuses a `sampled` artifact with a student tokenizer first).
            ct_*: the groups' (G,) row bounds, (G, K) teacher top-k rows and (G,) teacher chains.

        Returns:
            `CrossTokenizerLossOutput` with groups, else `LossOutput` (SFT only).
        """
        if kd_topk_weights is not None:
            raise ValueError("CrossTokenizerStudentWithLoss got kd_topk_weights (a sampled artifact's estimator "
                             "weights): the cross-tokenizer loss supports topk and top_p teacher rows only and "
                             "would drop them")
        if ct_row_start is None:
            return super().forward(input_ids, attention_mask, kd_positions_mask, token_weights, labels,
                                   kd_topk_ids, kd_topk_logprobs, kd_teacher_logz)
        from kd_pipeline.core.cross_tokenizer.data import group_batch
        from kd_pipeline.core.cross_tokenizer.loss import cross_tokenizer_kd_loss

        hidden_states, hidden, weight, bias = self._trained_hidden_and_head(input_ids, attention_mask,
                                                                            kd_positions_mask)
        if self.projection.teacher_class.device != hidden.device:
            self.projection = type(self.projection)(
                **{name: value.to(hidden.device) for name, value in vars(self.projection).items()})
        groups = group_batch({"ct_row_start": ct_row_start, "ct_row_stop": ct_row_stop, "ct_topk_ids": ct_topk_ids,
                              "ct_topk_logprobs": ct_topk_logprobs, "ct_teacher_chain": ct_teacher_chain},
                             token_weights)
        sft_labels = flat_labels({"labels": labels, "kd_positions_mask": kd_positions_mask})
        out = cross_tokenizer_kd_loss(hidden, weight, bias, sft_labels, token_weights, groups, self.projection,
                                      self.loss_config, self.options)
        return _touch_all_if_empty(out, hidden_states, hidden, weight, bias)


def _touch_all_if_empty(out, hidden_states, hidden, weight, bias):
    """`out` with every parameter in its loss's graph when the micro-batch trains nothing."""
    if hidden.shape[0] == 0:
        # Nothing trained here, but other ranks reduce gradients for every parameter: give
        # each of them a (zero) gradient so this rank joins the same collectives.
        touch = hidden_states.sum() + weight.sum() + (bias.sum() if bias is not None else 0)
        out = out._replace(loss=out.loss + touch.to(out.loss.dtype) * 0)
    return out


def gathered_head_parameters(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias as plain (unsharded) tensors, all-gathered at most once.

    Inside the forward of the root FSDP module the head's group is already unsharded (the root
    gathers its parameters in its pre-forward hook, and keeps them until backward). If the head
    is an FSDP unit of its own whose forward did not run, it is unsharded here, once; FSDP's
    end-of-backward callback reduce-scatters its gradient and reshards it.

    Raises:
        RuntimeError: the weight is sharded and the head is not an FSDP module that could gather it.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor):
        if not isinstance(head, FSDPModule):
            raise RuntimeError(
                f"the lm_head weight is a sharded DTensor but {type(head).__name__} is not an FSDP module: call "
                "StudentWithLoss through the FSDP root it belongs to (its forward gathers the weight)")
        head.unshard()
    if isinstance(head.weight, DTensor):
        raise RuntimeError("the lm_head weight is still sharded after FSDP unshard()")
    return head.weight, head.bias
