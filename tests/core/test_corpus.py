"""corpus_prep core: masks and ids per format, ids and split stability, bad rows, lengths."""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_pipeline.core.corpus import (
    BadRowError,
    CorpusConfig,
    TokenizedCorpus,
    build_corpus,
    normalize_row,
    sample_id_of,
    split_of,
)
from kd_pipeline.core.corpus_sources import KJVChatSource, SourceRow, kjv_chat_rows, read_file_rows, source_rows


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rows_of(*records):
    return [SourceRow("mem.jsonl", index + 1, data=record) for index, record in enumerate(records)]


def only_sample(corpus):
    assert corpus.samples.num_rows == 1
    return corpus.samples.to_pylist()[0]


def test_text_row_trains_on_every_token_after_the_first(tiny_tokenizer):
    corpus = build_corpus(rows_of({"text": "In the beginning God created"}), tiny_tokenizer, "tok", CorpusConfig())
    sample = only_sample(corpus)
    expected_ids = encode(tiny_tokenizer, "In the beginning God created") + [tiny_tokenizer.eos_token_id]
    assert sample["input_ids"] == expected_ids
    assert sample["loss_mask"] == [0] + [1] * (len(expected_ids) - 1)
    assert sample["num_trained"] == len(expected_ids) - 1


def test_prompt_response_plain_masks_only_the_response(tiny_tokenizer):
    config = CorpusConfig(prompt_response_as_chat=False)
    corpus = build_corpus(rows_of({"prompt": "Who spake?", "response": " The LORD spake."}), tiny_tokenizer, "tok", config)
    sample = only_sample(corpus)
    prompt = encode(tiny_tokenizer, "Who spake?")
    response = encode(tiny_tokenizer, " The LORD spake.") + [tiny_tokenizer.eos_token_id]
    assert sample["input_ids"] == prompt + response
    assert sample["loss_mask"] == [0] * len(prompt) + [1] * len(response)


def test_chat_masks_assistant_turns_only_with_real_template(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say light."},
        {"role": "assistant", "content": "Let there be light."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "And there was light."},
    ]
    sample = only_sample(build_corpus(rows_of({"messages": messages}), tiny_tokenizer, "tok", CorpusConfig()))
    # Hand-built expectation from the ChatML layout the template renders.
    def turn(role, content):
        return encode(tiny_tokenizer, f"<|im_start|>{role}\n{content}<|im_end|>\n")

    header = encode(tiny_tokenizer, "<|im_start|>assistant\n")
    answer1 = encode(tiny_tokenizer, "Let there be light.<|im_end|>\n")
    answer2 = encode(tiny_tokenizer, "And there was light.<|im_end|>\n")
    expected_ids = turn("system", "Be brief.") + turn("user", "Say light.") + header + answer1 + turn("user", "Again.") + header + answer2
    expected_mask = ([0] * (len(turn("system", "Be brief.")) + len(turn("user", "Say light.")) + len(header)) + [1] * len(answer1)
                     + [0] * (len(turn("user", "Again.")) + len(header)) + [1] * len(answer2))
    assert sample["input_ids"] == expected_ids
    assert sample["loss_mask"] == expected_mask
    trained = [token for token, on in zip(sample["input_ids"], sample["loss_mask"]) if on]
    assert tiny_tokenizer.decode(trained) == "Let there be light.<|im_end|>\nAnd there was light.<|im_end|>\n"


