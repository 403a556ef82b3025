"""Fast tier: routed experts admitted to the compute device under a hard byte budget.

The cache knows nothing of why an expert is wanted; policies and the loader decide. It only guarantees
that `used_bytes <= budget_bytes` after every call (admission is refused, never overshot), that
`set_resident` moves only the difference, and it keeps the counters a user asks for.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch

from .quant import KTensor, QTensor, copy_group, dequantize, kbytes, kernel_fits, qbytes, quantize, to_kernel


class BudgetError(ValueError):
    """The requested residency does not fit the byte budget."""


FULL = 16  # a Plan's level for an expert held at full precision (others: copy bits, or 0 = not held)


@dataclass(frozen=True, slots=True)
class Plan:
    """Per listed layer, every expert's level: FULL, a shadow copy's bits, or 0 (not held: misses on it
    are rerouted). Layers not listed stay as they are."""
    levels: dict[int, list[int]]


@dataclass(frozen=True, slots=True)
class Levels:
    """Bytes one expert costs at each level, and the budget: what a precision planner needs."""
    budget_bytes: int
    cost: dict[int, int]   # level → bytes (0 → 0)
    top_k: int = 0         # experts each layer must hold at some level (reroute needs a full top-k)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0          # routed token-assignments whose expert was resident when routed
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    shadow_uses: int = 0   # misses served by an expert's low-bit shadow copy
    host_runs: int = 0     # misses run in the slow tier on the expert's own weights (no copy into the budget)
    wait_seconds: float = 0.0  # layer calls waiting for a plan's load still landing (mover): the moves' exposed part

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [I,H], up [I,H], down [H,I]


def land(packed, unpack, device: torch.device, dtype: torch.dtype) -> Weights:
    """An expert's stored tensors copied to the device and unpacked there, in dtype: fewer bytes cross than
    unpacked ones (MXFP4: 4.25 bits a weight). Touches no shared state, so a mover's thread may run it."""
    return tuple(t.to(dtype) for t in unpack(tuple(t.to(device, non_blocking=True) for t in packed)))


