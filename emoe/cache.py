"""Fast tier: routed experts admitted to the compute device under a hard byte budget.

The cache knows nothing of why an expert is wanted; policies and the loader decide. It only guarantees
that `used_bytes <= budget_bytes` after every call (admission is refused, never overshot), that
`set_resident` moves only the difference, and it keeps the counters a user asks for.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch


class BudgetError(ValueError):
    """The requested residency does not fit the byte budget."""


@dataclass(slots=True)
class CacheStats:
    hits: int = 0          # routed token-assignments whose expert was resident when routed
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I,H], up [I,H], down [H,I]


class ExpertCache:
    def __init__(self, store, budget_bytes: int, device: torch.device, dtype: torch.dtype,
                 num_layers: int, num_experts: int, expert_numel: int):
        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.expert_bytes = expert_numel * torch.empty((), dtype=dtype).element_size()
        self.budget_bytes = int(budget_bytes)
        if self.budget_bytes < 0:
            raise BudgetError("budget must be non-negative")
        self.num_experts = num_experts
        self._res: OrderedDict[tuple[int, int], Weights] = OrderedDict()  # LRU order, oldest first
        # mask[layer, e] is True when resident: the reroute rule reads it on every MoE layer call
        self.mask = torch.zeros(num_layers, num_experts, dtype=torch.bool, device=self.device)
        self.stats = CacheStats()

    # -- queries ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.budget_bytes // self.expert_bytes

    @property
    def used_bytes(self) -> int:
        return len(self._res) * self.expert_bytes

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def resident(self, layer: int | None = None) -> list[tuple[int, int]] | list[int]:
        if layer is None:
            return list(self._res)
        return sorted(e for (l, e) in self._res if l == layer)

    def get(self, layer: int, expert: int) -> Weights:
        key = (layer, expert)
        self._res.move_to_end(key)
        return self._res[key]

    def lru(self, exclude=()) -> tuple[int, int] | None:
        return next((k for k in self._res if k not in exclude), None)

    # -- moves -----------------------------------------------------------------------------------
    def _check(self, layer: int, expert: int) -> None:
        if not 0 <= expert < self.num_experts or not 0 <= layer < self.mask.shape[0]:
            raise KeyError(f"no expert {expert} in layer {layer}")

    def admit(self, layer: int, expert: int) -> None:
        self._check(layer, expert)
        key = (layer, expert)
        if key in self._res:
            self._res.move_to_end(key)
            return
        if self.used_bytes + self.expert_bytes > self.budget_bytes:
            raise BudgetError(f"admitting expert {layer}/{expert} would exceed the budget "
                              f"({self.used_bytes + self.expert_bytes} > {self.budget_bytes} bytes)")
        t0 = time.perf_counter()
        host = self.store.read(layer, expert)
        w = tuple(t.to(self.device, self.dtype, non_blocking=True) for t in host)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._res[key] = w
        self.mask[layer, expert] = True
        self.stats.loads += 1
        self.stats.bytes_loaded += self.expert_bytes
        self.stats.load_seconds += time.perf_counter() - t0

    def evict(self, layer: int, expert: int) -> None:
        if self._res.pop((layer, expert), None) is not None:
            self.mask[layer, expert] = False
            self.stats.evictions += 1

    def set_resident(self, plan: dict[int, list[int]]) -> tuple[int, int]:
        """Make each listed layer hold exactly the given experts; other layers stay as they are.
        Validates everything first, so a plan that does not fit changes nothing. Returns (loaded, evicted)."""
        for layer, ids in plan.items():
            for e in ids:
                self._check(layer, e)
        keep = {k for k in self._res if k[0] not in plan} | {(l, e) for l, ids in plan.items() for e in ids}
        if len(keep) * self.expert_bytes > self.budget_bytes:
            raise BudgetError(f"plan needs {len(keep) * self.expert_bytes} bytes, budget is {self.budget_bytes}")
        drop = [k for k in self._res if k not in keep]
        for k in drop:
            self.evict(*k)
        add = [k for k in sorted(keep) if k not in self._res]
        for k in add:
            self.admit(*k)
        return len(add), len(drop)