def test_prompt_response_as_chat_equals_messages_row(tiny_tokenizer):
    as_pair = build_corpus(rows_of({"prompt": "Hi", "response": "Hello"}), tiny_tokenizer, "tok", CorpusConfig())
    as_chat = build_corpus(rows_of({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
                           tiny_tokenizer, "tok", CorpusConfig())
    assert only_sample(as_pair)["input_ids"] == only_sample(as_chat)["input_ids"]
    assert only_sample(as_pair)["loss_mask"] == only_sample(as_chat)["loss_mask"]


def make_records(count):
    return [{"text": f"verse number {index} of the book"} for index in range(count)]


def test_ids_and_split_survive_shuffling_and_reruns(tiny_tokenizer):
    records = make_records(60)
    first = build_corpus(rows_of(*records), tiny_tokenizer, "tok", CorpusConfig(validation_fraction=0.3))
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    second = build_corpus(rows_of(*shuffled), tiny_tokenizer, "tok", CorpusConfig(validation_fraction=0.3))
    def by_id(corpus):
        return {r["sample_id"]: (r["split"], r["input_ids"]) for r in corpus.samples.to_pylist()}

    assert by_id(first) == by_id(second)
    assert first.fingerprint == second.fingerprint
    splits = [r["split"] for r in first.samples.to_pylist()]
    assert 5 <= splits.count("validation") <= 30  # ~30% of 60, deterministic
    def normalized(text):
        return normalize_row(SourceRow("f.jsonl", 1, data={"text": text}))

    assert sample_id_of(normalized("a\r\nb")) == sample_id_of(normalized("a\nb"))
    assert sample_id_of(normalized("a\nb")) != sample_id_of(normalized("a\nb "))
    assert split_of("abc", 0.5, "salt") == split_of("abc", 0.5, "salt")


def test_fingerprint_depends_on_tokenizer_identity(tiny_tokenizer):
    rows = rows_of(*make_records(3))
    assert build_corpus(rows, tiny_tokenizer, "tok-a", CorpusConfig()).fingerprint != \
        build_corpus(rows, tiny_tokenizer, "tok-b", CorpusConfig()).fingerprint


BAD_LINES = [
    (b'{"text": "fine row"}\n', None),
    (b'{"text": \n', "malformed JSON"),
    (b'{"text": 5}\n', "field 'text': expected a string, got int"),
    (b'{"prompt": "only a prompt"}\n', "field 'response': missing"),
    (b'{"text": "   "}\n', "field 'text': empty"),
    (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n', "field 'messages[0].role'"),
    (b'[1, 2]\n', "expected a JSON object"),
]


def write_jsonl(path, lines):
    path.write_bytes(b"".join(lines))
    return path


def test_bad_rows_error_names_file_line_and_field(tmp_path, tiny_tokenizer):
    for number, (line, message) in enumerate(BAD_LINES[1:], start=2):
        path = write_jsonl(tmp_path / f"bad{number}.jsonl", [BAD_LINES[0][0], line])
        with pytest.raises(BadRowError) as caught:
            build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig(on_bad_row="error"))
        assert f"{path}:2" in str(caught.value)
        assert message in str(caught.value)


def test_bad_rows_skip_policy_counts_every_skip(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [line for line, _ in BAD_LINES] + [b"\n", BAD_LINES[0][0]])
    corpus = build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig(on_bad_row="skip"))
    report = corpus.meta["report"]
    assert corpus.samples.num_rows == 1
    assert report["rows_read"] == len(BAD_LINES) + 2
    assert report["skipped"] == {"bad_row": len(BAD_LINES) - 1, "blank_line": 1, "duplicate": 1}
    assert report["samples_kept"] + sum(report["skipped"].values()) == report["rows_read"]
    assert any(f"{path}:3" in example for example in report["skipped_examples"]["bad_row"])


def test_parquet_rows_read_with_row_numbers(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "good words"}, {"text": None}]), path)
    with pytest.raises(BadRowError, match=r"rows.parquet:2, field '<row>'"):
        build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig())


def test_length_policies_truncate_and_drop(tiny_tokenizer):
    long_text = " ".join(["And it came to pass"] * 40)
    short_text = "Jesus wept"
    truncated = build_corpus(rows_of({"text": long_text}, {"text": short_text}), tiny_tokenizer, "tok",
                             CorpusConfig(max_length=16, length_policy="truncate"))
    lengths = sorted(r["length"] for r in truncated.samples.to_pylist())
    assert lengths[-1] == 16 and truncated.meta["report"]["truncated"] == 1
    full = encode(tiny_tokenizer, long_text)
    long_row = max(truncated.samples.to_pylist(), key=lambda r: r["length"])
    assert long_row["input_ids"] == full[:16]
    dropped = build_corpus(rows_of({"text": long_text}, {"text": short_text}), tiny_tokenizer, "tok",
                           CorpusConfig(max_length=16, length_policy="drop"))
    assert dropped.samples.num_rows == 1
    assert dropped.meta["report"]["skipped"] == {"over_length_dropped": 1}


def test_corpus_round_trips_and_detects_tampering(tmp_path, tiny_tokenizer):
    corpus = build_corpus(rows_of(*make_records(5)), tiny_tokenizer, "tok", CorpusConfig())
    corpus.save(tmp_path / "c")
    loaded = TokenizedCorpus.load(tmp_path / "c")
    assert loaded.samples.equals(corpus.samples) and loaded.meta == json.loads(json.dumps(corpus.meta))
    table = loaded.samples.set_column(1, "input_ids", pa.array([[1, 2]] * 5, pa.list_(pa.int32())))
    pq.write_table(table, tmp_path / "c" / "samples.parquet")
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        TokenizedCorpus.load(tmp_path / "c")


def test_config_and_source_errors_name_the_parameter():
    with pytest.raises(ValueError, match="length_policy must be 'truncate' or 'drop'"):
        CorpusConfig(length_policy="cut")
    with pytest.raises(ValueError, match=r"corpus_prep: unknown key\(s\) \['max_len'\]"):
        CorpusConfig.from_params({"max_len": 3})
    with pytest.raises(ValueError, match="source.kind must be"):
        source_rows({"kind": "web"})
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(source_rows({"kind": "files", "paths": ["nope.jsonl"]}))


