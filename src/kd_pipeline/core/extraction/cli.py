"""Command line of the extraction (for torchrun and for tests that kill a real extraction)."""

from __future__ import annotations

import json
import logging
from typing import Sequence

from kd_pipeline.core.distributed import distributed_from_env
from kd_pipeline.core.extraction.config import ExtractionConfig
from kd_pipeline.core.extraction.run import extract_teacher_topk


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kd_pipeline.core.extraction --teacher DIR --corpus DIR --out DIR [--params JSON]`;
    under `torchrun --nproc-per-node N ...` every rank extracts its share."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--teacher", required=True, help="teacher HF folder")
    parser.add_argument("--corpus", required=True, help="tokenized corpus folder")
    parser.add_argument("--out", required=True, help="artifact folder")
    parser.add_argument("--params", default="{}", help="ExtractionConfig fields as a JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ExtractionConfig.from_params(json.loads(args.params))
    device = config.resolved_device()
    rank, world_size = distributed_from_env(device.type)
    try:
        result = extract_teacher_topk(args.teacher, args.corpus, args.out, config, rank=rank, world_size=world_size)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result["run"], sort_keys=True))
    return 0
