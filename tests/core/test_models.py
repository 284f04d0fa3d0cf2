"""Model loading and initialization: teacher preparation (GGUF, HF folder, random init), student
initialization (prune_teacher, from_config, from_pretrained), identities, Liger switch, tiny fixture.

The GGUF -> HF conversion is checked end to end on a tiny Llama written to a GGUF file here with
`gguf.GGUFWriter` (F32 tensors, byte-level BPE tokenizer, chat template), laid out the way
llama.cpp's converter lays it out; the real embedded SmolLM2 teacher is converted once in the
`slow` test at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from kd_pipeline.core.atomic import sha256_file
from kd_pipeline.core.models.identity import model_identity, tokenizer_hash
from kd_pipeline.core.models.liger import liger_kernel_arguments
from kd_pipeline.core.models.loading import load_causal_lm, load_tokenizer
from kd_pipeline.core.models.student import StudentInit, evenly_spaced_layers, init_student, select_layers
from kd_pipeline.core.models.teacher import TEACHER_SOURCE_FILE, TeacherSource, embedded_gguf_path, prepare_teacher
from kd_pipeline.core.tiny import (
    CHATML_SPECIAL_TOKENS,
    TINY_LLAMA_CONFIG,
    TINY_TOKENIZER_RELATIVE_DIR,
    TINY_VOCAB_SIZE,
    tiny_llama_config,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER_DIR = PROJECT_ROOT / TINY_TOKENIZER_RELATIVE_DIR
CHAT = [
    {"role": "user", "content": "Continue: In the beginning God created"},
    {"role": "assistant", "content": "the heaven and the earth."},
]
SAMPLE_TEXT = "And God said, Let there be light: and there was light. 1234 ünïcödé"


def random_init_params(**overrides) -> dict:
    """The teacher params the `test` env uses (random tiny Llama, tiny tokenizer)."""
    return {"kind": "random_init", "tokenizer_path": str(TINY_TOKENIZER_DIR), "seed": 0, **overrides}


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def sample_ids(vocab_size: int, seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A prepared random tiny teacher (4 layers, tied embeddings), shared by the module."""
    out_dir = tmp_path_factory.mktemp("teacher") / "teacher"
    prepare_teacher(TeacherSource.from_params(random_init_params()), out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return load_causal_lm(tiny_teacher_dir)


# --------------------------------------------------------------------------------------------
# The tiny fixture tokenizer and config
# --------------------------------------------------------------------------------------------


def test_tiny_tokenizer_matches_tiny_config_and_chatml_ids():
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    assert len(tokenizer) == TINY_VOCAB_SIZE == TINY_LLAMA_CONFIG["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(list(CHATML_SPECIAL_TOKENS)) == [0, 1, 2]
    roles = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert roles == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert TINY_LLAMA_CONFIG["eos_token_id"] == tokenizer.eos_token_id
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SAMPLE_TEXT  # byte-level: any text round-trips
    assert sum(path.stat().st_size for path in TINY_TOKENIZER_DIR.iterdir()) < 64 * 1024


def test_tiny_tokenizer_renders_chats_like_smollm2():
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    text = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nContinue: In the beginning God created<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=False, return_dict=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # specials stay whole


def test_tiny_llama_config_copy_is_independent():
    config = tiny_llama_config(num_hidden_layers=6)
    config["hidden_size"] = 8
    assert TINY_LLAMA_CONFIG["num_hidden_layers"] == 4 and TINY_LLAMA_CONFIG["hidden_size"] == 32


# --------------------------------------------------------------------------------------------
# TeacherSource / StudentInit parameters
# --------------------------------------------------------------------------------------------


def test_teacher_source_defaults_to_embedded_gguf():
    assert TeacherSource.from_params({}).kind == "embedded_gguf"
    assert TeacherSource.from_params(None).kind == "embedded_gguf"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"kind": "hf_folder", "path": "x", "revision": "main"}, r"corpus_prep.teacher: unknown key\(s\) \['revision'\]"),
        ({"kind": "pytorch_bin"}, r"corpus_prep.teacher.kind must be one of \[.*\], got 'pytorch_bin'"),
        ({"kind": "gguf_file"}, "needs `path`"),
        ({"kind": "random_init"}, "needs `tokenizer_path`"),
        ({"kind": "embedded_gguf", "path": "/x.gguf"}, r"does not use parameter\(s\) \['path'\]"),
        ({"kind": "gguf_file", "path": "a.gguf", "trust_remote_code": True}, r"\['trust_remote_code'\]"),
        ({"kind": "random_init", "tokenizer_path": "t", "seed": "0"}, "corpus_prep.teacher.seed must be an int"),
    ],
)
def test_teacher_source_errors_name_the_problem(params, message):
    with pytest.raises(ValueError, match=message):
        TeacherSource.from_params(params)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"method": "prune_teacher", "keep_layer": [0]}, r"distill.student_init: unknown key\(s\) \['keep_layer'\]"),
        ({"method": "distil"}, r"distill.student_init.method must be one of \[.*\], got 'distil'"),
        ({"method": "from_pretrained"}, "needs `path`"),
        ({"method": "from_config"}, "needs `config`"),
        ({"keep_layers": [0], "num_layers": 2}, "one of keep_layers, keep_every, num_layers"),
        ({"method": "from_config", "config": {}, "keep_layers": [0]}, r"does not use parameter\(s\) \['keep_layers'\]"),
    ],
)
def test_student_init_errors_name_the_problem(params, message):
    with pytest.raises(ValueError, match=message):
        StudentInit.from_params(params)


