"""Which KV slot a request takes, and the KV it finds there: prefix reuse, and finished requests' KV kept
in host memory (llama-server's --cache-ram, vLLM's prefix caching).

Prefix reuse finds a prompt's prefix only in a free KV slot whose last occupant shared it. With more
conversations or repeated prompts than slots, that KV is overwritten before it is asked for again. Here the
KV of a slot's tokens is copied to host memory when a new request takes the slot over, and a later prompt
sharing a longer prefix than any free slot has gets that KV copied back instead of prefilled. One copy of a
few MB costs far less than a prefill of the same tokens. Least recently used entries go first, under a byte
cap; an entry whose tokens start another's is dropped.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .model import KVCache


def take_slot(free: list[int], held: dict[int, list[int]], prompt: list[int], reuse: bool, recurrent: bool,
              cache: "PromptCache | None", kv: KVCache) -> tuple[int, int]:
    """(a slot taken from free, prompt tokens whose KV it holds). With reuse, the free slot whose last occupant's
    tokens (held) share the longest prefix with this prompt: a chat's next turn re-sends the conversation, and
    its KV is still there at the same positions. A recurrent state holds all it saw, so there only a slot
    whose every held token matches counts. The cache keeps the taken slot's KV and restores a longer prefix
    than the slot had. The last prompt token is always prefilled, for its logits."""
    best, shared = 0, 0
    if reuse:
        for i, s in enumerate(free):
            h = held.get(s, ())
            n = next((k for k, (a, b) in enumerate(zip(h, prompt[:-1])) if a != b), min(len(h), len(prompt) - 1))
            if recurrent and n < len(h):
                n = 0
            if n > shared:
                best, shared = i, n
    slot = free.pop(best)
    h = held.pop(slot, None)
    if cache is not None:
        if h:  # about to be overwritten
            cache.save(h, kv, slot)
        key, n = cache.match(prompt[:-1]) if reuse else (None, 0)
        if n > shared:
            cache.restore(key, n, kv, slot)
            shared = n
    return slot, shared


class PromptCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prompt cache bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[torch.Tensor]]] = OrderedDict()
        self.saved = self.restored_tokens = 0

    def save(self, tokens: list[int], kv: KVCache, slot: int) -> None:
        """Keep the KV slot `slot` holds for `tokens` (its positions 0 .. len - 1), unless a kept entry already
        starts with them or they would not fit the cap at all."""
        key, n = tuple(tokens), len(tokens)
        if not n or self.max_bytes == 0:
            return
        if self.match(tokens, limit=n)[1] == n:  # as long a prefix is kept already
            return
        size = sum(t[slot, :n].nbytes for t in _tensors(kv))
        if size > self.max_bytes:
            return
        for other in [o for o in self.entries if len(o) < n and o == key[: len(o)]]:  # its tokens start these
            self._drop(other)
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self.entries)))
        blocks = [t[slot, :n].to("cpu", copy=True) for t in _tensors(kv)]
        self.entries[key] = (np.asarray(tokens, dtype=np.int64), blocks)
        self.bytes += size
        self.saved += 1

    def match(self, prompt: list[int], limit: int | None = None) -> tuple[tuple[int, ...] | None, int]:
        """(the entry sharing the longest prefix with prompt[:limit], that prefix's length); (None, 0) if none."""
        p = np.asarray(prompt[:limit], dtype=np.int64)
        best, shared = None, 0
        if not len(p):
            return best, shared
        for key, (toks, _) in self.entries.items():
            m = min(len(toks), len(p))
            if m <= shared or toks[0] != p[0]:
                continue
            diff = np.flatnonzero(toks[:m] != p[:m])
            n = int(diff[0]) if len(diff) else m
            if n > shared:
                best, shared = key, n
        return best, shared

    def restore(self, key: tuple[int, ...], n: int, kv: KVCache, slot: int) -> None:
        """Copy the entry's KV for its first n tokens into the slot's positions 0 .. n - 1."""
        _, blocks = self.entries[key]
        for block, t in zip(blocks, _tensors(kv)):
            t[slot, :n].copy_(block[:n])
        self.entries.move_to_end(key)
        self.restored_tokens += n

    def _drop(self, key: tuple[int, ...]) -> None:
        _, blocks = self.entries.pop(key)
        self.bytes -= sum(b.nbytes for b in blocks)


def _tensors(kv: KVCache) -> list[torch.Tensor]:
    """Every per-token cache tensor [slots, max_len, …]: k and v per layer (under MLA only k, the latents)."""
    return [*kv.k, *kv.v]
