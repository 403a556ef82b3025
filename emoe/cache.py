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

from .quant import QTensor, dequantize, qbytes, quantize


class BudgetError(ValueError):
    """The requested residency does not fit the byte budget."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Full-precision experts per layer, and which others keep a hi_bits shadow (two-level shadows)."""
    full: dict[int, list[int]]
    hi: dict[int, list[int]]


@dataclass(frozen=True, slots=True)
class Levels:
    """What the budget leaves once every expert has a base shadow, and what raising one costs."""
    free_bytes: int
    full_cost: int   # base shadow → full precision
    hi_cost: int     # base shadow → hi_bits shadow


@dataclass(slots=True)
class CacheStats:
    hits: int = 0          # routed token-assignments whose expert was resident when routed
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    shadow_uses: int = 0   # misses served by an expert's low-bit shadow copy

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
        # low-bit shadows (enable_shadow): every expert not resident at full precision keeps a quantised
        # copy, at `shadow_bits`, or at `hi_bits` for those a Plan lists in `hi`
        self.shadow_bits = self.hi_bits = self.shadow_bytes = self.hi_bytes = self._shadow_slots = 0
        self._shadow: dict[tuple[int, int], tuple[QTensor, QTensor, QTensor]] = {}
        self._hi: set[tuple[int, int]] = set()  # keys whose shadow is at hi_bits

    # -- queries ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Experts the budget holds at full precision (next to the shadows of all the others)."""
        if not self.shadow_bits:
            return self.budget_bytes // self.expert_bytes
        free = self.budget_bytes - self._shadow_slots * self.shadow_bytes
        return max(0, min(self._shadow_slots, free // (self.expert_bytes - self.shadow_bytes)))

    @property
    def used_bytes(self) -> int:
        return len(self._res) * self.expert_bytes + self.bytes_for(0, len(self._hi), len(self._shadow))

    def bytes_for(self, full: int, hi: int = 0, slots: int | None = None) -> int:
        """Bytes held with `full` experts at full precision, `hi` shadows at hi_bits and the other slots'
        shadows at shadow_bits (no shadows unless enabled)."""
        rest = (self._shadow_slots if slots is None else slots) - full - hi
        return full * self.expert_bytes + (hi * self.hi_bytes + rest * self.shadow_bytes) * bool(self.shadow_bits)

    def levels(self) -> "Levels":
        """Byte prices for a two-level planner (loader.plan_levels)."""
        return Levels(self.budget_bytes - self._shadow_slots * self.shadow_bytes, self.expert_bytes - self.shadow_bytes,
                      self.hi_bytes - self.shadow_bytes)

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

    def approx(self, layer: int, expert: int) -> Weights:
        """A non-resident expert's weights rebuilt from its shadow (KeyError when there is none)."""
        q = self._shadow[(layer, expert)]
        self.stats.shadow_uses += 1
        return tuple(dequantize(t, self.dtype) for t in q)

    def enable_shadow(self, layers: list[int], bits: int, hi_bits: int = 0, group: int = 32) -> None:
        """Hold a `bits`-bit copy of every expert of `layers` that is not resident at full precision
        (plans may raise some to `hi_bits`). Must be called before anything is resident; refused
        (changing nothing) when the copies alone exceed the budget. Reads every expert once."""
        if self._res or self.shadow_bits:
            raise RuntimeError("enable_shadow must come before any expert is resident, and only once")
        if hi_bits and hi_bits <= bits:
            raise ValueError(f"hi_bits ({hi_bits}) must exceed the base shadow precision ({bits})")
        w = self.store.read(layers[0], 0)
        each, hi = (sum(qbytes(tuple(t.shape), b, group) for t in w) if b else 0 for b in (bits, hi_bits))
        slots = len(layers) * self.num_experts
        if slots * each > self.budget_bytes:
            raise BudgetError(f"int{bits} shadow copies of {slots} experts need {slots * each} bytes, "
                              f"budget is {self.budget_bytes}")
        self.shadow_bits, self.shadow_bytes, self._shadow_slots, self._group = bits, each, slots, group
        self.hi_bits, self.hi_bytes = hi_bits, hi
        for layer in layers:
            for e in range(self.num_experts):
                self._check(layer, e)
                self._shadow[(layer, e)] = self._quant(self.store.read(layer, e), bits)

    def _quant(self, w, bits: int):
        return tuple(quantize(t.to(self.device), bits, self._group) for t in w)

    def _reshadow(self, key, bits: int) -> None:
        """Change a shadow's precision: down from the shadow itself (no read), up from the slow tier."""
        if bits == self.hi_bits:
            t0 = time.perf_counter()
            self._shadow[key] = self._quant(self.store.read(*key), bits)
            self._hi.add(key)
            self.stats.bytes_loaded += self.hi_bytes
            self.stats.load_seconds += time.perf_counter() - t0
        else:
            self._shadow[key] = self._quant([dequantize(q) for q in self._shadow[key]], bits)
            self._hi.discard(key)

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
        freed = (self.hi_bytes if key in self._hi else self.shadow_bytes) if key in self._shadow else 0
        need = self.used_bytes + self.expert_bytes - freed
        if need > self.budget_bytes:
            raise BudgetError(f"admitting expert {layer}/{expert} would exceed the budget "
                              f"({need} > {self.budget_bytes} bytes)")
        t0 = time.perf_counter()
        host = self.store.read(layer, expert)
        w = tuple(t.to(self.device, self.dtype, non_blocking=True) for t in host)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._res[key] = w
        self._shadow.pop(key, None)
        self._hi.discard(key)
        self.mask[layer, expert] = True
        self.stats.loads += 1
        self.stats.bytes_loaded += self.expert_bytes
        self.stats.load_seconds += time.perf_counter() - t0

    def evict(self, layer: int, expert: int, hi: bool = False) -> None:
        w = self._res.pop((layer, expert), None)
        if w is not None:
            if self.shadow_bits:  # requantise from the fast copy: costs no slow-tier read, frees bytes
                bits = self.hi_bits if hi and self.hi_bits else self.shadow_bits
                self._shadow[(layer, expert)] = self._quant(w, bits)
                if bits == self.hi_bits:
                    self._hi.add((layer, expert))
            self.mask[layer, expert] = False
            self.stats.evictions += 1

    def set_resident(self, plan: "dict[int, list[int]] | Plan") -> tuple[int, int]:
        """Make each listed layer hold exactly the given experts; other layers stay as they are. A Plan
        also says which of the others keep hi_bits shadows (the rest of its layers drop to shadow_bits).
        Validates everything first, so a plan that does not fit changes nothing. Returns (loaded, evicted)."""
        full, hi = (plan.full, plan.hi) if isinstance(plan, Plan) else (plan, {})
        for layer, ids in list(full.items()) + list(hi.items()):
            for e in ids:
                self._check(layer, e)
        if hi and not self.hi_bits:
            raise ValueError("this plan raises shadows to hi_bits, but the cache has none (enable_shadow)")
        keep = {k for k in self._res if k[0] not in full} | {(l, e) for l, ids in full.items() for e in ids}
        up = ({k for k in self._hi if k[0] not in hi} | {(l, e) for l, ids in hi.items() for e in ids}) - keep
        need = self.bytes_for(len(keep), len(up))
        if need > self.budget_bytes:
            raise BudgetError(f"plan needs {need} bytes, budget is {self.budget_bytes}")
        drop = [k for k in self._res if k not in keep]
        for k in drop:  # shrinking moves first, so no intermediate state exceeds the final one
            self.evict(*k, hi=k in up)
        for k in [k for k in self._hi if k not in up and k in self._shadow]:
            self._reshadow(k, self.shadow_bits)
        for k in sorted(up - self._hi):
            self._reshadow(k, self.hi_bits)
        add = [k for k in sorted(keep) if k not in self._res]
        for k in add:
            self.admit(*k)
        return len(add), len(drop)