# --------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------


def test_default_selection_keeps_a_third_evenly_spaced_with_first_and_last():
    assert select_layers(30) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(30, 10) == select_layers(30)
    assert select_layers(30, num_layers=2) == [0, 29]
    assert select_layers(30, num_layers=30) == list(range(30))
    assert select_layers(4, num_layers=1) == [0]
    assert select_layers(30, keep_every=3) == list(range(0, 30, 3))
    assert select_layers(5, keep_layers=[1, 4]) == [1, 4]


def test_drop_layers_keeps_every_other_layer_in_order():
    assert select_layers(30, drop_layers=[26, 22, 23, 24, 25]) == list(range(22)) + [27, 28, 29]
    assert select_layers(4, drop_layers=[]) == [0, 1, 2, 3]
    assert StudentInit.from_params({"drop_layers": [1, 2]}).drop_layers == [1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_layers": [0, 4]}, r"keep_layers \[4\] out of range: the teacher has 4 layers \(valid indices 0..3\)"),
        ({"keep_layers": [-1, 2]}, r"keep_layers \[-1\] out of range"),
        ({"keep_layers": [0, 2, 2]}, r"keep_layers repeats layer\(s\) \[2\]"),
        ({"keep_layers": [2, 0]}, r"keep_layers must be in increasing order .* got \[2, 0\]"),
        ({"keep_layers": []}, "keep_layers is empty"),
        ({"keep_layers": [0, "1"]}, "keep_layers must hold integers"),
        ({"keep_layers": "0,1"}, "keep_layers must be a list"),
        ({"keep_every": 0}, "keep_every must be a positive integer"),
        ({"num_layers": 5}, "num_layers must be between 1 and the teacher's 4 layers"),
        ({"keep_every": 2, "num_layers": 2}, "one of keep_layers, keep_every, num_layers"),
        ({"drop_layers": [0, 1, 2, 3]}, "drop_layers removes all 4 teacher layers"),
        ({"drop_layers": [4]}, r"drop_layers \[4\] out of range: the teacher has 4 layers"),
        ({"drop_layers": [1, 1]}, r"drop_layers repeats layer\(s\) \[1\]"),
        ({"drop_layers": [1.0]}, "drop_layers must hold integers"),
        ({"drop_layers": [1], "num_layers": 2}, "one of keep_layers, keep_every, num_layers, drop_layers"),
    ],
)
def test_bad_layer_selection_is_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_layers(4, **kwargs)


# --------------------------------------------------------------------------------------------
# random_init / hf_folder teachers, reuse and replacement
# --------------------------------------------------------------------------------------------


def test_random_init_teacher_folder_is_complete_and_reloads(tiny_teacher_dir, tiny_teacher):
    record = json.loads((tiny_teacher_dir / TEACHER_SOURCE_FILE).read_text())
    assert record["identity"]["kind"] == "random_init"
    assert record["num_layers"] == 4 and record["vocab_size"] == TINY_VOCAB_SIZE
    assert record["num_parameters"] == sum(p.numel() for p in tiny_teacher.parameters())
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (tiny_teacher_dir / name).is_file(), name
    assert tiny_teacher.config.tie_word_embeddings
    assert tiny_teacher.lm_head.weight is tiny_teacher.model.embed_tokens.weight
    tokenizer = load_tokenizer(tiny_teacher_dir)
    assert tokenizer_hash(tokenizer) == record["tokenizer_hash"] == tokenizer_hash(load_tokenizer(TINY_TOKENIZER_DIR))
    assert not list(tiny_teacher_dir.parent.glob("*.tmp-*"))


