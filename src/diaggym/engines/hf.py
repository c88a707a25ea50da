"""In-process world-model engine over a local Hugging Face causal LM folder.

The simulator asks for one exam at a time and each step's prompt is the previous prompt plus one
event, so this engine does in-process what a serving stack with prefix caching does: it reuses the
keys/values of earlier token sequences (:class:`~diaggym.engines.prefix_cache.PrefixCache`), prefills
only the new suffixes (packed into one sequence), and decodes all prompts of a call together into
preallocated KV buffers, each row with its own :class:`SamplingParams` and its own seeded generator
(the same prompt and seed give the same text whatever else is in the batch).  The attention plumbing
tied to the transformers version lives in :mod:`diaggym.engines.hf_attention`.  The design and its
costs are written up in ``docs/transformers-engine.md``.

Stops: ``params.stop`` strings (looked for on the decoded tail after every token) and the
tokenizer's EOS; the text is cut and stripped with :func:`~diaggym.engines.base.cut_at_stop`.  A
prompt longer than ``max_position_embeddings - max_tokens`` is an :class:`EngineError`
(``reason="prompt_too_long"``), never silently truncated.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diaggym.engines.base import (
    Completion,
    Engine,
    EngineError,
    Feed,
    FeedItem,
    FinishReason,
    SamplingParams,
    cut_at_stop,
)
from diaggym.engines.hf_attention import (
    ATTENTION_PLAN,
    ATTN_IMPLEMENTATION,
    AttentionPlan,
    cache_layers,
    use_engine_attention,
)
from diaggym.engines.prefix_cache import KV, PrefixCache
from diaggym.errors import InputError
from diaggym.serialization import end_of_text

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")
# Compact the decode batch when at least this fraction of its rows has finished.
COMPACT_FRACTION = 0.25
# Admitting prompts into a running batch rebuilds its KV buffers (a copy of every live row), so a feed's
# prompts join when a quarter of the batch is waiting, else after this many steps (a nearly full batch would
# otherwise be rebuilt for every single arrival).
ADMIT_EVERY = 16

# --------------------------------------------------------------------------- per-request state
@dataclass
class _Row:
    index: int  # position in the caller's list
    ids: list[int]
    params: SamplingParams
    seed: int | None
    uniforms: Any = None  # [max_tokens] draws for sampling, from the row's own generator
    cached: int = 0
    gen: list[int] = field(default_factory=list)
    done: bool = False
    hit_eos: bool = False
    hit_stop: bool = False
    start: int = 0  # first column of this row in the decode buffer (left padding before it)
    deliver: Callable[[Completion | BaseException], None] | None = None  # a feed's caller, told when it finishes
    completion: Completion | None = None


@dataclass
class _Batch:
    """The rows being decoded: right-aligned in per-layer KV buffers that all end at one column."""

    rows: list[_Row]  # batch position -> row
    layers: list  # BufferLayer per model layer
    cache: Any  # a transformers Cache over ``layers``
    positions: Any  # [B] position of each row's next token
    mask: Any  # [B, capacity] 1 from each row's first column (the padded decode reads it)
    logits: Any  # [B, vocab] next-token logits

    def compact(self, live: list[int]) -> None:
        """Keep only the ``live`` batch positions and drop the leading columns none of them uses."""
        import torch

        keep = torch.tensor(live, dtype=torch.long, device=self.positions.device)
        first = min(self.rows[b].start for b in live)
        for layer in self.layers:
            layer.select(keep, first)
        self.mask = self.mask[:, first:].index_select(0, keep)
        self.positions = self.positions.index_select(0, keep)
        self.logits = self.logits.index_select(0, keep)
        self.rows = [self.rows[b] for b in live]
        for row in self.rows:
            row.start -= first


class TransformersEngine(Engine):
    """Batched, prefix-caching generation with a local HF causal LM (see the module docstring).

    ``stats`` counts prompt tokens, prompt tokens served from the prefix cache, completions and
    evictions (plus cache size), for the server's Prometheus metrics.
    """

    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path | None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 32,
        prefix_cache_tokens: int = 2_000_000,
        eos_token: str | None = None,
        prefill_chunk: int = 4096,
        ragged_decode: bool = False,
        *,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """Load ``model_dir`` (tokenizer + causal LM) onto ``device`` in ``dtype``.

        ``model``/``tokenizer`` may be given instead of ``model_dir`` (already-built objects, e.g. a
        randomly initialised 7B-shaped model built straight on a GPU for benchmarks); the model is
        then used as it is (its device and dtype are not changed).  Either way the model's attention
        implementation is switched to :data:`ATTN_IMPLEMENTATION` (stock SDPA for every call the
        engine does not plan itself, so ``model.generate`` on the same model still works).
        ``ragged_decode``: per-row decode attention (exactly batch-invariant, one attention call per row)
        instead of one masked call over the padded batch (the default; see docs/transformers-engine.md).
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.model_dir = Path(model_dir) if model_dir is not None else None
        if model is not None and tokenizer is not None:
            self.tokenizer, self.model = tokenizer, model
            self.device = next(model.parameters()).device
        else:
            if self.model_dir is None or not (self.model_dir / "config.json").is_file():
                raise InputError(
                    "not a Hugging Face model folder (no config.json); give a local checkpoint", self.model_dir
                )
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=self.dtype, attn_implementation="sdpa"
            )
            self.model.to(self.device)
        self.model.eval()
        if self.model.config._attn_implementation not in ("sdpa", ATTN_IMPLEMENTATION):
            raise InputError(
                f"the engine needs SDPA attention; the model uses {self.model.config._attn_implementation!r}"
            )
        if set(getattr(self.model.config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            raise InputError("the engine supports full-attention models only (no sliding-window layers)")
        use_engine_attention(self.model)
        self.ragged_decode = bool(ragged_decode)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        # <|endoftext|> when the tokenizer has it (what training appends), not an Instruct tokenizer's <|im_end|>
        self.eos_token = eos_token if eos_token is not None else end_of_text(self.tokenizer)
        eos_id = self.tokenizer.convert_tokens_to_ids(self.eos_token) if self.eos_token else None
        unk = self.tokenizer.unk_token_id
        self.eos_id: int | None = eos_id if isinstance(eos_id, int) and (unk is None or eos_id != unk) else None
        self.cache = PrefixCache(prefix_cache_tokens)
        self._lock = threading.Lock()
        self._seeds = random.SystemRandom()
        self._buffer_layer, self._packed_layer = cache_layers()
        self._stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "completions": 0}
        self._stop_tokens: dict[frozenset[str], set[int]] = {}  # last characters of stops -> tokens holding one
        self._admit_at = max(1, int(COMPACT_FRACTION * max_batch_size))  # see run_feed

    # ------------------------------------------------------------------ public
    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: prompt_tokens, cached_prompt_tokens, completions, evictions, cache size."""
        return {
            **self._stats,
            "evictions": self.cache.evictions,
            "cache_nodes": len(self.cache),
            "cache_tokens": self.cache.tokens,
        }

    def close(self) -> None:
        with self._lock:
            self.cache.clear()
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
        import torch

        encoded = self.tokenizer(prompts)["input_ids"]
        for i, (ids, p) in enumerate(zip(encoded, params, strict=True)):
            self._check(f"prompt {i}", ids, p)
        out: list[Completion | None] = [None] * len(prompts)
        with self._lock, torch.inference_mode():
            for lo in range(0, len(prompts), self.max_batch_size):
                rows = [
                    _Row(index=i, ids=list(encoded[i]), params=params[i], seed=self._seed(params[i]))
                    for i in range(lo, min(lo + self.max_batch_size, len(prompts)))
                ]
                self._decode(rows)
                for row in rows:
                    out[row.index] = row.completion
        return out  # type: ignore[return-value]

    def run_feed(self, feed: Feed) -> None:
        """Serve ``feed`` until it closes, batching continuously (what the server runs on its engine thread).

        Prompts that arrive while a batch decodes join it at the next admission (when as many wait as a
        quarter of ``max_batch_size``, or :data:`ADMIT_EVERY` steps passed), as many as there are free rows; each
        prompt is delivered the moment it finishes: RL clients get their result and send their next
        request without waiting for the slowest row of a batch.  A prompt that cannot run (empty, too
        long) fails alone; an engine failure fails the prompts in flight with it, and the next ones run.
        """
        import torch

        while True:
            items = feed.take(self.max_batch_size, block=True)
            if not items:
                return
            rows = self._rows(items)
            admitted = list(rows)
            if not rows:
                continue
            with self._lock, torch.inference_mode():
                try:
                    self._decode(rows, feed, admitted)
                except Exception as err:  # noqa: BLE001 - delivered to the callers in flight
                    log.exception("engine batch failed")
                    failure = EngineError(f"engine failed: {type(err).__name__}: {err}", reason="engine_crash")
                    for row in admitted:
                        if row.completion is None and row.deliver is not None:
                            row.deliver(failure)

    def _rows(self, items: list[FeedItem]) -> list[_Row]:
        """Rows for the feed's items that still want an answer; an item that cannot run gets its error now."""
        items = [it for it in items if not it.cancelled()]
        if not items:
            return []
        encoded = self.tokenizer([it.prompt for it in items])["input_ids"]
        rows = []
        for i, (it, ids) in enumerate(zip(items, encoded, strict=True)):
            try:
                self._check("the prompt", ids, it.params)
            except EngineError as err:
                it.deliver(err)
                continue
            rows.append(_Row(index=i, ids=list(ids), params=it.params, seed=self._seed(it.params), deliver=it.deliver))
        return rows

    def _check(self, what: str, ids: list[int], p: SamplingParams) -> None:
        if not ids:
            raise EngineError(f"{what} is empty after tokenization", reason="bad_request")
        if self.max_positions is not None and len(ids) > self.max_positions - p.max_tokens:
            raise EngineError(
                f"{what} has {len(ids)} tokens; with max_tokens={p.max_tokens} the model's "
                f"max_position_embeddings={self.max_positions} allows at most "
                f"{self.max_positions - p.max_tokens} prompt tokens",
                reason="prompt_too_long",
            )

    def _seed(self, p: SamplingParams) -> int | None:
        if p.temperature == 0:
            return None
        return p.seed if p.seed is not None else self._seeds.randrange(2**63)

    def _kv_shape(self) -> tuple[int, int, int, Any]:
        """(layers, kv heads, head dim, dtype) of the model's KV cache (Qwen2/Llama-style attention)."""
        cfg = self.model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        dtype = next(self.model.parameters()).dtype
        return cfg.num_hidden_layers, kv_heads, head_dim, dtype

    def _decode(self, rows: list[_Row], feed: Feed | None = None, admitted: list[_Row] | None = None) -> None:
        """Generate for ``rows`` (each gets ``completion``); with a ``feed``, admit its prompts on the way.

        ``admitted`` is kept as the rows in flight (the ones an engine failure must be reported to).
        """
        import torch

        batch = self._place(None, [], rows)
        since = 0  # decode steps since the batch was last rebuilt
        while True:
            since += 1
            if feed is not None and admitted is not None:
                live = [b for b, row in enumerate(batch.rows) if not row.done]
                free = self.max_batch_size - len(live)
                waiting = feed.waiting()
                if free > 0 and waiting and (waiting >= self._admit_at or since >= ADMIT_EVERY or not live):
                    new = self._rows(feed.take(free, block=False))
                    if new:
                        admitted[:] = [r for r in admitted if r.completion is None] + new  # the ones in flight
                        batch = self._place(batch, live, new)
                        since = 0
            # sample, check stops; a finished row is cached and delivered at once
            tokens = self._sample(batch.logits, batch.rows)
            for bpos, row in enumerate(batch.rows):
                if row.done:
                    continue
                row.gen.append(tokens[bpos])
                if self._finished(row):
                    row.done = True
                    self._keep(row, batch.layers, bpos)
                    row.completion = self._completion(row)
                    if row.deliver is not None:
                        row.deliver(row.completion)
            live = [bpos for bpos, row in enumerate(batch.rows) if not row.done]
            if not live:
                if feed is not None and admitted is not None and feed.waiting():
                    new = self._rows(feed.take(self.max_batch_size, block=False))
                    if new:
                        admitted[:] = new
                        batch = self._place(None, [], new)
                        continue
                return
            if len(batch.rows) - len(live) >= max(1, COMPACT_FRACTION * len(batch.rows)):
                batch.compact(live)
                since = 0
                tokens = [tokens[bpos] for bpos in live]
            # forward the live batch one token
            length = batch.layers[0].length
            # a lone row reads only its own columns either way: one attention call, no mask
            ragged = self.ragged_decode or len(batch.rows) == 1
            plan = AttentionPlan("ragged", starts=[row.start for row in batch.rows]) if ragged else None
            token = ATTENTION_PLAN.set(plan)
            try:
                out = self.model(
                    input_ids=torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None],
                    attention_mask=None if plan is not None else batch.mask[:, : length + 1],
                    position_ids=batch.positions[:, None],
                    past_key_values=batch.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            finally:
                ATTENTION_PLAN.reset(token)
            batch.logits = out.logits[:, -1, :]
            batch.positions = batch.positions + 1

    def _place(self, old: _Batch | None, live: list[int], new: list[_Row]) -> _Batch:
        """A decode batch of ``old``'s ``live`` rows plus the ``new`` rows, prefilled.

        One right-aligned KV buffer per layer, preallocated for the longest row and the most tokens any
        row may still add; the live rows' columns are copied over (shifted right when a new prompt is
        longer), the new rows get their cached prefix and their prefilled suffix.
        """
        import torch
        from transformers.cache_utils import Cache

        dev = self.device
        n_layers, kv_heads, head_dim, dtype = self._kv_shape()
        keep = [old.rows[b] for b in live] if old is not None else []
        first = min((row.start for row in keep), default=0)
        used = old.layers[0].length - first if old is not None else 0
        width = max([used] + [len(row.ids) for row in new])
        rows = keep + new
        cap = width + max(row.params.max_tokens - len(row.gen) for row in rows) + 1
        bufs = [
            (
                torch.zeros((len(rows), kv_heads, cap, head_dim), dtype=dtype, device=dev),
                torch.zeros((len(rows), kv_heads, cap, head_dim), dtype=dtype, device=dev),
            )
            for _ in range(n_layers)
        ]
        logits = []
        if keep:
            assert old is not None
            idx = torch.tensor(live, dtype=torch.long, device=dev)
            for (k, v), layer in zip(bufs, old.layers, strict=True):
                k[: len(keep), :, width - used : width] = layer.buf_k[:, :, first : first + used].index_select(0, idx)
                v[: len(keep), :, width - used : width] = layer.buf_v[:, :, first : first + used].index_select(0, idx)
            for row in keep:
                row.start += width - used - first
            logits.append(old.logits.index_select(0, idx))
        for row in new:
            row.start = width - len(row.ids)
        logits.append(torch.stack(self._prefill_rows(new, bufs, len(keep))))
        mask = torch.zeros((len(rows), cap), dtype=torch.long, device=dev)
        for b, row in enumerate(rows):
            mask[b, row.start :] = 1
        layers = [self._buffer_layer(k, v, width) for k, v in bufs]
        return _Batch(
            rows=rows,
            layers=layers,
            cache=Cache(layers=layers),
            positions=torch.tensor([len(r.ids) + len(r.gen) for r in rows], dtype=torch.long, device=dev),
            mask=mask,
            logits=torch.cat(logits),
        )

    def _prefill_rows(self, rows: list[_Row], bufs: list, offset: int) -> list[Any]:
        """Copy each row's cached prefix into its buffer row (``offset`` + its index), prefill the rest;
        the logits after each row's last prompt token.  A row whose prompt repeats an earlier row's
        waits for that row's prefill and copies it."""
        import torch

        row_views: list[KV] = []
        first_of: dict[tuple[int, ...], int] = {}
        copies: list[tuple[int, int]] = []
        for j, row in enumerate(rows):
            r = offset + j
            row_views.append([(k[r : r + 1, :, row.start :], v[r : r + 1, :, row.start :]) for k, v in bufs])
            key = tuple(row.ids)
            if self.cache.enabled and key in first_of:
                copies.append((j, first_of[key]))
                row.cached = len(row.ids) - 1  # nothing is computed for it; the last token counts as new
                continue
            first_of[key] = j
            ids = np.asarray(row.ids, dtype=np.int64)
            path = self.cache.lookup(ids)
            # at least one token must run through the model to give the next-token logits
            row.cached = min(sum(n for _, n in path), len(ids) - 1)
            if row.cached > 0:
                self.cache.copy_into(path, row.cached, row_views[j])
        copied = dict(copies)
        todo = [j for j in range(len(rows)) if j not in copied]
        last_logits = self._prefill_packed(rows, todo, row_views)
        for j, src in copies:
            for (k, v), (sk, sv) in zip(row_views[j], row_views[src], strict=True):
                k[:, :, : len(rows[j].ids)] = sk[:, :, : len(rows[src].ids)]
                v[:, :, : len(rows[j].ids)] = sv[:, :, : len(rows[src].ids)]
            last_logits[j] = last_logits[src]
        for j in todo:
            n = len(rows[j].ids)
            self.cache.insert(
                np.asarray(rows[j].ids, dtype=np.int64), [(k[:, :, :n], v[:, :, :n]) for k, v in row_views[j]]
            )
        for row in rows:
            if row.seed is not None:
                g = torch.Generator(device=self.device).manual_seed(row.seed)
                row.uniforms = torch.rand(row.params.max_tokens, generator=g, device=self.device, dtype=torch.float32)
        return [last_logits[j] for j in range(len(rows))]

    def _prefill_packed(self, rows: list[_Row], todo: list[int], row_views: list[KV]) -> dict[int, Any]:
        """Run the uncached suffix of every row in ``todo``; {row: logits after its last prompt token}.

        Suffixes are concatenated into one sequence per forward (at most ``prefill_chunk`` tokens; a
        longer suffix is split across forwards), with true position ids; :class:`AttentionPlan` tells the
        attention which row each segment belongs to.  Linear layers thus run once on all new tokens
        instead of once per row.
        """
        import torch
        from transformers.cache_utils import Cache

        dev = self.device
        pieces: list[tuple[int, int, int]] = []  # (row, lo, hi) token ranges of the rows' prompts
        for r in todo:
            lo, n = rows[r].cached, len(rows[r].ids)
            pieces.extend((r, a, min(a + self.prefill_chunk, n)) for a in range(lo, n, self.prefill_chunk))
        groups: list[list[tuple[int, int, int]]] = [[]]
        size = 0
        for piece in pieces:
            if groups[-1] and size + piece[2] - piece[1] > self.prefill_chunk:
                groups.append([])
                size = 0
            groups[-1].append(piece)
            size += piece[2] - piece[1]
        logits: dict[int, Any] = {}
        n_layers = len(row_views[0]) if row_views else 0
        for group in groups:
            if not group:
                continue
            plan = AttentionPlan("packed", views=[[] for _ in range(n_layers)])
            ids: list[int] = []
            positions: list[int] = []
            last: list[tuple[int, int]] = []  # (row, index in the packed input) where a row's prompt ends
            groups_per_head = None
            for r, lo, hi in group:
                off = len(ids)
                ids.extend(rows[r].ids[lo:hi])
                positions.extend(range(lo, hi))
                plan.segments.append((off, hi - lo, hi))
                for li in range(n_layers):
                    plan.views[li].append(row_views[r][li])
                if lo == 0:
                    plan.masks.append(None)
                else:
                    if groups_per_head is None:
                        cfg = self.model.config.get_text_config(decoder=True)
                        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
                        groups_per_head = cfg.num_attention_heads // kv
                    q_pos = torch.arange(lo, hi, device=dev)
                    allowed = torch.arange(hi, device=dev)[None, :] <= q_pos[:, None]  # causal, bottom-right
                    plan.masks.append(allowed.repeat(groups_per_head, 1))
                if hi == len(rows[r].ids):
                    last.append((r, len(ids) - 1))
            cache = Cache(layers=[self._packed_layer(plan, li) for li in range(n_layers)])
            placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=dev)  # 4-D: mask building is skipped
            token = ATTENTION_PLAN.set(plan)
            try:
                out = self.model(
                    input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
                    attention_mask=placeholder,
                    position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=torch.tensor([i for _, i in last], dtype=torch.long, device=dev),
                )
            finally:
                ATTENTION_PLAN.reset(token)
            for j, (r, _) in enumerate(last):
                logits[r] = out.logits[0, j, :]
        return logits

    def _sample(self, logits: Any, rows: list[_Row]) -> list[int]:
        """One token per row: argmax for greedy rows, seeded inverse-CDF sampling for the others.

        Each sampled row draws one uniform ``u`` from its own generator and takes the first token whose
        cumulative probability exceeds ``u``.  Rows with ``top_p < 1`` accumulate over the tokens sorted
        by probability and keep the smallest top set reaching ``top_p``; rows without a nucleus accumulate
        in vocabulary order (the same distribution; the sort over the whole vocabulary per row and token
        cost more than the model's forward at batch 32 on CPU).
        """
        import torch

        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        live = [i for i, row in enumerate(rows) if row.seed is not None and not row.done]
        nucleus = [i for i in live if (rows[i].params.top_p or 1.0) < 1.0]
        whole = [i for i in live if (rows[i].params.top_p or 1.0) >= 1.0]
        for pick, sort in ((nucleus, True), (whole, False)):
            if not pick:
                continue
            idx = torch.tensor(pick, dtype=torch.long, device=logits.device)
            temps = torch.tensor([rows[i].params.temperature for i in pick], device=logits.device)
            u = torch.stack([rows[i].uniforms[len(rows[i].gen)] for i in pick])
            scaled = logits.index_select(0, idx) / temps[:, None]
            if sort:
                top_p = torch.tensor([rows[i].params.top_p for i in pick], device=logits.device)
                scaled, order = scaled.sort(dim=-1, descending=True)
                probs = scaled.softmax(dim=-1)
                cum = probs.cumsum(dim=-1)
                probs = probs.masked_fill(cum - probs >= top_p[:, None], 0.0)  # nucleus: the top mass >= top_p
            else:
                probs = scaled.softmax(dim=-1)
            cum = probs.cumsum(dim=-1)
            choice = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)
            choice = choice.clamp(max=cum.shape[-1] - 1)
            tokens[idx] = (order.gather(1, choice) if sort else choice)[:, 0]
        return tokens.tolist()

    def _finished(self, row: _Row) -> bool:
        tok = row.gen[-1]
        if self.eos_id is not None and tok == self.eos_id:
            row.hit_eos = True
            return True
        stops = row.params.stop
        if stops and self._may_complete_stop(tok, stops):
            window = 4 * max(len(s) for s in stops) + 2
            tail = self.tokenizer.decode(row.gen[-window:], skip_special_tokens=False)
            if any(s in tail for s in stops):
                row.hit_stop = True
                return True
        return len(row.gen) >= row.params.max_tokens

    def _may_complete_stop(self, token: int, stops: tuple[str, ...] | list[str]) -> bool:
        """Whether ``token`` can complete one of ``stops``: its text holds some stop's last character.

        A stop found after this token ends inside it, so that character is in the token.  Only ASCII last
        characters are filtered this way (a multi-byte character may be split across tokens); the table is
        built once per set of last characters, and spares a tail decode per row and token.
        """
        if not all(stops):
            return True
        last = frozenset(s[-1] for s in stops)
        if any(ord(c) > 127 for c in last):
            return True
        table = self._stop_tokens.get(last)
        if table is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=False)
            table = self._stop_tokens[last] = {i for i, t in enumerate(texts) if any(c in t for c in last)}
        return token in table

    def _keep(self, row: _Row, layers: list, bpos: int) -> None:
        """Put prompt + generated tokens of a finished row in the prefix cache (only its new tokens are copied).

        The last token is left out: it was sampled but never run, so it has no KV.
        """
        if not self.cache.enabled:
            return
        n = len(row.ids) + len(row.gen) - 1
        ids = np.asarray(row.ids + row.gen[:-1], dtype=np.int64)
        sl = slice(row.start, row.start + n)
        self.cache.insert(
            ids, [(layer.buf_k[bpos : bpos + 1, :, sl], layer.buf_v[bpos : bpos + 1, :, sl]) for layer in layers]
        )

    def _completion(self, row: _Row) -> Completion:
        gen = row.gen[:-1] if row.hit_eos else row.gen
        raw = self.tokenizer.decode(gen, skip_special_tokens=True)
        text, found = cut_at_stop(raw, row.params.stop, self.eos_token)
        finish: FinishReason = "stop" if (row.hit_eos or row.hit_stop or found) else "length"
        self._stats["prompt_tokens"] += len(row.ids)
        self._stats["cached_prompt_tokens"] += row.cached
        self._stats["completions"] += 1
        meta = {"seed": row.seed} if row.seed is not None else {}
        return Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(row.ids),
            completion_tokens=len(row.gen),
            cached_prompt_tokens=row.cached,
            meta=meta,
        )


__all__ = ["TransformersEngine"]
