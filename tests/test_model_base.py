"""The local base model: tokenizer and random Qwen2, loaded as any HF model would be."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diaggym.errors import InputError
from diaggym.model.base import PRESETS, init_base

pytestmark = pytest.mark.integration


def _weights_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(demo_result, tmp_path_factory):
    train = [c for c in demo_result.cases][:60]
    out = tmp_path_factory.mktemp("base") / "tiny"
    info = init_base(train, out, "tiny", seed=3)
    return out, info, train


def test_tiny_preset_size_and_layout(base):
    out, info, _ = base
    assert 1_000_000 <= info["parameters"] <= 5_000_000
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "diaggym_base.json"):
        assert (out / name).is_file(), name


def test_loads_like_any_hf_model_and_tokenizes_as_specified(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = base
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    sep = tok.convert_tokens_to_ids("<SEP>")
    ids = tok("Value: 123.45<SEP>Exam name:\n", add_special_tokens=False)["input_ids"]
    assert sep in ids and ids.count(sep) == 1
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["1", "2", "3", "4", "5"]  # one digit per token
    text = "Hemoglobin: Value: 10.1; Numeric Value: 10.1; Units: g/dL<SEP>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)  # unused rows are fine, as in Qwen2.5


def test_deterministic_in_seed(base, tmp_path):
    out, _, train = base
    init_base(train, tmp_path / "again", "tiny", seed=3)
    init_base(train, tmp_path / "other", "tiny", seed=4)
    assert _weights_hash(tmp_path / "again") == _weights_hash(out)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert _weights_hash(tmp_path / "other") != _weights_hash(out)


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="unknown preset"):
        init_base([], tmp_path / "x", "huge")
    with pytest.raises(InputError, match="no training cases"):
        init_base([], tmp_path / "x", "tiny")
    assert "small" in PRESETS
