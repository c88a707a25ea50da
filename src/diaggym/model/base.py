"""A local base model of the same class as Qwen2.5-7B-Instruct, built from nothing.

No weights can be downloaded, so the local pipeline trains its own tokenizer
and initialises a small ``Qwen2ForCausalLM`` at random.  Everything
downstream (training, engines, serving) then loads it with
``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained(path)`` exactly as it
would load the real base model from a path.

The tokenizer is byte-level BPE trained on the training split's serialized
text.  Numbers are split into single digits before BPE, as Qwen2's own
pre-tokenizer does: numbers are most of what the model writes, and per-digit
tokens let it learn magnitudes instead of memorising number strings.
``<SEP>`` is an ordinary added token (``tokenizer.add_tokens``), as in the
reference fine-tune, and ``<|endoftext|>`` is EOS and padding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from diaggym.cases import SEP, Case
from diaggym.errors import InputError
from diaggym.serialization import shuffled_order, training_text

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    """Shape of a local base model (Qwen2 architecture)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 8192


PRESETS: dict[str, Preset] = {
    # ~1.6 M parameters: tests and the few-minute CPU demo.
    "tiny": Preset(4096, 128, 4, 4, 2, 512),
    # ~4.2 M parameters: the CPU demo (configs/train/local.json); 4 layers of width 256, head_dim 64.
    "local": Preset(4096, 256, 4, 4, 2, 768),
    # ~28 M parameters: longer local runs; 8 layers of width 512.
    "small": Preset(8192, 512, 8, 8, 4, 1408),
    # 0.5B-shaped (Qwen2.5-0.5B dimensions) for GPU throughput benchmarks; never trained on CPU.
    "qwen2.5-0.5b-shape": Preset(151_936, 896, 24, 14, 2, 4864, 32768),
    # 7B-shaped (Qwen2.5-7B dimensions) for GPU engine benchmarks.
    "qwen2.5-7b-shape": Preset(152_064, 3584, 28, 28, 4, 18944, 32768),
}


def case_texts(cases: Iterable[Case], seed: int = 0) -> Iterable[str]:
    """Serialized training text of each case (what the tokenizer should be good at)."""
    rng = random.Random(seed)
    for c in cases:
        context, target = training_text(c, EOS, shuffled_order(c, rng))
        yield context + target


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with single-digit numbers, ``<|endoftext|>`` special, ``<SEP>`` added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # <SEP> must not be learned as pieces of BPE merges: strip it from the training text.
    tok.train_from_iterator((t.replace(SEP, "\n").replace(EOS, "") for t in texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )
    fast.add_tokens([SEP])
    return fast


def build_model(preset: Preset, vocab_size: int, eos_id: int, seed: int):
    """A randomly initialised ``Qwen2ForCausalLM`` of the preset's shape (deterministic in ``seed``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def init_base(cases: list[Case], out: str | Path, preset: str = "tiny", seed: int = 0) -> dict:
    """Train the tokenizer on ``cases`` (the training split) and write a random Qwen2 base to ``out``."""
    from diaggym.atomic import atomic_dir

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if not cases:
        raise InputError("no training cases to build the tokenizer from (is the train split empty?)")
    p = PRESETS[preset]
    tokenizer = train_tokenizer(case_texts(cases, seed), p.vocab_size)
    # Shape presets keep their real vocabulary size (so parameter counts and FLOPs match the real model);
    # embedding rows beyond the local tokenizer are simply never used.
    model = build_model(p, max(len(tokenizer), p.vocab_size), tokenizer.eos_token_id, seed)
    n_params = sum(x.numel() for x in model.parameters())
    info = {
        "preset": preset,
        "shape": asdict(p),
        "seed": seed,
        "vocab": len(tokenizer),
        "parameters": n_params,
        "trained_on_cases": len(cases),
    }
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        (tmp / "diaggym_base.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
