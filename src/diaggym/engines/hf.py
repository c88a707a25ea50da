"""In-process world-model engine over a local Hugging Face causal LM folder.

Why this exists: the simulator asks the world model for one exam at a time, and
each step's prompt is the previous step's prompt plus one event (diaggym-v1 is
append-only, see :mod:`diaggym.serialization`).  Plain ``model.generate`` per
prompt re-encodes the whole history every step, so a 30-exam case costs ~30
full-history prefills, and decodes at batch 1.  This engine does what a serving
stack (vLLM with prefix caching) does, in-process and with transformers only:

* **prefix-KV reuse** — after each request the keys/values of its tokens are kept
  in a :class:`PrefixCache` keyed by token ids (the prompt right after prefill,
  then prompt + generated tokens when it finishes).  A new prompt is matched on
  token ids against the cached sequences; the longest common prefix is reused
  (the cached tensors are sliced, never mutated) and only the new suffix runs
  through the model.  Matching on ids, not text, makes a tokenization that
  differs at the boundary (the generated text re-tokenized after ``strip()`` and
  ``<SEP>``) simply cost a few more tokens.  A sequence that extends a cached
  one replaces it (the old one is its prefix, so it can never match longer),
  which keeps memory at about one entry per live chain; beyond that entries are
  evicted least-recently-used against a budget of cached tokens.
* **batched decoding** — all prompts of a call decode together, one forward per
  token for the whole batch, each with its own :class:`SamplingParams`.

Design (and its cost): the prefill runs **per sequence** (batch 1, no padding,
true positions, optionally in chunks) on top of that sequence's cached prefix;
the resulting KV of every sequence is then copied, right-aligned (left-padded
with zeros), into one preallocated buffer per layer, and decoding runs on that
buffer with a 2-D attention mask that hides the padding and ``position_ids``
equal to each sequence's true position (Qwen2's rotary embeddings depend on
them).  Why per-sequence prefill: every sequence has a different cached prefix
length *and* a different suffix length, so a batched prefill would need padding
in the middle of each row and fully-masked query rows (NaN-prone in SDPA);
per-sequence prefill is exact and simple, and on CPU prefill is compute-bound so
batching it would gain little.  The costs: (1) on a GPU, short suffixes under-use
the device (B small forwards per step instead of one); (2) one copy of every
sequence's KV into the batch buffer per call (memory traffic ~ total context
size, small next to prefill); (3) decode attention also reads the padded columns
(wasted work proportional to the length spread in the batch) and, with a mask,
SDPA repeats the KV heads for GQA.  The buffer is preallocated for
``prompt + max_tokens`` columns so decoding writes in place instead of
``torch.cat``-ing the whole cache every token (what ``DynamicCache`` does).
When a quarter of the rows have finished, the buffer is compacted to the live
rows (and the all-padding leading columns are dropped).

Sampling is per row: greedy (``temperature == 0``) is ``argmax``; otherwise the
logits are divided by the temperature, nucleus-filtered (``top_p``, on the
sorted distribution) and sampled by inverse CDF with uniforms drawn up front
from the row's own ``torch.Generator`` seeded with ``params.seed`` (a random
seed when ``None``).  A row's draws therefore never depend on the other rows, so
the same prompt and seed give the same text whatever else is in the batch (up to
float noise of padded vs unpadded attention, ~1e-7 relative, which could only
flip a draw landing exactly on a bucket edge).  For greedy decoding the same
holds against unbatched decoding, up to float ties.

Stops: ``params.stop`` strings are looked for on the decoded text of a window of
the last tokens after every token (a stop of *m* characters spans at most *4m*
byte-level tokens), and the tokenizer's EOS (or ``eos_token``) stops too; the
text is cut and stripped with :func:`~diaggym.engines.base.cut_at_stop`.  A
prompt longer than ``max_position_embeddings - max_tokens`` is an
:class:`EngineError` (``reason="prompt_too_long"``), never silently truncated.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diaggym.engines.base import Completion, Engine, EngineError, FinishReason, SamplingParams, cut_at_stop
from diaggym.errors import InputError

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")
# Compact the decode batch when at least this fraction of its rows has finished.
COMPACT_FRACTION = 0.25

KV = list[tuple[Any, Any]]  # per layer (keys, values), each [1, kv_heads, seq, head_dim]


# --------------------------------------------------------------------------- prefix cache
def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    eq = a[:n] == b[:n]
    return n if bool(eq.all()) else int(np.argmin(eq))


class _Node:
    """A run of tokens in the radix tree and their KV (per layer ``[1, kv_heads, len(ids), head_dim]``)."""

    __slots__ = ("children", "ids", "kv", "last", "parent")

    def __init__(self, ids: np.ndarray, kv: KV, parent: _Node | None) -> None:
        self.ids = ids
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last = 0


def _slice_kv(kv: KV, lo: int, hi: int | None = None) -> KV:
    """Own copies of columns ``lo:hi`` (a view would keep the whole original tensor alive)."""
    return [(k[:, :, lo:hi].clone(), v[:, :, lo:hi].clone()) for k, v in kv]


class PrefixCache:
    """KV of earlier token sequences in a radix tree over token ids, LRU-evicted against a token budget.

    A sequence is stored as the path from the root; sequences that share a prefix share its nodes,
    so memory is proportional to the *distinct* tokens held: a 30-step chain keeps its final prompt
    plus each step's generated tail, not 30 copies of its history.  :meth:`lookup` walks the tree
    along a new prompt and returns the matched path; :meth:`gather` concatenates its KV.  Eviction
    drops least-recently-used leaves until the budget holds.  Not thread-safe on its own: the engine
    holds its lock around every use.
    """

    def __init__(self, budget_tokens: int) -> None:
        self.budget = max(0, int(budget_tokens))
        self.root = _Node(np.zeros(0, dtype=np.int64), [], None)
        self.tokens = 0
        self.nodes = 0
        self.evictions = 0
        self._tick = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return self.nodes

    def _touch(self, node: _Node) -> None:
        self._tick += 1
        node.last = self._tick

    def lookup(self, ids: np.ndarray) -> list[tuple[_Node, int]]:
        """The matched path: (node, tokens of it matched) from the root down; marks it recently used."""
        path: list[tuple[_Node, int]] = []
        if not self.enabled:
            return path
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(int(ids[pos]))
            if child is None:
                break
            n = common_prefix(child.ids, ids[pos:])
            self._touch(child)
            path.append((child, n))
            pos += n
            if n < len(child.ids):
                break
            node = child
        return path

    @staticmethod
    def gather(path: list[tuple[_Node, int]], length: int) -> KV:
        """KV of the first ``length`` tokens of a matched path, one tensor per layer."""
        parts: list[tuple[_Node, int]] = []
        left = length
        for node, n in path:
            if left <= 0:
                break
            parts.append((node, min(n, left)))
            left -= n
        import torch

        n_layers = len(parts[0][0].kv)
        return [
            (
                torch.cat([node.kv[li][0][:, :, :n] for node, n in parts], dim=2),
                torch.cat([node.kv[li][1][:, :, :n] for node, n in parts], dim=2),
            )
            for li in range(n_layers)
        ]

    def insert(self, ids: np.ndarray, kv: KV) -> None:
        """Store ``ids`` with ``kv`` (per layer ``[1, kv_heads, len(ids), head_dim]``); only new tokens are copied."""
        if not self.enabled or len(ids) == 0 or len(ids) > self.budget:
            return
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(int(ids[pos]))
            if child is None:
                leaf = _Node(ids[pos:].copy(), _slice_kv(kv, pos), node)
                node.children[int(ids[pos])] = leaf
                self._touch(leaf)
                self.tokens += len(leaf.ids)
                self.nodes += 1
                break
            n = common_prefix(child.ids, ids[pos:])
            if n == len(ids) - pos:  # already held
                self._touch(child)
                break
            if n < len(child.ids):  # split: child becomes head (n tokens) -> tail (the rest)
                tail = _Node(child.ids[n:].copy(), _slice_kv(child.kv, n), child)
                tail.children, tail.last = child.children, child.last
                for grandchild in tail.children.values():
                    grandchild.parent = tail
                child.ids, child.kv = child.ids[:n].copy(), _slice_kv(child.kv, 0, n)
                child.children = {int(tail.ids[0]): tail}
                self.nodes += 1
            self._touch(child)
            pos += n
            node = child
        self._evict()

    def _evict(self) -> None:
        while self.tokens > self.budget:
            leaves = []
            stack = list(self.root.children.values())
            while stack:
                nd = stack.pop()
                if nd.children:
                    stack.extend(nd.children.values())
                else:
                    leaves.append(nd)
            leaves.sort(key=lambda nd: nd.last)
            for leaf in leaves:
                if self.tokens <= self.budget:
                    break
                del leaf.parent.children[int(leaf.ids[0])]
                self.tokens -= len(leaf.ids)
                self.nodes -= 1
                self.evictions += 1

    def clear(self) -> None:
        self.root.children = {}
        self.tokens = 0
        self.nodes = 0


# --------------------------------------------------------------------------- decode-time KV buffer
def _buffer_layer_class():
    """A cache layer over a preallocated ``[B, kv_heads, capacity, head_dim]`` buffer, written in place."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
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

    return BufferLayer


