"""`train_student` with `trainer.fsdp: true`: the HF Trainer's FSDP2 path (accelerate
`fsdp2_prepare_model`, `fully_shard`) on 2 CPU processes (gloo), with the fused loss inside
`StudentWithLoss.forward`. accelerate enables FSDP only on accelerators; the worker lifts that
gate with `fsdp.accelerate_fsdp_on_cpu` so the same Trainer code runs here.

Compared with one unsharded process (2 sequences per rank = 4 in one process): the step
losses, the evaluation means and the saved student's weights; then a resume from the sharded
checkpoint of step 2 equals the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import test_training as t  # noqa: E402

from kd_pipeline.core.training.fsdp import fsdp_training_arguments  # noqa: E402

WORKER = Path(__file__).with_name("fsdp_trainer_worker.py")
# keep_checkpoints: the tests read the sharded checkpoints after the run.
SETTINGS = {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "save_total_limit": None, "keep_checkpoints": True}
#: Losses and weights vs one process (float32 reductions in another order; AdamW divides
#: near-zero gradients by their own scale, so weights get an absolute floor too).
RTOL, WEIGHT_ATOL = 1e-5, 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return t.make_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


def _torchrun(teacher_dir: Path, out_dir: Path, settings: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(t.PROJECT_ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(t._free_port()), str(WORKER), str(teacher_dir), str(out_dir), json.dumps(settings)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr[-4000:]
    record = json.loads((out_dir / "losses.json").read_text())
    return {int(step): loss for step, loss in record["losses"].items()}, record["resumed_from"]


@pytest.fixture(scope="module")
def single(teacher_dir, tmp_path_factory):
    corpus, targets, _ = t.build_fixture(teacher_dir)
    out = tmp_path_factory.mktemp("single") / "student"
    summary = t.train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=t.STUDENT, loss=t.LOSS,
                              train=t.quick_config(**SETTINGS, per_device_train_batch_size=4), output_dir=out,
                              targets=targets)
    return summary, out


@pytest.fixture(scope="module")
def sharded(teacher_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    losses, resumed = _torchrun(teacher_dir, out_dir, {**SETTINGS, "per_device_train_batch_size": 2})
    assert resumed is None
    return losses, out_dir


def _assert_same_weights(actual_dir: Path, expected_dir: Path) -> float:
    actual, expected = load_file(actual_dir / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    assert actual.keys() == expected.keys()
    worst = 0.0
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda text, name=name: f"{name}: {text}")
        worst = max(worst, float((actual[name] - value).abs().max() / value.abs().max()))
    return worst


def test_fsdp_trainer_matches_one_process(single, sharded):
    summary, single_dir = single
    losses, out_dir = sharded
    expected = t.step_losses(summary)
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=RTOL), (losses, expected)
    fsdp_summary = json.loads((out_dir / "student" / t.SUMMARY_FILE).read_text())
    assert fsdp_summary["world_size"] == 2
    for key in ("eval_total", "eval_kd", "eval_sft"):
        assert fsdp_summary["final_eval"][key] == pytest.approx(summary["final_eval"][key], rel=RTOL)
    # The student is a plain HF folder (gathered from the shards), the weights those of one process.
    worst = _assert_same_weights(out_dir / "student", single_dir)
    print(f"max relative loss error {max(abs(losses[s] / loss - 1) for s, loss in expected.items()):.1e}, "
          f"weights {worst:.1e}")
    checkpoint = out_dir / "student_checkpoints" / "checkpoint-2"
    assert sorted(path.name for path in (checkpoint / "pytorch_model_fsdp_0").iterdir()) == [".metadata",
        "__0_0.distcp", "__1_0.distcp"]  # sharded: one file per rank, no full copy


def test_fsdp_resume_from_sharded_checkpoint_matches_uninterrupted(teacher_dir, sharded, tmp_path):
    losses, out_dir = sharded
    run = tmp_path / "run"
    shutil.copytree(out_dir / "student_checkpoints", run / "student_checkpoints")
    shutil.rmtree(run / "student_checkpoints" / "checkpoint-4")  # as if killed after step 2's save
    resumed_losses, resumed_from = _torchrun(teacher_dir, run, {**SETTINGS, "per_device_train_batch_size": 2})
    assert resumed_from is not None and resumed_from.endswith("checkpoint-2")
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=RTOL, abs=0)
    _assert_same_weights(run / "student", out_dir / "student")
    # Killed while saving the student: the finished run's sharded checkpoint-4 is loaded as is.
    shutil.rmtree(run / "student")
    _, resumed_from = _torchrun(teacher_dir, run, {**SETTINGS, "per_device_train_batch_size": 2})
    assert resumed_from.endswith("checkpoint-4")
    _assert_same_weights(run / "student", out_dir / "student")


def test_fsdp_settings_and_cpu_refusal(teacher_dir, tmp_path):
    assert fsdp_training_arguments(False, None) == {}
    assert fsdp_training_arguments(True, {"cpu_offload": True})["fsdp_config"] == {
        "version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT", "cpu_offload": True}
    with pytest.raises(ValueError, match="distill.trainer.fsdp_config.version must be 2"):
        t.TrainConfig.from_dict({"fsdp": True, "fsdp_config": {"version": 1}})
    with pytest.raises(ValueError, match="distill.trainer.fsdp_config is set but fsdp is off"):
        t.TrainConfig.from_dict({"fsdp_config": {"cpu_offload": True}})
    # One process: Hugging Face refuses FSDP itself. (Under torchrun on CPU without the tests'
    # gate lift, DistillationTrainer refuses: accelerate would silently train with DDP.)
    corpus, targets, _ = t.build_fixture(teacher_dir)
    with pytest.raises(ValueError, match="fsdp only works in distributed training"):
        t.train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=t.STUDENT, loss=t.LOSS,
                        train=t.quick_config(fsdp=True), output_dir=tmp_path / "student", targets=targets)
