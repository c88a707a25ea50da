"""Cases → token sequences for causal-LM training (docs/architecture.md, contract 2).

Each case becomes the two strings of :func:`~diaggym.serialization.training_text`
(the one place that builds the text), ``context`` and ``target`` = events + the
end token (:func:`~diaggym.serialization.end_of_text`: ``<|endoftext|>`` as in the
reference, whatever the tokenizer's EOS).  The loss covers everything
after the context (exam names, results, ``<SEP>``, end token): the model must learn
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
from diaggym.serialization import END_OF_TEXT, end_of_text, shuffled_order, training_text

IGNORE = -100


def encode_case(case: Case, tokenizer, max_length: int, order: list[int] | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one case; labels are ``IGNORE`` on the context.

    Context and target are tokenized apart so the loss boundary is exact; for our tokenizers the ids
    equal those of tokenizing ``context + target`` in one go (tested), since no token spans the
    context's final newline and the first ``Exam name:``.
    """
    end = end_of_text(tokenizer)
    if end is None:
        raise ValueError(f"the tokenizer has neither {END_OF_TEXT} nor an eos_token to end a training text")
    context, target = training_text(case, end, order)
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
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
