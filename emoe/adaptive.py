"""A miss policy that follows the residency plan or LRU, whichever the recent routing would have read less with.

Measured with every miss a disk read (docs/results/eval_serving_counts.txt, larger_than_ram.txt): on the embedded model's
mixed task stream a plan (eMoE's, with misses run where they lie) read 23-29% fewer bytes than LRU, whose prefills push
out what the next requests need; on a random model whose consecutive tokens share experts, LRU decoded at 5-8x a
profile-free plan's speed. Neither wins both, and a server does not know which workload it has. So this keeps two
ghosts of the recent routed assignments, the plan's set and an LRU of the same capacity, and runs as the one whose
ghost would have read less over the last window (by `margin`; LRU's reads count twice, since each evicts a planned
expert that a return to the plan reads again, and such a return must earn back the reads that restoring the plan
takes), as ARC weighs recency against frequency. The cost counted is reads, not hit rates: a
prefill's miss is one read however many of its tokens go to the expert. Both modes are exact: a miss runs on the
expert's own weights, read (plan: not admitted) or loaded (LRU: the least recently used evicted). The engine asks `follows(plan)` before it applies a plan: in LRU mode it does not.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .policies import Host, LoadOnDemand


class Adapt(Host):
    name = "adapt"
    keeps_routing = True

    def __init__(self, plan=None, window: int = 64, margin: float = 0.2, payback: int = 4):
        """window: layer calls between decisions; margin: the share of reads the other ghost must save to switch;
        payback: windows in which a return to the plan must earn back the reads that restoring it takes."""
        super().__init__(plan)
        if window < 1 or not 0 <= margin < 1 or payback < 1:
            raise ValueError(f"window and payback must be >= 1 and margin in [0, 1), got {window}, {payback} and {margin}")
        self.window, self.margin, self.payback, self.mode = window, margin, payback, "plan"
        self.switches: list[tuple[int, str]] = []  # (layer calls seen, new mode): what a run reports
        self._planned: dict[int, set[int]] = {}  # the last plan's experts per layer
        self._last: dict | None = None
        self._lru: OrderedDict = OrderedDict()
        self._reads = [0, 0]  # this window's (plan, LRU) ghost reads
        self._calls = self._total = self._streak = 0

    def prepare(self, cache, layers):
        super().prepare(cache, layers)
        self._cap = cache.capacity
        self._last = {l: cache.resident(l) for l in layers}
        self._planned = {l: set(e) for l, e in self._last.items()}
        self._lru = OrderedDict((k, None) for k in cache.resident())  # both ghosts start from what the cache holds

    def follows(self, plan) -> bool:
        """Whether the engine applies this plan (plan mode); the plan's set becomes the plan ghost either way."""
        if isinstance(plan, dict):
            self._last = {**self._last, **plan}
            self._planned = {l: set(e) for l, e in self._last.items()}
        return self.mode == "plan"

    def observe(self, layer: int, ids: torch.Tensor, cache) -> None:
        """A layer call's routing (before its fetches): what each ghost would read for it (a missing expert is one
        read, whatever its token count, in either mode), and at the end of each window the mode that reads less."""
        planned, lru, cap = self._planned.get(layer, ()), self._lru, self._cap
        for e in sorted(set(ids.reshape(-1).tolist())):  # as run_experts fetches them
            self._reads[0] += e not in planned
            key = (layer, e)
            if key in lru:
                lru.move_to_end(key)
            else:
                self._reads[1] += 1
                lru[key] = None
                if len(lru) > cap:
                    lru.popitem(last=False)
        self._calls += 1
        if self._calls >= self.window:
            self._decide(cache)

    def _decide(self, cache) -> None:
        """Switch where the other mode would have read less in this window and the one before (a single window
        swings with one batch's prompts)."""
        plan, lru = self._reads
        self._total += self._calls
        want = self.mode
        if self.mode == "plan" and 2 * lru < plan * (1 - self.margin):  # each LRU read evicts a planned expert,
            want = "lru"                                                   # which a return to the plan reads again
        elif self.mode == "lru" and plan < lru * (1 - self.margin):
            held = set(cache.resident())
            restore = sum((l, e) not in held for l, es in self._last.items() for e in es)
            want = "plan" if (lru - plan) * self.payback > restore else "lru"
        self._streak = self._streak + 1 if want != self.mode else 0
        if self._streak >= 2:
            self.mode, self._streak = want, 0
            self.switches.append((self._total, want))
            if want == "plan":  # back to the plan now, not at the next scheduling decision
                cache.set_resident(self._last)
        self._reads, self._calls = [0, 0], 0

    def defers(self, layer, expert, cache, n_tokens=1) -> bool:
        return self.mode == "plan" and super().defers(layer, expert, cache, n_tokens)

    def fetch(self, layer, expert, cache, n_tokens=1):
        if self.mode == "lru":
            return LoadOnDemand.fetch(self, layer, expert, cache, n_tokens)
        return super().fetch(layer, expert, cache, n_tokens)

    def hosts_all(self, layer, cache, n_tokens) -> bool:
        return self.mode == "plan" and super().hosts_all(layer, cache, n_tokens)
