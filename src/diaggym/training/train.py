"""Fine-tune a causal LM on serialized cases with the HF Trainer (optionally DeepSpeed).

The same function runs everywhere: on one CPU with the tiny local base, and on
an 8-GPU node with Qwen2.5-7B-Instruct and ZeRO-2 (launched through
``torchrun``/``deepspeed``, see ``local_train.sh``).  What differs is the
:class:`TrainConfig` (presets in ``configs/train/``).

Checkpoints are written every ``save_steps`` optimizer steps; ``resume=True``
continues from the newest one in ``out`` (optimizer, scheduler, RNG and data
position restored by the Trainer), so a killed run loses at most the steps
since its last checkpoint.  The final model lands in ``out/final`` and, with
MLflow on, in the run's artifacts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from diaggym.cases import SEP, load_cases
from diaggym.errors import InputError
from diaggym.resources import load_config
from diaggym.serialization import render_context


@dataclass
class TrainConfig:
    """Everything a training run depends on (logged to MLflow as params)."""

    cases: str = ""  # preprocess output folder (cases.jsonl + card.json) or a cases file
    base: str = ""  # base model folder (save_pretrained layout)
    out: str = ""  # run folder: checkpoints, final/
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: float = 0.03  # ratio of total steps when < 1, else a step count
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    max_length: int = 2048
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # path to a DeepSpeed JSON config
    optim: str = "adamw_torch"
    seed: int = 0
    save_steps: int = 20
    save_total_limit: int = 2
    logging_steps: int = 1
    eval: bool = True  # held-out loss on the val split before and after training
    resume: bool = False
    mlflow: bool = True
    experiment: str = "diaggym-world-model"
    run_name: str | None = None
    use_cpu: bool | None = None  # None: CPU when no GPU is visible
    shuffle_groups: bool = True
    extra: dict = field(default_factory=dict)  # free-form tags (e.g. preset name)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        p, data = load_config("train", path, "training config")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"description"}
        if unknown:
            raise InputError(f"unknown training option(s) {', '.join(sorted(unknown))}", p)
        data.pop("description", None)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def _check_base(base: Path) -> None:
    if not base.is_dir():
        raise InputError("base model folder does not exist", base)
    names = {p.name for p in base.iterdir()}
    if "config.json" not in names:
        raise InputError("not a model folder: no config.json (expected save_pretrained layout)", base)
    if not any(
        n.endswith(".safetensors") or n.endswith(".bin") or n.endswith(".safetensors.index.json") for n in names
    ):
        raise InputError("model folder has no weights (*.safetensors or *.bin)", base)
    if not ({"tokenizer.json", "tokenizer_config.json"} & names):
        raise InputError("model folder has no tokenizer (tokenizer.json / tokenizer_config.json)", base)


def load_base(base: str | Path):
    """Tokenizer and model from a folder; ``<SEP>`` added (and embeddings resized) when missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    _check_base(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"cannot load model/tokenizer ({err})", base) from None
    if tokenizer.eos_token is None:
        raise InputError("tokenizer has no EOS token", base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if SEP not in tokenizer.get_vocab():
        tokenizer.add_tokens([SEP])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer, model


def _cases_and_card(path: str | Path) -> tuple[list, list, dict | None]:
    p = Path(path)
    train = load_cases(p, split="train")
    val = load_cases(p, split="val")
    card = None
    card_path = (p if p.is_dir() else p.parent) / "card.json"
    if card_path.is_file():
        card = json.loads(card_path.read_text())
    return train, val, card


def train(config: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with held-out losses and the final model path."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from diaggym.training.data import CaseDataset, Collator
    from diaggym.training.tracking import MlflowTracker

    out = Path(config.out)
    train_cases, val_cases, card = _cases_and_card(config.cases)
    if not train_cases:
        raise InputError("the train split is empty: nothing to train on", config.cases)
    tokenizer, model = load_base(config.base)
    contexts = [render_context(c.profile, c.final_diagnosis) for c in train_cases]
    longest = max(len(ids) for ids in tokenizer(contexts, add_special_tokens=False)["input_ids"])
    if config.max_length <= longest:
        raise InputError(
            f"max_length {config.max_length} is not longer than the longest case context ({longest} tokens): "
            "training would keep no exam of that case"
        )
    if config.deepspeed and not Path(config.deepspeed).is_file():
        raise InputError("DeepSpeed config not found", config.deepspeed)
    last_ckpt = _last_checkpoint(out)
    if out.exists() and any(out.glob("checkpoint-*")) and not config.resume:
        raise InputError("run folder already has checkpoints: pass --resume to continue, or choose a new --out", out)

    train_ds = CaseDataset(train_cases, tokenizer, config.max_length, config.seed, config.shuffle_groups)
    val_ds = CaseDataset(val_cases, tokenizer, config.max_length, config.seed, shuffle_groups=False)
    use_cpu = (not torch.cuda.is_available()) if config.use_cpu is None else config.use_cpu
    if config.gradient_checkpointing:
        model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type=config.schedule,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        deepspeed=config.deepspeed,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        eval_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        disable_tqdm=not os.isatty(2),
    )

    class EpochReshuffle(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            train_ds.set_epoch(math.floor(state.epoch or 0))

    tracker = MlflowTracker(config, card, out) if config.mlflow else None
    callbacks = [EpochReshuffle()] + ([tracker.callback()] if tracker else [])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds if len(val_ds) else None,
        data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    summary: dict = {"train_cases": len(train_ds), "val_cases": len(val_ds), "config": asdict(config)}
    if config.eval and len(val_ds) and last_ckpt is None and not config.deepspeed:
        # (DeepSpeed cannot evaluate before its engine exists unless the config is ZeRO-3: skipped there.)
        summary["val_loss_before"] = trainer.evaluate()["eval_loss"]
    result = trainer.train(resume_from_checkpoint=str(last_ckpt) if (config.resume and last_ckpt) else None)
    summary["train_loss"] = result.training_loss
    summary["train_runtime"] = result.metrics.get("train_runtime")
    summary["global_step"] = trainer.state.global_step
    if config.eval and len(val_ds):
        summary["val_loss_after"] = trainer.evaluate()["eval_loss"]
    final = out / "final"
    if trainer.is_world_process_zero():
        trainer.save_model(str(final))
        tokenizer.save_pretrained(final)
        (final / "diaggym_train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["final"] = str(final)
    if tracker is not None and trainer.is_world_process_zero():
        tracker.finish(summary, final)
    _finish_distributed()
    return summary


def _finish_distributed() -> None:
    """Let every rank wait for rank 0's saving, then tear the process group down.

    Without this, the other ranks exit while rank 0 still writes the final model, and their gloo/NCCL
    connections close under it: torch then aborts a process at exit (SIGABRT) now and then, failing a
    run whose work was done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _last_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(
        out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1
    )
    return ckpts[-1] if ckpts else None
