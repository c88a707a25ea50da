"""Training tokens: built from the one serializer, masked on the context, cut on the left, padded right.

Two tokenizers built here from a few cases (nothing downloaded): the local tiny one (``<|endoftext|>`` is
its EOS) and a Qwen2.5-Instruct-like one (Qwen's pre-tokenizer pattern, ``eos_token`` ``<|im_end|>``,
``<|endoftext|>`` also in the vocabulary), so the end token is checked where the two differ.
"""

from __future__ import annotations

import random

import pytest

from diaggym.cases import SEP, Case, Exam, LabItem, Profile
from diaggym.model.base import case_texts, train_tokenizer
from diaggym.serialization import END_OF_TEXT, end_of_text, shuffled_order, training_text
from diaggym.training.data import IGNORE, CaseDataset, Collator, encode_case

# Qwen2's pre-tokenizer pattern (from its tokenizer.json): a BPE on it splits text the way Qwen2.5 does.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _case(i: int) -> Case:
    items = [
        LabItem(name="Sodium", value=str(130 + i), valuenum=130.0 + i, unit="mEq/L", ref_low=133.0, ref_high=145.0),
        LabItem(name="Potassium", value="4.1", valuenum=4.1, unit="mEq/L", ref_low=3.3, ref_high=5.1),
        LabItem(name="Troponin T", value="<0.01", valuenum=0.00001, unit="ng/mL", ref_high=0.01),
    ]
    return Case(
        case_id=f"t:{i}",
        source="test",
        subject_key=f"p{i}",
        profile=Profile(sex="F" if i % 2 else "M", age=40 + i, chief_complaint="chest pain and dyspnea"),
        final_diagnosis="Community-acquired pneumonia",
        exams=[
            Exam(name="PE: General", kind="physical", group=0, result="Alert, oriented, no acute distress."),
            Exam(name="PE: Lungs", kind="physical", group=0, result="Crackles at the right base."),
            Exam(name="Basic Metabolic Panel (BMP)", kind="lab", group=1, items=items),
            Exam(name="CHEST (PA AND LAT)", kind="radiology", group=2, result="IMPRESSION: RLL pneumonia."),
        ],
    )


CASES = [_case(i) for i in range(6)]


@pytest.fixture(scope="module")
def tiny_tok():
    return train_tokenizer(case_texts(CASES, 0), 4096)


@pytest.fixture(scope="module")
def instruct_tok():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t.replace(SEP, "\n").replace(END_OF_TEXT, "") for t in case_texts(CASES, 0)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token=END_OF_TEXT)
    fast.add_tokens([SEP])
    return fast


@pytest.fixture(params=["tiny", "instruct"])
def tok(request, tiny_tok, instruct_tok):
    return {"tiny": tiny_tok, "instruct": instruct_tok}[request.param]


# ------------------------------------------------------------------ end token
def test_end_token_is_endoftext_whatever_the_tokenizers_eos(tiny_tok, instruct_tok):
    assert instruct_tok.eos_token == "<|im_end|>"  # precondition: the trap the rule is for
    assert end_of_text(instruct_tok) == END_OF_TEXT
    assert end_of_text(tiny_tok) == tiny_tok.eos_token == END_OF_TEXT  # the local tokenizer keeps its own
    ids = encode_case(CASES[0], instruct_tok, 4096)["input_ids"]
    assert ids[-1] == instruct_tok.convert_tokens_to_ids(END_OF_TEXT)
    assert instruct_tok.convert_tokens_to_ids("<|im_end|>") not in ids


def test_a_tokenizer_without_endoftext_ends_with_its_own_eos():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "[UNK]": 1}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    assert end_of_text(tok) == "</s>"
    assert encode_case(CASES[0], tok, 4096)["input_ids"][-1] == 0
    no_eos = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert end_of_text(no_eos) is None
    with pytest.raises(ValueError, match="neither <\\|endoftext\\|> nor an eos_token"):
        encode_case(CASES[0], no_eos, 4096)


