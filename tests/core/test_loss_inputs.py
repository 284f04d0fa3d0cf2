"""`check_loss_inputs`: what the top-k losses refuse before any arithmetic (by message), through
the fused loss and the float64 reference alike."""

from __future__ import annotations

import pytest
import torch

from kd_pipeline.core.losses import KDLossConfig, fused_topk_kd_loss, topk_kd_loss_reference

N, H, V, K = 6, 4, 11, 3


def inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    teacher = torch.randn(N, V, generator=gen, dtype=torch.float64).log_softmax(-1)
    logprobs, ids = teacher.topk(K, dim=-1)
    return dict(hidden=hidden, weight=weight, bias=None, topk_ids=ids, topk_logprobs=logprobs,
                labels=torch.randint(0, V, (N,), generator=gen), token_weights=torch.full((N,), 1.0 / N,
                                                                                         dtype=torch.float64))


def fused(config, **extra):
    return fused_topk_kd_loss(**inputs(), config=config, **extra)


def reference(config, **extra):
    args = inputs()
    logits = args.pop("hidden") @ args.pop("weight").T
    args.pop("bias")
    return topk_kd_loss_reference(logits, **args, config=config, **extra)


@pytest.mark.parametrize("loss", [fused, reference])
def test_sampled_targets_at_another_temperature_need_teacher_logz(loss):
    weights = torch.full((N, K), 1.0 / K, dtype=torch.float64)
    config = KDLossConfig(target_logits_scale=0.5)
    with pytest.raises(ValueError, match=r"sampled targets \(topk_weights\) at target_logits_scale 0.5 need "
                                         "teacher_logz.*s \\* l - teacher_logz are not known"):
        loss(config, topk_weights=weights)
    logz = torch.zeros(N, dtype=torch.float64)
    assert torch.isfinite(loss(config, topk_weights=weights, teacher_logz=logz).loss)
    # At the capture temperature log Z = 0: nothing is missing.
    assert torch.isfinite(loss(KDLossConfig(), topk_weights=weights).loss)


@pytest.mark.parametrize("loss", [fused, reference])
def test_the_tempered_tail_bucket_needs_teacher_logz_and_renormalize_does_not(loss):
    with pytest.raises(ValueError, match="topk_normalization 'tail_bucket' at target_logits_scale 2.0 needs "
                                         "teacher_logz"):
        loss(KDLossConfig(target_logits_scale=2.0))
    assert torch.isfinite(loss(KDLossConfig(target_logits_scale=2.0, topk_normalization="renormalize")).loss)


def test_teacher_rows_are_checked_by_argument():
    config = KDLossConfig()
    with pytest.raises(ValueError, match=r"topk_weights must be a float tensor of shape \(6, 3\)"):
        fused(config, topk_weights=torch.ones(N, K + 1))
    with pytest.raises(ValueError, match=r"teacher_logz must be a float tensor of shape \(6,\)"):
        fused(config, teacher_logz=torch.zeros(N, 1))
    args = inputs()
    args["topk_ids"] = args["topk_ids"].int()
    with pytest.raises(ValueError, match="topk_ids must be int64"):
        fused_topk_kd_loss(**args, config=config)