# --------------------------------------------------------------------------- attention
ATTN_IMPLEMENTATION = "diaggym_sdpa"


def _grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA that keeps grouped-query attention grouped when decoding with a padding mask.

    transformers' SDPA path repeats the KV heads (``repeat_kv``: a full copy of the cache, per
    layer, per token) whenever a mask is given, which is every step of a left-padded batch; on CPU
    that made a 32-row decode step ~6x slower.  For one query token the query heads that share a
    KV head are folded into the query-length axis instead (``[B, kv_heads, groups, head_dim]``),
    which is the same attention with no copy.  Everything else goes to the stock implementation.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if attention_mask is None or q_len != 1 or heads == kv_heads or attention_mask.dim() != 4:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = query.reshape(b, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def _use_grouped_sdpa(model) -> None:
    """Register :func:`_grouped_sdpa` (and SDPA's mask builder) and switch ``model`` to it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _grouped_sdpa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.config._attn_implementation = ATTN_IMPLEMENTATION


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
    snapshot: tuple[np.ndarray, KV] | None = None


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
        prefill_chunk: int = 2048,
        *,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """Load ``model_dir`` (tokenizer + causal LM) onto ``device`` in ``dtype``.

        ``model``/``tokenizer`` may be given instead of ``model_dir`` (already-built objects, e.g. a
        randomly initialised 7B-shaped model built straight on a GPU for benchmarks); the model is
        then used as it is (its device and dtype are not changed).
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
        if self.model.config._attn_implementation in ("sdpa", ATTN_IMPLEMENTATION):
            _use_grouped_sdpa(self.model)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.eos_token = eos_token if eos_token is not None else self.tokenizer.eos_token
        eos_id = self.tokenizer.convert_tokens_to_ids(self.eos_token) if self.eos_token else None
        unk = self.tokenizer.unk_token_id
        self.eos_id: int | None = eos_id if isinstance(eos_id, int) and (unk is None or eos_id != unk) else None
        self.cache = PrefixCache(prefix_cache_tokens)
        self._lock = threading.Lock()
        self._seeds = random.SystemRandom()
        self._buffer_layer = _buffer_layer_class()
        self._stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "completions": 0}

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
            if not ids:
                raise EngineError(f"prompt {i} is empty after tokenization", reason="bad_request")
            if self.max_positions is not None and len(ids) > self.max_positions - p.max_tokens:
                raise EngineError(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={p.max_tokens} the model's "
                    f"max_position_embeddings={self.max_positions} allows at most "
                    f"{self.max_positions - p.max_tokens} prompt tokens",
                    reason="prompt_too_long",
                )
        out: list[Completion | None] = [None] * len(prompts)
        with self._lock, torch.inference_mode():
            for lo in range(0, len(prompts), self.max_batch_size):
                rows = [
                    _Row(index=i, ids=list(encoded[i]), params=params[i], seed=self._seed(params[i]))
                    for i in range(lo, min(lo + self.max_batch_size, len(prompts)))
                ]
                for row, completion in zip(rows, self._run_batch(rows), strict=True):
                    out[row.index] = completion
        return out  # type: ignore[return-value]

    def _seed(self, p: SamplingParams) -> int | None:
        if p.temperature == 0:
            return None
        return p.seed if p.seed is not None else self._seeds.randrange(2**63)

    def _run_batch(self, rows: list[_Row]) -> list[Completion]:
        import torch

        dev = self.device
        # 1. per-sequence prefill on top of the longest cached prefix
        kvs: list[KV] = []
        last_logits = []
        for row in rows:
            ids = np.asarray(row.ids, dtype=np.int64)
            path = self.cache.lookup(ids)
            # at least one token must run through the model to give the next-token logits
            row.cached = min(sum(n for _, n in path), len(ids) - 1)
            prefix = self.cache.gather(path, row.cached) if row.cached > 0 else None
            kv, logits = self._prefill(row.ids, prefix, row.cached)
            del prefix
            self.cache.insert(ids, kv)
            kvs.append(kv)
            last_logits.append(logits)
            if row.seed is not None:
                g = torch.Generator(device=dev).manual_seed(row.seed)
                row.uniforms = torch.rand(row.params.max_tokens, generator=g, device=dev, dtype=torch.float32)
        # 2. right-aligned decode buffer, preallocated for the longest prompt + the most new tokens
        b = len(rows)
        width = max(len(r.ids) for r in rows)
        cap = width + max(r.params.max_tokens for r in rows)
        layers = []
        for li in range(len(kvs[0])):
            k0 = kvs[0][li][0]
            shape = (b, k0.shape[1], cap, k0.shape[3])
            buf_k = torch.empty(shape, dtype=k0.dtype, device=dev)
            buf_v = torch.empty(shape, dtype=k0.dtype, device=dev)
            for r, row in enumerate(rows):
                pad = width - len(row.ids)
                k, v = kvs[r][li]
                buf_k[r, :, pad:width] = k[0]
                buf_v[r, :, pad:width] = v[0]
                if pad:
                    buf_k[r, :, :pad] = 0  # finite values under the mask (garbage could be NaN)
                    buf_v[r, :, :pad] = 0
            layers.append(self._buffer_layer(buf_k, buf_v, width))
        del kvs
        from transformers.cache_utils import Cache

        cache = Cache(layers=layers)
        mask = torch.ones((b, cap), dtype=torch.long, device=dev)
        for r, row in enumerate(rows):
            row.start = width - len(row.ids)
            mask[r, : row.start] = 0
        positions = torch.tensor([len(r.ids) for r in rows], dtype=torch.long, device=dev)
        logits = torch.stack(last_logits)
        active = list(range(b))  # batch position -> row
        # 3. decode: sample, check stops, forward the live batch one token
        while True:
            tokens = self._sample(logits, [rows[r] for r in active])
            for bpos, r in enumerate(active):
                row = rows[r]
                if row.done:
                    continue
                row.gen.append(tokens[bpos])
                if self._finished(row):
                    row.done = True
                    if self.cache.enabled:
                        row.snapshot = self._snapshot(row, layers, bpos)
            live = [bpos for bpos, r in enumerate(active) if not rows[r].done]
            if not live:
                break
            if len(active) - len(live) >= max(1, COMPACT_FRACTION * len(active)):
                keep = torch.tensor(live, dtype=torch.long, device=dev)
                first = min(rows[active[bpos]].start for bpos in live)
                for layer in layers:
                    layer.select(keep, first)
                mask = mask[:, first:].index_select(0, keep)
                positions = positions.index_select(0, keep)
                tokens = [tokens[bpos] for bpos in live]
                active = [active[bpos] for bpos in live]
                for r in active:
                    rows[r].start -= first
            length = layers[0].length
            out = self.model(
                input_ids=torch.tensor(tokens, dtype=torch.long, device=dev)[:, None],
                attention_mask=mask[:, : length + 1],
                position_ids=positions[:, None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
            positions = positions + 1
        del layers, cache
        # 4. keep prompt + generated KV for the next step of the chain; build the completions
        completions = []
        for row in rows:
            if row.snapshot is not None:
                self.cache.insert(*row.snapshot)
                row.snapshot = None
            completions.append(self._completion(row))
        return completions

    def _prefill(self, ids: list[int], prefix: KV | None, reuse: int) -> tuple[KV, Any]:
        """Run ``ids[reuse:]`` on top of ``prefix`` (the KV of ``ids[:reuse]``); (KV of all of ``ids``, last logits)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        if prefix is not None:
            for li, (k, v) in enumerate(prefix):
                cache.update(k, v, li)
        dev = self.device
        logits = None
        for lo in range(reuse, len(ids), self.prefill_chunk):
            chunk = ids[lo : lo + self.prefill_chunk]
            out = self.model(
                input_ids=torch.tensor([chunk], dtype=torch.long, device=dev),
                position_ids=torch.arange(lo, lo + len(chunk), device=dev)[None, :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[0, -1, :]
        return [(layer.keys, layer.values) for layer in cache.layers], logits

    def _sample(self, logits: Any, rows: list[_Row]) -> list[int]:
        """One token per row: argmax for greedy rows, seeded top-p inverse-CDF sampling for the others."""
        import torch

        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        pick = [i for i, row in enumerate(rows) if row.seed is not None and not row.done]
        if pick:
            idx = torch.tensor(pick, dtype=torch.long, device=logits.device)
            temps = torch.tensor([rows[i].params.temperature for i in pick], device=logits.device)
            top_p = torch.tensor([rows[i].params.top_p for i in pick], device=logits.device)
            u = torch.stack([rows[i].uniforms[len(rows[i].gen)] for i in pick])
            sorted_logits, order = (logits.index_select(0, idx) / temps[:, None]).sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            cum = probs.cumsum(dim=-1)
            probs = probs.masked_fill(cum - probs >= top_p[:, None], 0.0)  # nucleus: keep the top mass >= top_p
            cum = probs.cumsum(dim=-1)
            choice = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)
            choice = choice.clamp(max=cum.shape[-1] - 1)
            tokens[idx] = order.gather(1, choice)[:, 0]
        return tokens.tolist()

    def _finished(self, row: _Row) -> bool:
        tok = row.gen[-1]
        if self.eos_id is not None and tok == self.eos_id:
            row.hit_eos = True
            return True
        stops = row.params.stop
        if stops:
            window = 4 * max(len(s) for s in stops) + 2
            tail = self.tokenizer.decode(row.gen[-window:], skip_special_tokens=False)
            if any(s in tail for s in stops):
                row.hit_stop = True
                return True
        return len(row.gen) >= row.params.max_tokens

    def _snapshot(self, row: _Row, layers: list, bpos: int) -> tuple[np.ndarray, KV]:
        """KV of prompt + generated tokens (all but the last, which was never run) of one row."""
        n = len(row.ids) + len(row.gen) - 1
        ids = np.asarray(row.ids + row.gen[:-1], dtype=np.int64)
        sl = slice(row.start, row.start + n)
        kv = [
            (layer.buf_k[bpos : bpos + 1, :, sl].clone(), layer.buf_v[bpos : bpos + 1, :, sl].clone())
            for layer in layers
        ]
        return ids, kv

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


__all__ = ["PrefixCache", "TransformersEngine", "common_prefix"]