class ExpertCache:
    def __init__(self, store, budget_bytes: int, device: torch.device, dtype: torch.dtype,
                 num_layers: int, num_experts: int, expert_numel: int, kernel: bool = True):
        """kernel: on CPU, hold copies in the layout of PyTorch's int4 matmul kernel (quant.KTensor). A store
        whose reads are kernel forms (formstore: a CPU's fast tier holds them as they are) sets what an expert
        costs: its largest expert's forms, so the budget holds whichever experts are admitted."""
        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.kernel = kernel
        self.forms = getattr(store, "form_tier", False)
        self.expert_bytes = store.expert_nbytes if self.forms else expert_numel * torch.empty((), dtype=dtype).element_size()
        self.budget_bytes = int(budget_bytes)
        if self.budget_bytes < 0:
            raise BudgetError("budget must be non-negative")
        self.num_experts = num_experts
        self._res: OrderedDict[tuple[int, int], Weights] = OrderedDict()  # LRU order, oldest first
        self.pinned: set[tuple[int, int]] = set()  # held at full precision because the last plan said so
        # mask[layer, e] is True when resident: the reroute rule reads it on every MoE layer call
        self.mask = torch.zeros(num_layers, num_experts, dtype=torch.bool, device=self.device)
        self.n_resident = [0] * num_layers  # per layer, as the mask says (read per call without a torch op)
        # level() of every expert as lists (a move writes one entry; a tensor element costs ~100x that): levels_held
        self._levels = [[0] * num_experts for _ in range(num_layers)]
        self.version = 0  # counts changes of any expert's level: a plan applied at this version needs no second pass
        self._stale: set[int] | None = None  # layers whose mask and avail rows set_resident writes at its end
        self._stats, self._pending = CacheStats(), None  # see stats and count_routed
        # low-bit shadows (enable_shadow): an expert not resident at full precision may hold a quantised
        # copy, at `shadow_bits` (every one, unless a Plan says otherwise) or `hi_bits`
        self.shadow_bits = self.hi_bits = self.shadow_bytes = self._shadow_slots = self._shadow_used = 0
        self._qcost: dict[int, int] = {}
        self._groups: dict[int, int] = {}  # bits → the group its copies are quantised in (quant.copy_group)
        self._shadow: dict[tuple[int, int], tuple[QTensor | KTensor, ...]] = {}
        self._memo: dict | None = None  # (key, bits) → host copy, when the slow tier is RAM (see _copy)
        self.copy_files: dict = {}  # bits → copies.CopyFile: copies made ahead of time by `emoe quantize`
        # avail[layer, e]: full or shadow; what a miss may run on (the rest is rerouted)
        self.avail = torch.zeros(num_layers, num_experts, dtype=torch.bool, device=self.device)
        self.moved: set[tuple[int, int]] | None = None  # where a set: the keys admitted or evicted (dispatch's C tables)
        # loader.Mover: set_resident's loads land on a worker thread; an admitted expert is held (mask, bytes,
        # LRU) at once, as a Future in _res until the first call that reads its weights waits for it (_wait)
        self.mover = None

    # -- queries ---------------------------------------------------------------------------------
    @property
    def stats(self) -> CacheStats:
        """The counters. Reading them settles the hit count that count_routed keeps on the device."""
        if self._pending is not None:
            hits, n = self._pending
            hits = int(hits)
            self._stats.hits += hits
            self._stats.misses += n - hits
            self._pending = None
        return self._stats

    def count_hosted(self, layer: int, assignments: int, experts: int, nbytes: int) -> None:
        """A layer call whose every expert ran in the slow tier: its routed assignments (all misses) and
        `experts` host runs of nbytes in all, counted as count_routed and host() count them."""
        n = self._pending
        self._pending = (0, assignments) if n is None else (n[0], n[1] + assignments)
        self._stats.host_runs += experts
        self.store.ran_host(layer, experts, nbytes)

    def count_hits(self, n: int) -> None:
        """n routed assignments that all found their expert resident (a step run in C on the held experts)."""
        p = self._pending
        self._pending = (n, n) if p is None else (p[0] + n, p[1] + n)

    def count_routed(self, hit: torch.Tensor) -> None:
        """Tally a layer's routed assignments (hit: resident or not) without a host sync: on a GPU a decode
        step is bound by syncs, and the count is read far less often than it is added to."""
        n = hit.sum()
        self._pending = (n, hit.numel()) if self._pending is None else (self._pending[0] + n,
                                                                         self._pending[1] + hit.numel())

    @property
    def capacity(self) -> int:
        """Experts the budget holds at full precision (next to the shadows of all the others)."""
        if not self.shadow_bits:
            return self.budget_bytes // self.expert_bytes
        free = self.budget_bytes - self._shadow_slots * self.shadow_bytes
        return max(0, min(self._shadow_slots, free // (self.expert_bytes - self.shadow_bytes)))

    @property
    def used_bytes(self) -> int:
        return len(self._res) * self.expert_bytes + self._shadow_used

    @property
    def levels_held(self) -> torch.Tensor:
        """[layers, experts] level() of every expert, at once: what a sticky planner reads (loader.plan_levels)."""
        return torch.tensor(self._levels, dtype=torch.long)

    def level(self, key: tuple[int, int]) -> int:
        return FULL if key in self._res else self._shadow[key][0].bits if key in self._shadow else 0

    def incoming_bytes(self, plan: "dict[int, list[int]] | Plan") -> int:
        """Bytes a plan would bring into the fast tier (what it costs to load), without applying it."""
        if isinstance(plan, Plan):
            cost = self.levels().cost
            return sum(max(0, cost[v] - cost[self.level((l, e))])
                       for l, lv in plan.levels.items() for e, v in enumerate(lv))
        return sum((l, e) not in self._res for l, ids in plan.items() for e in ids) * self.expert_bytes

    def levels(self, top_k: int = 0) -> Levels:
        return Levels(self.budget_bytes, {0: 0, **self._qcost, FULL: self.expert_bytes}, top_k)

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
        w = self._res[key]
        if isinstance(w, Future):
            self._res[key] = w = self._wait(w)
        return w

    def _wait(self, w, count: bool = True):
        """Weights as held: a mover's load (a Future) waited for, the wait counted in wait_seconds."""
        if not isinstance(w, Future):
            return w
        t0 = time.perf_counter()
        w = self.mover.landed(w.result())
        if count:
            self._stats.wait_seconds += time.perf_counter() - t0
        return w

    def lru(self, exclude=()) -> tuple[int, int] | None:
        return next((k for k in self._res if k not in exclude), None)

    def peek(self, key: tuple[int, int]):
        """A key's weights at whatever precision is held (None when none), touching neither the LRU
        order nor the counters: for warm-up runs that must not look like serving."""
        w = self._res.get(key)
        if isinstance(w, Future):
            self._res[key] = w = self._wait(w, count=False)
        return w or self._shadow.get(key)

    def host(self, layer: int, expert: int) -> Weights:
        """A non-resident expert's weights where the slow tier holds them (host RAM: no copy; disk: read
        now), to be run there: nothing is admitted, so the budget is untouched."""
        self._stats.host_runs += 1
        return self.store.read_host(layer, expert)

    def approx(self, layer: int, expert: int) -> tuple[QTensor | KTensor, ...]:
        """A non-resident expert's shadow, for quant.linear (KeyError when there is none)."""
        self._stats.shadow_uses += 1
        return self._shadow[(layer, expert)]

    def enable_shadow(self, layers: list[int], bits: int, hi_bits: int = 0, group: int = 32,
                      fill: bool = True, copies=None) -> None:
        """Allow `bits`-bit (and `hi_bits`-bit) copies of the experts of `layers`; with `fill`, give every
        one a `bits`-bit copy now (refused, changing nothing, when they exceed the budget), else plans
        decide which hold one. Must come before anything is resident. Reads every expert once; a slow
        tier in host RAM quantises each at every precision now, off the serving path. copies(bits, group):
        copies made ahead of time in that group (copies.CopyFile), or None: the layout decides the group."""
        if self._res or self.shadow_bits:
            raise RuntimeError("enable_shadow must come before any expert is resident, and only once")
        if self.forms:
            raise BudgetError("experts held as the file's own kernel forms take no low-bit copies: choose the "
                              "reroute, load or host miss policy (or --experts-on ram)")
        if hi_bits and hi_bits <= bits:
            raise ValueError(f"hi_bits ({hi_bits}) must exceed the base shadow precision ({bits})")
        w = self.store.read(layers[0], 0)
        kernel = self.kernel and self.device.type == "cpu" and all(kernel_fits(tuple(t.shape), group) for t in w)
        size = kbytes if kernel else qbytes
        groups = {b: copy_group([t.shape[1] for t in w], b, kernel, group) for b in (bits, hi_bits) if b}
        cost = {b: sum(size(tuple(t.shape), b, g) for t in w) for b, g in groups.items()}
        slots = len(layers) * self.num_experts
        if fill and slots * cost[bits] > self.budget_bytes:
            raise BudgetError(f"int{bits} shadow copies of {slots} experts need {slots * cost[bits]} bytes, "
                              f"budget is {self.budget_bytes}")
        files = self.copy_files if copies is None else {
            b: f for b, g in groups.items() if (f := copies(b, g)) is not None}
        self.shadow_bits, self.hi_bits, self._qcost, self._groups, self.kernel = bits, hi_bits, cost, groups, kernel
        self.copy_files = files
        self._slots = [(layer, e) for layer in layers for e in range(self.num_experts)]
        self.shadow_bytes, self._shadow_slots = cost[bits], slots
        warm = getattr(self.store, "tier", "") == "ram"  # make every copy now: later moves only copy
        self._memo = {} if warm else None
        for layer in layers:
            for e in range(self.num_experts):
                self._check(layer, e)
                if fill:
                    self._set_shadow((layer, e), self._copy((layer, e), bits))
                if warm:
                    for b in cost:
                        self._copy((layer, e), b)

    def fill_shadows(self) -> None:
        """Give every expert that has neither a full copy nor a shadow a base-precision copy. Called after
        the initial plan, so no copy is made only to be dropped when its expert is admitted in full.
        Refused, changing nothing, when the copies do not fit."""
        missing = [k for k in self._slots if k not in self._res and k not in self._shadow]
        need = self.used_bytes + len(missing) * self.shadow_bytes
        if need > self.budget_bytes:
            raise BudgetError(f"int{self.shadow_bits} shadow copies of {len(missing)} experts need "
                              f"{len(missing) * self.shadow_bytes} bytes next to {self.used_bytes} resident; "
                              f"budget is {self.budget_bytes}")
        for k in missing:
            self._set_shadow(k, self._copy(k, self.shadow_bits))

    def _copy(self, key, bits: int, source=None):
        """A `bits`-bit copy of an expert for the fast tier: from `emoe quantize`'s file when there is one,
        else quantised from `source()` (its fast copy) or the slow tier. A slow tier in host RAM keeps every
        copy made (it is not budgeted), so moving an expert between levels again is a copy."""
        memo = self._memo
        q = memo.get((key, bits)) if memo is not None else None
        if q is None:
            if bits in self.copy_files:
                q = self.copy_files[bits].get(key)
            else:
                w = source() if source is not None and memo is None else self.store.read(*key)
                q = tuple(quantize(t, bits, self._groups[bits]) for t in w)
            if self.kernel:  # memoised in the kernel's layout too: a later move is then a plain copy
                q = tuple(t if isinstance(t, KTensor) else to_kernel(t) for t in q)
            if memo is not None:
                memo[(key, bits)] = q
        if self.device.type != "cpu":
            q = tuple(replace(t, data=t.data.to(self.device), scale=t.scale.to(self.device),
                              zero=None if t.zero is None else t.zero.to(self.device)) for t in q)
        return q

    def _set_shadow(self, key, q) -> None:
        """Replace (q) or drop (None) a key's shadow, keeping the byte count and availability mask."""
        old = self._shadow.pop(key, None)
        if old is not None:
            self._shadow_used -= self._qcost[old[0].bits]
        if q is not None:
            self._shadow[key] = q
            self._shadow_used += self._qcost[q[0].bits]
        level = self._levels[key[0]][key[1]] = FULL if key in self._res else q[0].bits if q is not None else 0
        self.version += 1
        if self._stale is not None:  # set_resident writes the masks once, at its end (_write_masks)
            self._stale.add(key[0])
        else:
            self.mask[key], self.avail[key] = level == FULL, level > 0

    def _write_masks(self) -> None:
        """mask and avail of the layers set_resident changed, from their levels: one write per plan, not two
        tensor element writes per move (each about 100 times a list entry's; on a GPU, a kernel launch each)."""
        rows, self._stale = sorted(self._stale or ()), None
        if rows:
            lv = torch.tensor([self._levels[l] for l in rows], device=self.device)
            self.mask[rows], self.avail[rows] = lv == FULL, lv > 0

    def _reshadow(self, key, bits: int) -> None:
        """Change a shadow's level: down from the shadow itself (no read), up from the slow tier."""
        if bits == 0:
            self._set_shadow(key, None)
        elif bits < self.level(key):
            self._set_shadow(key, self._copy(key, bits, lambda: [dequantize(q) for q in self._shadow[key]]))
        else:
            t0 = time.perf_counter()
            self._set_shadow(key, self._copy(key, bits))
            self._stats.bytes_loaded += self._qcost[bits]
            self._stats.load_seconds += time.perf_counter() - t0

    # -- moves -----------------------------------------------------------------------------------
    def _check(self, layer: int, expert: int) -> None:
        if not 0 <= expert < self.num_experts or not 0 <= layer < self.mask.shape[0]:
            raise KeyError(f"no expert {expert} in layer {layer}")

    def bring(self, layer: int, expert: int) -> Weights:
        """An expert's weights copied into the fast tier's device and dtype, admitting nothing (admit's copy;
        alone, it times a load)."""
        if self.forms:
            return self.store.read(layer, expert)
        w = land(*self.store.read_packed(layer, expert), self.device, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return w

    def admit(self, layer: int, expert: int, landing: Future | None = None) -> None:
        """Hold an expert at full precision. landing: its copy under way on a mover's thread (set_resident), the
        first read of its weights waits for it; it is held, counted and budgeted from now, as admitted at once."""
        self._check(layer, expert)
        key = (layer, expert)
        if key in self._res:
            self._res.move_to_end(key)
            return
        need = self.used_bytes + self.expert_bytes - (self._qcost[self.level(key)] if key in self._shadow else 0)
        if need > self.budget_bytes:
            raise BudgetError(f"admitting expert {layer}/{expert} would exceed the budget "
                              f"({need} > {self.budget_bytes} bytes)")
        t0 = time.perf_counter()
        self._res[key] = landing if landing is not None else self.bring(layer, expert)
        self._set_shadow(key, None)
        self.n_resident[layer] += 1
        if self.moved is not None:
            self.moved.add(key)
        self._stats.loads += 1
        self._stats.bytes_loaded += self.expert_bytes
        self._stats.load_seconds += time.perf_counter() - t0

    def evict(self, layer: int, expert: int, to: int | None = None) -> None:
        """Drop a full-precision expert; with shadows it keeps a copy at `to` bits (default the base
        precision; 0 = none), requantised from the fast copy: no slow-tier read, and it frees bytes."""
        w = self._wait(self._res.pop((layer, expert), None))  # (a landing copy is the evicted shadow's source)
        self.pinned.discard((layer, expert))
        if w is not None:
            if self.forms:
                self.store.recycle(w)  # (formstore: its buffer takes a later read)
            self.n_resident[layer] -= 1
            if self.moved is not None:
                self.moved.add((layer, expert))
            bits = self.shadow_bits if to is None else to
            copy = self._copy((layer, expert), bits, lambda: w) if self.shadow_bits and bits else None
            self._set_shadow((layer, expert), copy)
            self._stats.evictions += 1

    def set_resident(self, plan: "dict[int, list[int]] | Plan") -> tuple[int, int]:
        """Make each listed layer hold exactly the given experts at full precision (a Plan: every expert at
        its level); other layers stay as they are. Validates everything first, so a plan that does not
        fit changes nothing. Returns (loaded, evicted) full-precision experts."""
        held = self._levels
        if isinstance(plan, Plan):
            allowed = {0, FULL, *self._qcost}
            for layer, lv in plan.levels.items():
                self._check(layer, 0)
                if len(lv) != self.num_experts or not set(lv) <= allowed:
                    raise ValueError(f"layer {layer}: a plan gives one of {sorted(allowed)} per expert, got {lv}")
            # only what changes: comparing the lists costs far less than a dict of every expert (48 x 128 of them)
            want = {(l, e): v for l, lv in plan.levels.items() for e, (v, h) in enumerate(zip(lv, held[l])) if v != h}
            pinned = {(l, e) for l, lv in plan.levels.items() for e, v in enumerate(lv) if v == FULL}
        else:
            for layer, ids in plan.items():
                for e in ids:
                    self._check(layer, e)
            pinned = {(l, e) for l, ids in plan.items() for e in ids}
            want = {k: FULL for k in pinned if k not in self._res}
            for k in self._res:  # dropped from a listed layer: down to the base shadow
                if k[0] in plan and k not in pinned:
                    want[k] = self.shadow_bits
        now = {k: held[k[0]][k[1]] for k in want}
        cost = self.levels().cost
        delta = sum(cost[v] - cost[now[k]] for k, v in want.items())
        if self.used_bytes + delta > self.budget_bytes:
            raise BudgetError(f"plan needs {self.used_bytes + delta} bytes, budget is {self.budget_bytes}")
        self._stale = set()
        try:
            down = sorted((k for k in want if want[k] < now[k]), key=lambda k: -now[k])
            for k in down:  # shrinking moves first, so no intermediate state exceeds the final one
                if now[k] == FULL:
                    self.evict(*k, to=want[k])
                else:
                    self._reshadow(k, want[k])
            for k in sorted(k for k in want if now[k] < want[k] < FULL):
                self._reshadow(k, want[k])
            add = [k for k in sorted(want) if want[k] == FULL]
            stage = getattr(self.store, "stage_keys", None)
            if stage is not None:  # formstore: the plan's reads go to disk together (after the evictions: the budget)
                stage(add)
            if self.mover is not None and not self.forms:  # one job, in layer order: the first layers land first
                landing = self.mover.bring([self.store.read_packed(*k) for k in add])
            else:
                landing = [None] * len(add)
            for k, f in zip(add, landing):
                self.admit(*k, landing=f)
        finally:  # (a failed copy leaves the masks as the levels say, too)
            self._write_masks()
        listed = set(plan.levels if isinstance(plan, Plan) else plan)
        self.pinned = {k for k in self.pinned if k[0] not in listed} | pinned
        return len(add), sum(now[k] == FULL for k in down)
