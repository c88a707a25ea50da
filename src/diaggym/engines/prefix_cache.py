"""The prefix-KV cache of :class:`~diaggym.engines.hf.TransformersEngine`: a radix tree over token ids.

diaggym-v1 prompts are append-only (each step's prompt is the previous prompt plus one event), so
the keys and values of earlier sequences are reused: a new prompt is walked down the tree on token
ids and only its unmatched suffix runs through the model.  Matching on ids, not text, makes a
tokenization that differs at the boundary simply cost a few more tokens.  Plain numpy plus torch
tensors it is handed; it imports torch only through those tensors' methods.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KV = list[tuple[Any, Any]]  # per layer (keys, values), each [1, kv_heads, seq, head_dim]


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
    along a new prompt and returns the matched path; :meth:`copy_into` writes its KV into a buffer.  Eviction
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
    def copy_into(path: list[tuple[_Node, int]], length: int, dest: KV) -> None:
        """Write the KV of the first ``length`` tokens of a matched path into ``dest`` (per layer, from column 0)."""
        pos = 0
        for node, n in path:
            n = min(n, length - pos)
            if n <= 0:
                break
            for (k, v), (dk, dv) in zip(node.kv, dest, strict=True):
                dk[:, :, pos : pos + n] = k[:, :, :n]
                dv[:, :, pos : pos + n] = v[:, :, :n]
            pos += n

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
