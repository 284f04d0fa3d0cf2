"""Build the tiny ChatML tokenizer committed under tests/fixtures/tiny_tokenizer/.

Usage (from the project root):
    python scripts/make_tiny_tokenizer.py [--teacher-dir data/06_models/teacher] [--out DIR]

The chat template is read from the real teacher's tokenizer: from a converted teacher folder
when `--teacher-dir` is given, else straight from the embedded SmolLM2 GGUF (a few seconds), so
the tiny tokenizer renders chats exactly as SmolLM2-Instruct does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from kd_pipeline.core.tiny import (  # noqa: E402
    TINY_TOKENIZER_RELATIVE_DIR,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
    kjv_training_text,
)


def teacher_chat_template(teacher_dir: Path | None) -> str:
    """SmolLM2-Instruct's chat template, from a converted teacher folder or the embedded GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if teacher_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    else:
        from kd_pipeline.core.models.teacher import embedded_gguf_path

        gguf_path = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise SystemExit(f"the teacher tokenizer has no chat template ({teacher_dir or 'embedded GGUF'})")
    return tokenizer.chat_template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", type=Path, default=None, help="converted teacher folder (HF format)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / TINY_TOKENIZER_RELATIVE_DIR)
    parser.add_argument("--num-verses", type=int, default=3000, help="KJV verses to train the BPE on")
    args = parser.parse_args(argv)

    tokenizer = build_tiny_tokenizer(kjv_training_text(args.num_verses), teacher_chat_template(args.teacher_dir))
    if len(tokenizer) != TINY_VOCAB_SIZE:
        raise SystemExit(f"trained vocabulary has {len(tokenizer)} tokens, expected {TINY_VOCAB_SIZE}")

    # Build beside the target and swap it in, so a failed run never leaves a half-written fixture.
    tmp = args.out.with_name(f"{args.out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    total = sum(path.stat().st_size for path in args.out.iterdir())
    print(f"wrote {args.out} ({len(tokenizer)} tokens, {total / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