# ------------------------------------------------------------------ one serializer
def test_tokens_equal_tokenizing_the_training_text(tok):
    """encode_case is the serializer's text, tokenized: no second construction, no boundary artefact."""
    for case in CASES:
        order = shuffled_order(case, random.Random(case.case_id))
        context, target = training_text(case, END_OF_TEXT, order)
        enc = encode_case(case, tok, 100_000, order)
        assert enc["input_ids"] == tok(context + target, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        assert enc["labels"] == [IGNORE] * n_ctx + enc["input_ids"][n_ctx:]
        assert tok.decode(enc["input_ids"][n_ctx:]) == target


def test_labels_mask_the_context_and_train_results_separators_and_end(tiny_tok):
    case = CASES[1]
    enc = encode_case(case, tiny_tok, 100_000)
    ids, labels = enc["input_ids"], enc["labels"]
    context, _ = training_text(case, END_OF_TEXT)
    n_ctx = len(tiny_tok(context, add_special_tokens=False)["input_ids"])
    assert n_ctx > 10 and labels[:n_ctx] == [IGNORE] * n_ctx  # the patient is never a target
    trained = tiny_tok.decode([t for t in labels if t != IGNORE])
    assert "Crackles at the right base." in trained and "Numeric Value: 0.00001" in trained
    sep = tiny_tok.convert_tokens_to_ids(SEP)
    assert [t for t in labels if t == sep] == [sep] * len(case.exams)  # every separator is trained
    assert labels[-1] == ids[-1] == tiny_tok.convert_tokens_to_ids(END_OF_TEXT)


def test_left_truncation_keeps_the_end(tiny_tok):
    case = CASES[2]
    full = encode_case(case, tiny_tok, 100_000)
    n = len(full["input_ids"])
    cut = encode_case(case, tiny_tok, n - 25)
    assert cut["input_ids"] == full["input_ids"][25:] and cut["labels"] == full["labels"][25:]
    assert cut["input_ids"][-1] == tiny_tok.convert_tokens_to_ids(END_OF_TEXT)
    assert encode_case(case, tiny_tok, n) == full  # exactly max_length: nothing cut


# ------------------------------------------------------------------ dataset and collator
def test_dataset_redraws_same_time_orders_per_epoch_reproducibly(tiny_tok):
    ds = CaseDataset(CASES, tiny_tok, 100_000, seed=3)
    first = [ds[i]["input_ids"] for i in range(len(ds))]
    assert [ds[i]["input_ids"] for i in range(len(ds))] == first
    orders = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        orders.add(tuple(ds[0]["input_ids"]))
    assert len(orders) == 2  # the two PE items (one time group) swap; the other groups never move
    fixed = CaseDataset(CASES, tiny_tok, 100_000, shuffle_groups=False)
    assert fixed[0] == encode_case(CASES[0], tiny_tok, 100_000)


def test_collator_pads_right_and_masks_padding():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = Collator(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------ generation stops at the end token
def test_engine_stops_at_endoftext_with_an_instruct_tokenizer(instruct_tok):
    """A model that writes <|endoftext|> at once stops there, though the tokenizer's EOS is <|im_end|>."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from diaggym.engines import SamplingParams
    from diaggym.engines.hf import TransformersEngine
    from diaggym.serialization import STOP_STRINGS

    config = Qwen2Config(
        vocab_size=len(instruct_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    head = torch.nn.Linear(32, len(instruct_tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[instruct_tok.convert_tokens_to_ids(END_OF_TEXT)] = 10.0
    model.lm_head = head
    engine = TransformersEngine(None, model=model, tokenizer=instruct_tok, prefix_cache_tokens=0)
    assert engine.eos_token == END_OF_TEXT and STOP_STRINGS == (SEP, END_OF_TEXT)
    prompt = "".join(training_text(CASES[0], END_OF_TEXT)).rsplit("Exam results:\n", 1)[0] + "Exam results:\n"
    (c,) = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0))
    assert c.finish_reason == "stop" and c.completion_tokens == 1 and c.text == ""