def test_prepare_teacher_reuses_same_source_and_replaces_a_different_one(tmp_path):
    out_dir = tmp_path / "teacher"
    first = prepare_teacher(TeacherSource.from_params(random_init_params(seed=1)), out_dir)
    again = prepare_teacher(TeacherSource.from_params(random_init_params(seed=1)), out_dir)
    assert (first["reused"], again["reused"]) == (False, True)
    assert again["model"] == first["model"]
    assert again["seconds"] < 2.0

    other = prepare_teacher(TeacherSource.from_params(random_init_params(seed=2)), out_dir)
    assert not other["reused"]
    assert other["model"]["weights_sha256"] != first["model"]["weights_sha256"]
    assert model_identity(out_dir) == other["model"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["teacher"]  # no tmp/old leftovers

    # A fresh folder from the same seed is bit-identical: random init is reproducible.
    twin = prepare_teacher(TeacherSource.from_params(random_init_params(seed=2)), tmp_path / "twin")
    assert twin["model"] == other["model"]


def test_prepare_teacher_rebuilds_an_incomplete_folder(tmp_path):
    out_dir = tmp_path / "teacher"
    prepare_teacher(TeacherSource.from_params(random_init_params()), out_dir)
    (out_dir / "model.safetensors").unlink()
    assert not prepare_teacher(TeacherSource.from_params(random_init_params()), out_dir)["reused"]
    assert (out_dir / "model.safetensors").is_file()


def test_random_init_vocab_must_match_tokenizer(tmp_path):
    params = random_init_params(config=tiny_llama_config(vocab_size=600))
    with pytest.raises(ValueError, match="config vocab_size 600 does not match the 512 tokens of the tokenizer"):
        prepare_teacher(TeacherSource.from_params(params), tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()
    assert not list(tmp_path.iterdir())


def test_hf_folder_teacher_is_hardlinked_and_identified_by_content(tmp_path, tiny_teacher_dir):
    source_dir = tmp_path / "my_teacher"
    shutil.copytree(tiny_teacher_dir, source_dir)
    (source_dir / TEACHER_SOURCE_FILE).unlink()
    (source_dir / "generation_config.json").unlink()  # recreated from the config
    (source_dir / "README.md").write_text("not copied")
    params = {"kind": "hf_folder", "path": str(source_dir)}

    record = prepare_teacher(TeacherSource.from_params(params), tmp_path / "teacher")
    out_dir = tmp_path / "teacher"
    assert os.path.samefile(out_dir / "model.safetensors", source_dir / "model.safetensors")
    assert (out_dir / "generation_config.json").is_file() and not (out_dir / "README.md").exists()
    assert record["model"]["weights_sha256"] == model_identity(tiny_teacher_dir)["weights_sha256"]
    assert prepare_teacher(TeacherSource.from_params(params), out_dir)["reused"]

    # Changed content (same path) is a different source: the folder is rebuilt.
    (source_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert not prepare_teacher(TeacherSource.from_params(params), out_dir)["reused"]
    assert load_tokenizer(out_dir).chat_template == "{{ messages[0]['content'] }}"


def test_hf_folder_with_only_pickle_weights_is_refused(tmp_path, tiny_teacher_dir):
    source_dir = tmp_path / "bin_only"
    source_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_teacher_dir / name, source_dir / name)
    (source_dir / "pytorch_model.bin").write_bytes(b"pickle")
    source = TeacherSource.from_params({"kind": "hf_folder", "path": str(source_dir)})
    with pytest.raises(ValueError, match=r"no \*.safetensors weights; found only pickle weights \['pytorch_model.bin'\]"):
        prepare_teacher(source, tmp_path / "t")


def test_missing_local_folders_never_reach_a_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("HuggingFaceTB/SmolLM2-135M")


def test_load_causal_lm_casts_dtype(tiny_teacher_dir):
    model = load_causal_lm(tiny_teacher_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    with pytest.raises(ValueError, match="unknown floating dtype"):
        load_causal_lm(tiny_teacher_dir, dtype="int8")


# --------------------------------------------------------------------------------------------
# GGUF -> HF conversion on a tiny GGUF written here
# --------------------------------------------------------------------------------------------


def llama_cpp_rotary_layout(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows the way llama.cpp stores them.

    HF Llama rotates the two halves of each head's dimensions together; llama.cpp rotates
    adjacent pairs, so its converter interleaves the halves of every head's rows. The GGUF
    loader in transformers undoes this, so a faithful test file must apply it.
    """
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def write_tiny_gguf(model, tokenizer, path: Path) -> None:
    """Write `model` (a tiny LlamaForCausalLM) and its byte-level BPE tokenizer as an F32 GGUF."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    special_ids = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types([
        gguf.TokenType.CONTROL if index in special_ids else gguf.TokenType.NORMAL for index in range(len(tokenizer))
    ])
    writer.add_token_merges([" ".join(pair) for pair in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    def add(name: str, tensor: torch.Tensor) -> None:
        writer.add_tensor(name, tensor.detach().to(torch.float32).contiguous().numpy())

    state = model.state_dict()
    add("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        add(f"blk.{layer}.attn_norm.weight", state[prefix + "input_layernorm.weight"])
        add(f"blk.{layer}.attn_q.weight",
            llama_cpp_rotary_layout(state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads))
        add(f"blk.{layer}.attn_k.weight",
            llama_cpp_rotary_layout(state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads))
        add(f"blk.{layer}.attn_v.weight", state[prefix + "self_attn.v_proj.weight"])
        add(f"blk.{layer}.attn_output.weight", state[prefix + "self_attn.o_proj.weight"])
        add(f"blk.{layer}.ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"])
        add(f"blk.{layer}.ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"])
        add(f"blk.{layer}.ffn_up.weight", state[prefix + "mlp.up_proj.weight"])
        add(f"blk.{layer}.ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_tiny_llama(seed: int, **config_overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = tiny_llama_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        # Norm weights start at 1; randomize them so a mixed-up norm cannot go unnoticed.
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_conversion_reproduces_the_model_and_tokenizer(tmp_path, tied):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    original = random_tiny_llama(seed=3, tie_word_embeddings=tied)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(original, tokenizer, gguf_path)

    out_dir = tmp_path / "teacher"
    record = prepare_teacher(TeacherSource.from_params({"kind": "gguf_file", "path": str(gguf_path)}), out_dir)
    assert record["identity"]["gguf_sha256"] == sha256_file(gguf_path)
    assert not (out_dir / "config.json").read_text().count("quantization_config")

    converted = load_causal_lm(out_dir)
    assert converted.config.tie_word_embeddings == tied
    assert converted.config.num_hidden_layers == 4 and converted.config.num_key_value_heads == 2
    ids = sample_ids(TINY_VOCAB_SIZE)
    torch.testing.assert_close(logits_of(converted, ids), logits_of(original, ids))

    converted_tokenizer = load_tokenizer(out_dir)
    assert len(converted_tokenizer) == len(tokenizer)
    assert converted_tokenizer.chat_template == tokenizer.chat_template
    for text in (SAMPLE_TEXT, tokenizer.apply_chat_template(CHAT, tokenize=False)):
        assert converted_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (converted_tokenizer.eos_token, converted_tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")

    assert prepare_teacher(TeacherSource.from_params({"kind": "gguf_file", "path": str(gguf_path)}), out_dir)["reused"]


@pytest.mark.parametrize("bf16_exact", [True, False], ids=["bf16-exact", "not-exact"])
def test_gguf_conversion_saves_bf16_only_when_every_value_is_bf16_exact(tmp_path, bf16_exact):
    from safetensors import safe_open

    from kd_pipeline.core.models.teacher import is_bf16_exact

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    original = random_tiny_llama(seed=5)
    if bf16_exact:
        for parameter in original.parameters():
            parameter.data = parameter.data.bfloat16().float()
    assert is_bf16_exact(original.state_dict()) == bf16_exact
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(original, tokenizer, gguf_path)
    out_dir = tmp_path / "teacher"
    prepare_teacher(TeacherSource.from_params({"kind": "gguf_file", "path": str(gguf_path)}), out_dir)
    with safe_open(str(out_dir / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == ({"BF16"} if bf16_exact else {"F32"})
    # Either way the folder holds the dequantized values exactly.
    ids = sample_ids(TINY_VOCAB_SIZE)
    torch.testing.assert_close(logits_of(load_causal_lm(out_dir, dtype=torch.float32), ids), logits_of(original, ids),
                               rtol=0, atol=0)


def test_has_native_bf16_follows_the_override_and_drives_auto_dtypes(monkeypatch):
    from kd_pipeline.core.devices import has_native_bf16, resolve_dtype

    cpu = torch.device("cpu")
    monkeypatch.setenv("KD_PIPELINE_NATIVE_BF16", "1")
    assert has_native_bf16(cpu) and resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setenv("KD_PIPELINE_NATIVE_BF16", "0")
    assert not has_native_bf16(cpu) and resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.delenv("KD_PIPELINE_NATIVE_BF16")
    detected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert has_native_bf16(cpu) == detected
    assert resolve_dtype("auto") == torch.float32  # no device: float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Student initialization
# --------------------------------------------------------------------------------------------


def hand_built_pruned_model(teacher, keep: list[int]):
    """The reference for prune_teacher: a fresh model of len(keep) layers, filled module by module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**teacher.config.to_dict(), "num_hidden_layers": len(keep)})
    model = LlamaForCausalLM(config).eval()
    model.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    for position, layer in enumerate(keep):
        model.model.layers[position].load_state_dict(teacher.model.layers[layer].state_dict())
    model.model.norm.load_state_dict(teacher.model.norm.state_dict())
    model.lm_head.load_state_dict(teacher.lm_head.state_dict())
    return model


@pytest.mark.parametrize("keep", [[0, 2, 3], [1], [0, 1, 2, 3]])
def test_pruned_student_equals_hand_built_model_of_kept_layers(tiny_teacher_dir, tiny_teacher, keep):
    student, tokenizer = init_student(StudentInit.from_params({"keep_layers": keep}), tiny_teacher_dir)
    reference = hand_built_pruned_model(tiny_teacher, keep)
    ids = sample_ids(TINY_VOCAB_SIZE, seed=len(keep))
    torch.testing.assert_close(logits_of(student, ids), logits_of(reference, ids), rtol=0, atol=0)
    assert student.config.num_hidden_layers == len(keep)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(len(keep)))
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tie preserved
    assert tokenizer_hash(tokenizer) == tokenizer_hash(load_tokenizer(tiny_teacher_dir))
    if keep == [0, 1, 2, 3]:
        torch.testing.assert_close(logits_of(student, ids), logits_of(tiny_teacher, ids), rtol=0, atol=0)
    # The student is its own model: training it leaves the teacher untouched.
    assert student.model.embed_tokens.weight.data_ptr() != tiny_teacher.model.embed_tokens.weight.data_ptr()


def test_pruning_an_untied_teacher_keeps_a_separate_head(tmp_path):
    out_dir = tmp_path / "teacher"
    untied = random_init_params(config=tiny_llama_config(tie_word_embeddings=False))
    prepare_teacher(TeacherSource.from_params(untied), out_dir)
    teacher = load_causal_lm(out_dir)
    student, _ = init_student(StudentInit.from_params({"keep_every": 2}), out_dir)
    assert student.lm_head.weight is not student.model.embed_tokens.weight
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight, rtol=0, atol=0)
    ids = sample_ids(TINY_VOCAB_SIZE)
    torch.testing.assert_close(logits_of(student, ids), logits_of(hand_built_pruned_model(teacher, [0, 2]), ids))


def test_drop_layers_student_matches_the_hand_built_pruned_teacher(tiny_teacher_dir):
    teacher = load_causal_lm(tiny_teacher_dir)
    student, _ = init_student(StudentInit.from_params({"drop_layers": [2, 1]}), tiny_teacher_dir)
    assert student.config.num_hidden_layers == 2
    ids = sample_ids(TINY_VOCAB_SIZE)
    torch.testing.assert_close(logits_of(student, ids), logits_of(hand_built_pruned_model(teacher, [0, 3]), ids))


def test_pruned_student_out_of_range_layer_is_refused(tiny_teacher_dir):
    with pytest.raises(ValueError, match=r"keep_layers \[7\] out of range: the teacher has 4 layers"):
        init_student(StudentInit.from_params({"keep_layers": [0, 7]}), tiny_teacher_dir)


def test_pruned_student_saves_and_reloads(tmp_path, tiny_teacher_dir):
    student, tokenizer = init_student(StudentInit.from_params({"num_layers": 2}), tiny_teacher_dir)
    student.save_pretrained(tmp_path / "student")
    reloaded = load_causal_lm(tmp_path / "student")
    ids = sample_ids(TINY_VOCAB_SIZE)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(student, ids), rtol=0, atol=0)


def test_from_config_student_is_seeded_and_takes_the_teacher_vocab(tiny_teacher_dir):
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    def student(seed):
        return init_student(StudentInit.from_params({"method": "from_config", "config": config, "seed": seed}),
                            tiny_teacher_dir)

    (first, tokenizer), (second, _), (other, _) = student(5), student(5), student(6)
    assert first.config.vocab_size == TINY_VOCAB_SIZE and len(tokenizer) == TINY_VOCAB_SIZE
    ids = sample_ids(TINY_VOCAB_SIZE)
    torch.testing.assert_close(logits_of(first, ids), logits_of(second, ids), rtol=0, atol=0)
    assert not torch.equal(logits_of(first, ids), logits_of(other, ids))


def test_from_config_vocab_mismatch_names_both_sizes(tiny_teacher_dir):
    params = {"method": "from_config", "config": tiny_llama_config(vocab_size=1000)}
    expected = r"student vocab_size 1000 \(student config\) does not match teacher vocab_size 512"
    with pytest.raises(ValueError, match=expected):
        init_student(StudentInit.from_params(params), tiny_teacher_dir)
    with pytest.raises(ValueError, match="needs `model_type`"):
        init_student(StudentInit.from_params({"method": "from_config", "config": {"hidden_size": 8}}), tiny_teacher_dir)


def test_from_pretrained_student_uses_its_own_matching_tokenizer(tmp_path, tiny_teacher_dir):
    student_dir = tmp_path / "student"
    random_tiny_llama(seed=9, num_hidden_layers=2).save_pretrained(student_dir)
    init = StudentInit.from_params({"method": "from_pretrained", "path": str(student_dir)})
    model, tokenizer = init_student(init, tiny_teacher_dir)
    assert model.config.num_hidden_layers == 2
    assert tokenizer.name_or_path == str(tiny_teacher_dir)  # no tokenizer of its own: the teacher's

    load_tokenizer(TINY_TOKENIZER_DIR).save_pretrained(student_dir)
    _, tokenizer = init_student(init, tiny_teacher_dir)
    assert tokenizer.name_or_path == str(student_dir)


def test_auto_map_custom_code_of_a_known_model_type_is_ignored_out_loud(tmp_path, caplog):
    """A student folder whose config.json points at its own code (`auto_map`) but whose
    model_type is known loads as the plain class with trust_remote_code off; that is logged."""
    student_dir = tmp_path / "student"
    random_tiny_llama(seed=9, num_hidden_layers=2).save_pretrained(student_dir)
    config = json.loads((student_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (student_dir / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):  # must never run
        (student_dir / name).write_text("raise RuntimeError('the custom code ran')\n")
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.core.models.loading"):
        model = load_causal_lm(student_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert caplog.text.count("custom code ignored") == 1
    assert (f"{student_dir}: custom code ignored: config.json auto_map names modeling_custom.CustomForCausalLM "
            "(AutoModelForCausalLM), but trust_remote_code is off, so the built-in LlamaForCausalLM for model_type "
            "'llama' was loaded instead; set trust_remote_code: true for this folder only if you trust its code"
            ) in caplog.text
    caplog.clear()
    config.pop("auto_map")
    (student_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="kd_pipeline.core.models.loading"):
        load_causal_lm(student_dir)
    assert "custom code ignored" not in caplog.text  # a plain folder loads silently


def test_from_pretrained_student_with_other_vocab_is_refused(tmp_path, tiny_teacher_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    student_dir = tmp_path / "student"
    random_tiny_llama(seed=9).save_pretrained(student_dir)
    backend = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(student_dir)
    expected = f"student tokenizer at {student_dir} has 2 tokens but the teacher tokenizer at {tiny_teacher_dir} has 512"
    with pytest.raises(ValueError, match=re.escape(expected)):
        init_student(StudentInit.from_params({"method": "from_pretrained", "path": str(student_dir)}), tiny_teacher_dir)

    other_dir = tmp_path / "other_vocab"
    random_tiny_llama(seed=9, vocab_size=640).save_pretrained(other_dir)
    expected = f"student vocab_size 640 (student {other_dir}) does not match teacher vocab_size 512"
    with pytest.raises(ValueError, match=re.escape(expected)):
        init_student(StudentInit.from_params({"method": "from_pretrained", "path": str(other_dir)}), tiny_teacher_dir)


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------


def test_model_identity_is_content_based_and_ignores_writer_version(tmp_path, tiny_teacher):
    tiny_teacher.save_pretrained(tmp_path / "a")
    tiny_teacher.save_pretrained(tmp_path / "b")
    first = model_identity(tmp_path / "a")
    assert first == model_identity(tmp_path / "b")
    assert len(first["weights_sha256"]) == 64 and first["weights_files"] == ["model.safetensors"]

    config_path = tmp_path / "b" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "transformers_version": "9.9.9"}, indent=4))
    assert model_identity(tmp_path / "b") == first  # same model, other writer / formatting
    config_path.write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert model_identity(tmp_path / "b")["config_sha256"] != first["config_sha256"]
    assert model_identity(tmp_path / "b")["weights_sha256"] == first["weights_sha256"]


def test_tokenizer_hash_is_stable_across_save_reload_and_sensitive_to_content(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    original = tokenizer_hash(tokenizer)
    tokenizer.save_pretrained(tmp_path / "once")
    once = load_tokenizer(tmp_path / "once")
    once.save_pretrained(tmp_path / "twice")
    assert tokenizer_hash(once) == tokenizer_hash(load_tokenizer(tmp_path / "twice")) == original

    # Truncating at call time changes the backend's state, not the tokenizer.
    once("a long line of text " * 10, truncation=True, max_length=4)
    assert tokenizer_hash(once) == original

    once.chat_template = once.chat_template.replace("SmolLM", "TinyLM")
    assert tokenizer_hash(once) != original
    other = load_tokenizer(TINY_TOKENIZER_DIR)
    other.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_hash(other) != original


# --------------------------------------------------------------------------------------------
# Liger switch (CPU-side behaviour; the CUDA patch itself runs in the GPU check)
# --------------------------------------------------------------------------------------------


OFF = {"use_liger_kernel": False}


def test_liger_on_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="liger: on requires CUDA"):
        liger_kernel_arguments("on", "llama", "cpu")
    with pytest.raises(ValueError, match="liger: mode 'yes' is not one of"):
        liger_kernel_arguments("yes", "llama", "cpu")


def test_liger_auto_on_cpu_is_off_with_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="kd_pipeline.core.models.liger"):
        assert liger_kernel_arguments("auto", "llama", "cpu") == OFF
    lines = [record for record in caplog.records if record.name == "kd_pipeline.core.models.liger"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "liger: off" in lines[0].getMessage()
    assert liger_kernel_arguments("off", "llama", "cpu") == OFF


@pytest.fixture
def fake_cuda_liger(monkeypatch):
    """Pretend CUDA is there and stand in for liger's architecture table.

    The real table is checked by name in the source (importing liger's monkey_patch costs
    seconds) and exercised for real by the GPU check script.
    """
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": lambda **kwargs: None}
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_liger_on_cuda_asks_for_norm_rope_swiglu_but_never_the_fused_ce(fake_cuda_liger):
    for mode, device in (("auto", "cuda"), ("on", torch.device("cuda", 0))):
        arguments = liger_kernel_arguments(mode, "llama", device)
        assert arguments["use_liger_kernel"] is True
        config = arguments["liger_kernel_config"]
        assert (config["rms_norm"], config["rope"], config["swiglu"]) == (True, True, True)
        assert (config["fused_linear_cross_entropy"], config["cross_entropy"]) == (False, False)


def test_liger_unsupported_architecture_errors_when_on_and_skips_when_auto(fake_cuda_liger, caplog):
    expected = "liger: no Liger kernels for architecture 'mystery'; supported: ['llama']"
    with pytest.raises(ValueError, match=re.escape(expected)):
        liger_kernel_arguments("on", "mystery", "cuda")
    with caplog.at_level(logging.INFO, logger="kd_pipeline.core.models.liger"):
        assert liger_kernel_arguments("auto", "mystery", "cuda") == OFF
    assert "no Liger kernels for architecture 'mystery'" in caplog.text


def test_hf_trainer_applies_liger_with_the_configured_kernels():
    """The switch is HF's own: Trainer.train calls its liger integration with our config, which
    hands it to liger's instance patcher (checked in the installed sources: no CUDA needed)."""
    import inspect

    import transformers.trainer
    from transformers.integrations import liger

    assert "apply_liger_kernel(self.model, self.args.liger_kernel_config)" in inspect.getsource(transformers.trainer)
    assert "_apply_liger_kernel_to_instance(model=base_model, **kernel_config)" in inspect.getsource(liger)


def test_real_liger_table_has_the_name_used():
    import importlib.util

    spec = importlib.util.find_spec("liger_kernel")
    if spec is None:
        pytest.skip("liger-kernel not installed")
    source = (Path(spec.submodule_search_locations[0]) / "transformers" / "monkey_patch.py").read_text()
    assert "MODEL_TYPE_TO_APPLY_LIGER_FN = {" in source
    assert '"llama": apply_liger_kernel_to_llama' in source


# --------------------------------------------------------------------------------------------
# The real embedded teacher
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_teacher_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 teacher converted once per test session (~30-50 s on 2 cores)."""
    pytest.importorskip("gguf")
    try:
        embedded_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))
    out_dir = tmp_path_factory.mktemp("real_teacher") / "teacher"
    prepare_teacher(TeacherSource.from_params({}), out_dir)
    return out_dir


@pytest.mark.slow
def test_real_embedded_teacher_converts_and_reloads(real_teacher_dir):
    record = json.loads((real_teacher_dir / TEACHER_SOURCE_FILE).read_text())
    assert record["identity"]["kind"] == "embedded_gguf" and len(record["identity"]["gguf_sha256"]) == 64
    assert record["num_parameters"] == 134_515_008

    again = prepare_teacher(TeacherSource.from_params({"kind": "embedded_gguf"}), real_teacher_dir)
    assert again["reused"] and again["seconds"] < 3.0

    model = load_causal_lm(real_teacher_dir)
    config = model.config
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (49152, 30, 576)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight

    tokenizer = load_tokenizer(real_teacher_dir)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer_hash(tokenizer) == record["tokenizer_hash"]
    text = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and text.startswith("<|im_start|>system\n")
    # The tiny fixture tokenizer carries exactly this chat template.
    assert load_tokenizer(TINY_TOKENIZER_DIR).chat_template == tokenizer.chat_template

    ids = torch.tensor([tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    # An instruct model asked to continue a verse answers with ordinary text, not a special token.
    assert logits.argmax().item() not in tokenizer.all_special_ids

    # Default student: 10 of the 30 layers, evenly spaced, first and last included.
    student, _ = init_student(StudentInit(), real_teacher_dir)
    assert student.config.num_hidden_layers == 10
    assert sum(p.numel() for p in student.parameters()) < 0.55 * sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# The LM head policy: what extraction, evaluation and training do after the head


@pytest.mark.parametrize("model_type, setting", [
    ("gemma2", {"final_logit_softcapping": 2.0}),  # tanh(z / cap) * cap
    ("granite", {"logits_scaling": 4.0}),  # z / scaling
    ("cohere", {"logit_scale": 0.5}),  # z * scale
    ("llama", {}),  # nothing
])
def test_head_transform_reproduces_the_models_own_logits(model_type, setting):
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_pipeline.core.models.head import decoder_and_head, head_transform

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, **setting)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    ids = torch.randint(0, 64, (1, 7))
    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0]
        got = head_transform(model).apply_(head(decoder(input_ids=ids).last_hidden_state[0]))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert head_transform(model).settings == setting


def _edited_tokenizer(tmp_path, name: str, edit) -> "object":
    """The tiny tokenizer with its tokenizer.json edited by `edit(data)`, saved and loaded."""
    import shutil

    folder = tmp_path / name
    shutil.copytree(TINY_TOKENIZER_DIR, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    if name == "rename":  # the config names that token as a special token too
        config = folder / "tokenizer_config.json"
        config.write_text(config.read_text(encoding="utf-8").replace("<|endoftext|>", "<|endoftext_|>"),
                          encoding="utf-8")
    return load_tokenizer(folder)


def test_tokenizer_hash_covers_the_whole_token_to_id_map(tmp_path):
    """Equal-size tokenizers that differ in one token, or in which of two tokens has which id,
    are told apart; so is a renamed added (special) token."""
    original = load_tokenizer(TINY_TOKENIZER_DIR)
    vocab = original.get_vocab()
    plain = sorted(token for token, index in vocab.items() if index >= 300)[:2]

    def swap_ids(data):
        model_vocab = data["model"]["vocab"]
        model_vocab[plain[0]], model_vocab[plain[1]] = model_vocab[plain[1]], model_vocab[plain[0]]

    def rename_added(data):  # the same id, another text (tokenizer_config.json follows, see below)
        entry = next(token for token in data["added_tokens"] if token["content"] == "<|endoftext|>")
        entry["content"] = "<|endoftext_|>"
        data["model"]["vocab"]["<|endoftext_|>"] = data["model"]["vocab"].pop("<|endoftext|>")

    hashes = {"original": tokenizer_hash(original)}
    for name, edit in (("swap", swap_ids), ("rename", rename_added)):
        edited = _edited_tokenizer(tmp_path, name, edit)
        assert len(edited) == len(original), name
        hashes[name] = tokenizer_hash(edited)
    assert _edited_tokenizer(tmp_path, "same", lambda data: None).get_vocab() == vocab
    assert tokenizer_hash(_edited_tokenizer(tmp_path, "same2", lambda data: None)) == hashes["original"]
    assert len(set(hashes.values())) == 3, hashes
