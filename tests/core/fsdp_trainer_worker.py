"""`train_student` with `trainer.fsdp: true` under torchrun on CPU (gloo), the Trainer's own FSDP2
path enabled on CPU by `accelerate_fsdp_on_cpu`; writes losses.json on rank 0.

Usage: torchrun --nproc-per-node 2 fsdp_trainer_worker.py TEACHER_DIR OUT_DIR JSON_SETTINGS
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import test_training as t  # noqa: E402

from kd_pipeline.core.training.fsdp import accelerate_fsdp_on_cpu  # noqa: E402

teacher_dir, out_dir, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
corpus, targets, _ = t.build_fixture(teacher_dir)
with accelerate_fsdp_on_cpu():
    summary = t.train_student(teacher_dir=teacher_dir, corpus=corpus, student_init=t.STUDENT, loss=t.LOSS,
                              train=t.quick_config(fsdp=True, **settings), output_dir=out_dir / "student",
                              targets=targets)
if int(os.environ.get("RANK", "0")) == 0:
    (out_dir / "losses.json").write_text(json.dumps({"losses": t.step_losses(summary),
                                                     "resumed_from": summary["resumed_from"]}))
