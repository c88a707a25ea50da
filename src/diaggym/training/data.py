"""Cases → token sequences for causal-LM training (contract 2).

Each case becomes ``context + events + EOS``.  The loss covers everything
after the context (exam names, results, ``<SEP>``, EOS): the model must learn
to write results given the patient, not to write patients.  Sequences longer
than ``max_length`` keep their **last** tokens, so the most recent exams (and
the end-of-case EOS) are never cut.  Exams that happened at the same time may
be reordered; the order is re-drawn each epoch from ``(seed, epoch, case)``,
so runs are reproducible and resumable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from diaggym.cases import Case
from diaggym.serialization import case_events, render_context, render_event, shuffled_order

IGNORE = -100


def encode_case(case: Case, tokenizer, max_length: int, order: list[int] | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one case; labels are ``IGNORE`` on the context."""
    context = render_context(case.profile, case.final_diagnosis)
    body = "".join(render_event(n, r) for n, r in case_events(case, order)) + tokenizer.eos_token
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    ids = ctx_ids + body_ids
    labels = [IGNORE] * len(ctx_ids) + body_ids
    if len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return {"input_ids": ids, "labels": labels}


class CaseDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded cases; call :meth:`set_epoch` to redraw within-group orders."""

    def __init__(self, cases: list[Case], tokenizer, max_length: int, seed: int = 0, shuffle_groups: bool = True):
        self.cases = cases
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.seed = seed
        self.shuffle_groups = shuffle_groups
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        case = self.cases[i]
        order = None
        if self.shuffle_groups:
            order = shuffled_order(case, random.Random(f"{self.seed}:{self.epoch}:{case.case_id}"))
        return encode_case(case, self.tokenizer, self.max_length, order)

    def n_tokens(self) -> int:
        return sum(len(self[i]["input_ids"]) for i in range(len(self)))


@dataclass
class Collator:
    """Right-pads a batch; padding is masked out of attention and loss."""

    pad_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
