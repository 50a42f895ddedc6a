"""Prefix caching: keys/values that earlier sequences computed for the same leading tokens, reused.

Chat requests share a system prompt, few-shot prompts share their examples, and every turn of a
conversation resends the turns before it. The store keeps the K/V of whole blocks of `block` tokens in a
tree keyed by the tokens themselves (exact matches: no hashes to collide), so a new sequence starts from
the longest stored prefix of its prompt and prefills only the rest.

Only positions below the rolling cache's capacity are stored: there a position's buffer index is the
position itself, so a hit is one copy per layer, and a sequence's first `capacity` positions are all a
later prompt can share with it anyway once the buffer rolls. The store is bounded by `max_tokens`; the
least recently used blocks go first, always leaves before the blocks they extend.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (compared 64 at a time, then one by one)."""
    n, end = 0, min(len(a), len(b))
    while n + 64 <= end and a[n : n + 64] == b[n : n + 64]:
        n += 64
    while n < end and a[n] == b[n]:
        n += 1
    return n


Reader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)
class Block:
    """`block` tokens following the parent's, with their keys and values `[layers, kv_heads, block, head_dim]`."""

    tokens: tuple[int, ...]
    parent: Block | None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    children: dict[tuple[int, ...], Block] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, max_tokens: int, block: int = 16) -> None:
        if block < 1 or max_tokens < block:
            raise ValueError(f"the prefix cache holds whole blocks of {block} tokens: its size must be 0 (off) "
                             f"or at least {block} tokens, got {max_tokens}")
        self.block, self.max_blocks = block, max_tokens // block
        self._root = Block((), None)
        self._lru: OrderedDict[Block, None] = OrderedDict()  # every parent more recent than its children

    def __len__(self) -> int:
        """Blocks stored."""
        return len(self._lru)

    def clear(self) -> None:
        """Forget every block (the model's weights changed: stored keys/values no longer hold)."""
        self._root.children.clear()
        self._lru.clear()

    def match(self, tokens: Sequence[int]) -> list[Block]:
        """The stored blocks that begin `tokens`, in order (marked as just used)."""
        path, node = [], self._root
        for a in range(0, len(tokens) - self.block + 1, self.block):
            node = node.children.get(tuple(tokens[a : a + self.block]))
            if node is None:
                break
            path.append(node)
        self._touch(path)
        return path

    def extend(self, tokens: Sequence[int], first: int, read: Reader) -> None:
        """Store the whole blocks of `tokens` (their K/V still readable from position `first` on, via
        `read(start, end) -> (k, v)` shaped `[layers, kv_heads, end - start, head_dim]`) after those stored."""
        path = self.match(tokens)
        start = len(path) * self.block
        end = start + (len(tokens) - start) // self.block * self.block
        end = min(end, self.max_blocks * self.block)
        if start < first or start >= end:  # the next block is gone from the buffer, or none is whole
            return
        k, v = read(start, end)
        node = path[-1] if path else self._root
        for i, a in enumerate(range(start, end, self.block)):
            s = slice(i * self.block, (i + 1) * self.block)
            key = tuple(tokens[a : a + self.block])
            child = Block(key, node, k[:, :, s].clone(), v[:, :, s].clone())
            node.children[key] = child
            node = child
            path.append(child)
            self._lru[child] = None
        self._touch(path)
        while len(self._lru) > self.max_blocks:
            old, _ = self._lru.popitem(last=False)
            del old.parent.children[old.tokens]

    def _touch(self, path: list[Block]) -> None:
        for node in reversed(path):  # deepest first, so each parent ends up more recent than its children
            self._lru.move_to_end(node)