def test_kjv_chat_rows_are_deterministic_chat_turns():
    first = list(kjv_chat_rows(KJVChatSource(num_passages=5, verses_per_passage=3, prompt_verses=1)))
    again = list(kjv_chat_rows(KJVChatSource(num_passages=5, verses_per_passage=3, prompt_verses=1)))
    assert [r.data for r in first] == [r.data for r in again]
    roles = [m["role"] for m in first[0].data["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert not re.search(r"\d+:\d+", first[0].data["messages"][2]["content"])  # verse references removed


def test_non_parquet_file_with_parquet_suffix_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "export.parquet"
    path.write_text('{"text": "this is JSONL, not Parquet"}\n')
    with pytest.raises(ValueError) as caught:
        build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig())
    message = str(caught.value)
    assert f"corpus_prep.source.paths: {path} is not a readable Parquet file (at open)" in message
    assert "magic bytes" in message  # pyarrow's own reason is kept


def test_torn_parquet_file_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "torn.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i}"} for i in range(50)]), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable Parquet file")):
        build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig())


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_source_file_is_named(tmp_path, tiny_tokenizer, suffix):
    good = write_jsonl(tmp_path / "good.jsonl", [b'{"text": "fine row"}\n'])
    empty = tmp_path / f"empty{suffix}"
    if suffix == ".jsonl":
        empty.write_bytes(b"")
    else:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    for paths in ([empty], [good, empty]):
        with pytest.raises(ValueError, match=re.escape(f"corpus_prep.source.paths: {empty} is empty (0 rows)")):
            build_corpus(read_file_rows([str(p) for p in paths]), tiny_tokenizer, "tok", CorpusConfig())


def test_no_samples_error_names_the_files_read(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "blank.jsonl", [b"\n", b"  \n"])
    with pytest.raises(ValueError, match=re.escape(f"no samples from 2 rows of {path} (2 rows)")):
        build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig())


def test_truncated_rows_are_located_in_the_report(tmp_path, tiny_tokenizer):
    long_line = json.dumps({"text": " ".join(["And it came to pass"] * 40)}).encode() + b"\n"
    path = write_jsonl(tmp_path / "long.jsonl", [b'{"text": "Jesus wept"}\n', long_line])
    corpus = build_corpus(read_file_rows([str(path)]), tiny_tokenizer, "tok", CorpusConfig(max_length=16))
    report = corpus.meta["report"]
    full_length = len(encode(tiny_tokenizer, " ".join(["And it came to pass"] * 40))) + 1  # + EOS
    assert report["truncated"] == 1
    assert report["truncated_examples"] == [f"{path}:2 ({full_length} -> 16 tokens)"]


def test_utf8_bom_is_accepted_and_counted(tmp_path, tiny_tokenizer):
    with_bom = write_jsonl(tmp_path / "bom.jsonl", [b'\xef\xbb\xbf{"text": "In the beginning"}\n', b'{"text": "God created"}\n'])
    plain = write_jsonl(tmp_path / "plain.jsonl", [b'{"text": "In the beginning"}\n', b'{"text": "God created"}\n'])
    corpus = build_corpus(read_file_rows([str(with_bom)]), tiny_tokenizer, "tok", CorpusConfig())
    reference = build_corpus(read_file_rows([str(plain)]), tiny_tokenizer, "tok", CorpusConfig())
    assert corpus.samples.num_rows == 2
    assert corpus.samples["input_ids"].to_pylist() == reference.samples["input_ids"].to_pylist()
    assert corpus.meta["report"]["utf8_bom_stripped"] == 1
    assert corpus.meta["report"]["utf8_bom_files"] == [str(with_bom)]
    assert reference.meta["report"]["utf8_bom_stripped"] == 0
    # A BOM anywhere but the start of the file is content, still refused by line.
    later = write_jsonl(tmp_path / "later.jsonl", [b'{"text": "ok"}\n', b'\xef\xbb\xbf{"text": "no"}\n'])
    with pytest.raises(BadRowError, match=re.escape(f"{later}:2, field '<line>': malformed JSON")):
        build_corpus(read_file_rows([str(later)]), tiny_tokenizer, "tok", CorpusConfig())


def test_samples_keep_their_text_and_the_byte_end_of_every_token(tiny_tokenizer):
    """What cross-tokenizer distillation needs to align another tokenizer without the teacher."""
    from kd_pipeline.core.cross_tokenizer.token_bytes import token_bytes

    messages = [{"role": "user", "content": "Say light, café 東京."}, {"role": "assistant", "content": "Let there be light 😀."}]
    rows = rows_of({"text": "In the beginning, naïve 2024"}, {"messages": messages},
                   {"prompt": "Who spake?", "response": " The LORD spake."})
    pieces = token_bytes(tiny_tokenizer)
    for config in (CorpusConfig(), CorpusConfig(prompt_response_as_chat=False), CorpusConfig(max_length=9)):
        corpus = build_corpus(rows, tiny_tokenizer, "tok", config)
        for sample in corpus.samples.to_pylist():
            data, ends = sample["text"].encode("utf-8"), sample["byte_ends"]
            assert len(ends) == len(sample["input_ids"])
            previous = 0
            for token_id, end in zip(sample["input_ids"], ends):
                piece = pieces.pieces[token_id]
                special = tiny_tokenizer.convert_ids_to_tokens(token_id)
                # Ordinary tokens are their bytes; specials are their text (or zero-width, the EOS).
                assert data[previous:end] in ((piece,) if piece is not None else (special.encode(), b""))
                previous = end
            if config.max_length != 9:  # untruncated: the tokens cover the whole text
                assert previous == len(data)
