"""The attention plumbing of :class:`~diaggym.engines.hf.TransformersEngine`: the part tied to transformers.

Everything here uses transformers internals that change between releases (``DynamicLayer``,
``AttentionInterface``, ``AttentionMaskInterface``, ``sdpa_attention_forward``,
``masking_utils.sdpa_mask``), so a transformers upgrade is checked against this module alone:

* :func:`cache_layers`: two cache layers over preallocated KV buffers written in place (the
  decode batch, and a packed prefill that scatters each segment's new KV into its own row);
* :func:`engine_attention`: an SDPA attention function that follows the engine's
  :class:`AttentionPlan` (set in :data:`ATTENTION_PLAN` around each forward): per-segment attention
  for a packed prefill, per-row attention for a ragged decode, and grouped-query attention without
  copying the KV heads (what transformers' SDPA does whenever a mask is given);
* :func:`use_engine_attention`: registers it and switches a model to it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AttentionPlan:
    """How the attention of the forward in flight is laid out (set by the engine around each forward).

    ``packed``: the prompt suffixes of several rows run as one sequence; ``segments`` are
    ``(offset in the packed input, tokens, row length after them)`` and ``views[layer][i]`` the
    buffer row of segment ``i`` (from the row's first column), so each segment attends to its own
    row's cached prefix and causally to itself.  ``ragged``: batched one-token decode where row
    ``b`` attends to columns ``starts[b]:`` of the buffer only (no padding read, no mask).
    """

    kind: str
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    views: list[list[tuple[Any, Any]]] = field(default_factory=list)
    masks: list[Any] = field(default_factory=list)  # per segment: [groups * n, end] bool, or None (no prefix)
    starts: list[int] = field(default_factory=list)


ATTENTION_PLAN: ContextVar[AttentionPlan | None] = ContextVar("diaggym_attention_plan", default=None)


def cache_layers():
    """Two cache layers over preallocated ``[B, kv_heads, capacity, head_dim]`` buffers, written in place."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """The decode batch: appends in place (no ``torch.cat`` of the whole cache every token)."""

        is_croppable = False

        def __init__(self, keys, values, length: int) -> None:
            super().__init__()
            self.buf_k, self.buf_v, self.length = keys, values, length
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys = self.buf_k[:, :, : self.length]
            self.values = self.buf_v[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[-2]
            if self.length + n > self.buf_k.shape[-2]:
                raise RuntimeError("decode buffer overflow (engine bug)")
            self.buf_k[:, :, self.length : self.length + n] = key_states
            self.buf_v[:, :, self.length : self.length + n] = value_states
            self.length += n
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def select(self, rows, first_col: int) -> None:
            """Keep only ``rows`` and the columns from ``first_col`` on (compaction)."""
            self.buf_k = self.buf_k[:, :, first_col:].index_select(0, rows)
            self.buf_v = self.buf_v[:, :, first_col:].index_select(0, rows)
            self.length -= first_col
            self._views()

    class PackedLayer(DynamicLayer):
        """A packed prefill: scatters each segment's new KV into its row of the buffer."""

        is_croppable = False

        def __init__(self, plan: AttentionPlan, layer: int) -> None:
            super().__init__()
            self.plan, self.layer = plan, layer
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            for (off, n, end), (k, v) in zip(self.plan.segments, self.plan.views[self.layer], strict=True):
                k[:, :, end - n : end] = key_states[:, :, off : off + n]
                v[:, :, end - n : end] = value_states[:, :, off : off + n]
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, 0

    return BufferLayer, PackedLayer


ATTN_IMPLEMENTATION = "diaggym_sdpa"


def sdpa_grouped(q, k, v, mask, scale):
    """Attention of ``q`` ``[1|B, heads, n, d]`` on ``k``/``v`` ``[.., kv_heads, L, d]`` with no KV-head copy.

    The query heads that share a KV head are folded into the query axis (``[B, kv_heads,
    groups * n, d]``), the same attention as repeating the KV heads, without the copy; ``mask``
    is ``None`` or bool ``[groups * n, L]`` (or broadcastable to the folded scores).
    """
    import torch

    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    folded = q.reshape(b, kv_heads, groups * n, d)
    out = torch.nn.functional.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, heads, n, d)


def engine_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA following the engine's :class:`AttentionPlan`; outside a plan, SDPA that keeps GQA grouped.

    transformers' SDPA path repeats the KV heads (``repeat_kv``: a full copy of the cache, per
    layer, per token) whenever a mask is given, which is every step of a left-padded batch.  Here
    the grouped heads are folded into the query axis instead.  Calls the engine did not plan
    (training, ``model.generate``) go to the stock implementation unless they are the masked
    one-token case.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = ATTENTION_PLAN.get()
    heads, kv_heads = query.shape[1], key.shape[1]
    if plan is not None and plan.kind == "packed":
        outs = []
        for (off, n, end), (k, v), mask in zip(plan.segments, plan.views[module.layer_idx], plan.masks, strict=True):
            q = query[:, :, off : off + n]
            if mask is None:  # no cached prefix: plain causal attention over the segment itself
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k[:, :, :end], v[:, :, :end], is_causal=True, scale=scaling, enable_gqa=heads != kv_heads
                )
            else:
                out = sdpa_grouped(q, k[:, :, :end], v[:, :, :end], mask, scaling)
            outs.append(out)
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None
    if plan is not None and plan.kind == "ragged" and query.shape[2] == 1:
        outs = [
            sdpa_grouped(query[i : i + 1], key[i : i + 1, :, s:], value[i : i + 1, :, s:], None, scaling)
            for i, s in enumerate(plan.starts)
        ]
        return torch.cat(outs, dim=0).transpose(1, 2).contiguous(), None
    if attention_mask is not None and query.shape[2] == 1 and heads != kv_heads and attention_mask.dim() == 4:
        return sdpa_grouped(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def use_engine_attention(model) -> None:
    """Register :func:`engine_attention` (with SDPA's mask builder) and switch ``model`` to it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, engine_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
