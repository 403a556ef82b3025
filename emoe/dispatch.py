"""Running one MoE layer's routed experts: trace → hit accounting → the miss policy's choice → each
expert's FFN on the tokens routed to it. Shared by serving, warm-up and `bench dispatch`."""
from __future__ import annotations

import ctypes
from collections import Counter

import torch

from .cache import ExpertCache
from . import ckernel
from .ckernel import kq_experts, kq_moe
from .quant import KTensor, QTensor, kq_ffn
from .quant import swiglu as expert_ffn
from .traces import TraceRecorder


class ExpertDispatch:
    """Runs a MoE layer's routed experts: trace → hit accounting → policy.select → per-expert FFN."""

    def __init__(self, cache: ExpertCache, policy, recorder: TraceRecorder | None, ffn=None):
        """ffn(layer) → the family's expert function (e, x, weights) → y, or None for plain SwiGLU."""
        self.cache, self.policy, self.recorder, self.ffn = cache, policy, recorder, ffn or (lambda layer: None)
        self._tables: dict = {}  # (layer, ckernel mode) → the layer's host forms as one C table, or None
        self._live: dict | None = None  # layer → a C table of the experts the fast tier holds now (live_tables)
        self._live_off = False  # a held expert's forms were not the routines': no live tables
        self._observe = getattr(policy, "observe", None)  # a policy that watches the routing (adaptive.Adapt)

    def _seen(self, layer, ids) -> None:
        """A layer call's routing, however it runs: the traces, and a policy that watches it (adaptive.Adapt)."""
        if self.recorder is not None:
            self.recorder.record(layer, ids)
        if self._observe is not None:
            self._observe(layer, ids, self.cache)

    def __call__(self, layer, x, probs, weights, ids):
        self._seen(layer, ids)
        table = self._host_table(layer, x)
        if table is not None:  # every expert runs on its host forms (a CPU's budget 0): one C call, none per expert
            weights, ids = self.policy.select(layer, x, probs, weights, ids, self.cache)
            out = torch.zeros_like(x)
            ran = ckernel.kq_moe_all(out, x.contiguous(), table[0], ids.long().contiguous(), weights.float().contiguous(),
                                     table[2])
            self.cache.count_hosted(layer, ids.numel(), ran, ran * table[1])
            return out
        self.cache.count_routed(self.cache.mask[layer][ids])
        weights, ids = self.policy.select(layer, x, probs, weights, ids, self.cache)
        stage = getattr(self.cache.store, "stage", None)
        if stage is not None:  # formstore: the layer's misses read from disk together, not one by one as fetched
            routed = ids.unique()
            stage(layer, routed[~self.cache.mask[layer][routed]].tolist())
        defers = getattr(self.policy, "defers", None)
        return run_experts(x, weights, ids, lambda e, n: self.policy.fetch(layer, e, self.cache, n),
                           self.cache.num_experts, self.ffn(layer),
                           defers and (lambda e, n: defers(layer, e, self.cache, n)))


    def _host_table(self, layer, x):
        """The layer's kq table and per-expert bytes where this call may skip per-expert fetches: float32 CPU
        rows few enough for the routines, SwiGLU (or gpt-oss) experts that all run on their host forms (the policy's
        hosts_all: none resident) and are all the same size (counted per run), else None."""
        hosts_all = getattr(self.policy, "hosts_all", None)
        if hosts_all is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
            return None
        key = (layer, ckernel.mode())
        if key not in self._tables:
            self._tables[key] = self._build(layer)
        t = self._tables[key]
        return t if t is not None and len(x) < t[0][3] and hosts_all(layer, self.cache, len(x)) else None

    def step_tables(self, layers, x) -> list | None:
        """Each layer's _host_table where a decode step may route and run all of `layers` in one C call
        (decode_block.decode_layers): the policy keeps the router's choice (none rerouted or randomised) and
        every layer's experts run on their host forms; else None."""
        if not getattr(self.policy, "keeps_routing", False):
            return None
        tables = []
        for layer in layers:
            t = self._host_table(layer, x)
            if t is None:
                return None
            tables.append(t)
        return tables

    def live_tables(self, layers, x) -> tuple[list, torch.Tensor] | None:
        """Where the fast tier holds experts as the forms the C routines multiply (formstore: a CPU's model larger
        than RAM) and the policy keeps the router's choice: each layer's table of the experts held now (the others
        NULL) and which are held (cache.mask), for a decode step in one C call that stops at a layer routed to an
        expert not held (decode_block.decode_layers: that layer's MLP then runs here, reading it); else None.
        Kept up to date from cache.moved, so a step pays nothing per expert for the held ones."""
        cache = self.cache
        if self._live_off or not cache.forms or not getattr(self.policy, "keeps_routing", False) or x.device.type != "cpu" \
                or x.dtype != torch.float32 or x.dim() != 2 or not ckernel._mode_on():
            return None
        if self._live is None:
            self._live, cache.moved = {}, set()
        for layer in layers:
            if layer not in self._live:  # (filled by sync_live, as if each held expert had just been admitted)
                cache.moved.update((layer, e) for e in cache.resident(layer))
                ffn = self.ffn(layer)
                act = getattr(ffn, "kq_act", None)
                if ffn is not None and act is None:
                    return None
                n = cache.num_experts
                self._live[layer] = (((ctypes.c_void_p * (3 * n))(), (ctypes.c_int64 * n)(*range(n)), n,
                                      min(ckernel.ROWS.values())), cache.expert_bytes, act and act())
        if not self.sync_live():
            return None
        return [self._live[layer] for layer in layers], cache.mask

    def sync_live(self) -> bool:
        """The live tables made to hold what the fast tier holds now; False (and live tables off) where a held
        expert's forms are not the routines'."""
        cache, live = self.cache, self._live
        for key in cache.moved:
            table = live.get(key[0])
            if table is None:
                continue
            w, at = cache.peek(key), 3 * key[1]
            if w is not None and not (len(w) == 3 and all(isinstance(t, KTensor) and ckernel.kq_able(t) for t in w)):
                self._live, cache.moved, self._live_off = None, None, True
                return False
            table[0][0][at: at + 3] = [t.cdesc[0] for t in w] if w is not None else [None] * 3
        cache.moved.clear()
        return True

    def held_ran(self, layer, ids) -> None:
        """The traces, counters and LRU order of a layer whose experts all ran held, in a step's C call, as
        __call__ and the policy's fetches keep them."""
        self._seen(layer, ids)
        self.cache.count_hits(ids.numel())
        for e in sorted(set(ids.view(-1).tolist())):
            self.cache.get(layer, e)

    def hosted(self, layer, ids, ran: int, table) -> None:
        """The traces and counters of a layer that ran on its table outside __call__, as __call__ keeps them."""
        self._seen(layer, ids)
        self.cache.count_hosted(layer, ids.numel(), ran, ran * table[1])

    def _build(self, layer):
        forms_of, ffn = getattr(self.cache.store, "host_forms", None), self.ffn(layer)
        act = getattr(ffn, "kq_act", None)  # gpt-oss's experts: their biases and clamp, in the routine too
        if forms_of is None or (ffn is not None and act is None):
            return None
        ffns = [forms_of(layer, e) for e in range(self.cache.num_experts)]
        if any(f is None for f in ffns) or len({sum(t.nbytes for t in f) for f in ffns}) != 1:
            return None
        table = ckernel.moe_table(ffns)
        return None if table is None else (table, sum(t.nbytes for t in ffns[0]), act and act())


def run_experts(x, weights, ids, fetch, num_experts: int, ffn=None, defers=None) -> torch.Tensor:
    """Σ over each token's top-k of weight × expert(x), fetch(e, n) giving the tensors of expert e for n
    tokens. One stable sort and one host sync per layer, not a nonzero (a sync) per expert: on a GPU a
    decode step is bound by launches and syncs, not arithmetic. Each expert sees its tokens in ascending
    order, so the sums are those of a per-expert loop, bit for bit. Experts whose weights stay in the slow
    tier (the `host` miss policy) run after the others, on one copy of the layer's tokens there, and their
    sum crosses back once. Where defers(e, n) says some will, that copy is taken at the layer's one sync,
    before any device expert is queued, so the host runs its experts while the device works through its
    own (taken later, it would wait for them). ffn(e, x, w) replaces SwiGLU for families whose experts differ (gpt-oss).
    SwiGLU experts in CPU kernel forms with few rows each (ckernel.ROWS) run in one ckernel.kq_moe call per
    layer, which sorts the routing itself: on a CPU the layer's tokens, and a device layer's host experts. So do
    gpt-oss's on a CPU (ffn.kq_act: their biases and clamp, which the routine applies)."""
    fetched, act = None, getattr(ffn, "kq_act", None)  # act: gpt-oss's experts, which the routine also runs
    if (ffn is None or act is not None) and x.device.type == "cpu":  # experts on forms: the layer in one C call
        counts = Counter(ids.flatten().tolist())
        fetched = {e: fetch(e, counts[e]) for e in sorted(counts)}
        if x.dtype == torch.float32 and x.dim() == 2 and kq_experts(fetched, counts):  # kq_ffn's test, for the layer
            out = torch.zeros_like(x)
            kq_moe(out, x.contiguous(), list(fetched.values()), list(fetched), ids.long().contiguous(),
                   weights.float().contiguous(), act and act())
            return out
    swiglu, ffn = ffn is None, ffn or (lambda e, h, w: expert_ffn(h, *w))
    out = torch.zeros_like(x)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    toks, gates = order // ids.shape[-1], weights.flatten()[order, None]
    start, deferred = 0, []
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the sync: x, toks and gates are ready now
    early = None
    if defers is not None and x.device.type != "cpu" and any(defers(e, n) for e, n in enumerate(counts) if n):
        early = (x.cpu(), toks.cpu(), gates.cpu(), ids.cpu(), weights.cpu())
    # on a CPU, one gather and one scatter for the layer (each costs microseconds however small): index_add_ runs its
    # indices in order there, so the sums are the per-expert loop's bit for bit; a GPU's atomics would not be
    cpu = x.device.type == "cpu"
    xs, pieces, kq = (None, [], []) if cpu else (None, None, None)
    for e, n in enumerate(counts):
        if n:
            w = fetch(e, n) if fetched is None else fetched[e]
            if not _runs_beside(w, x):
                deferred.append((e, start, n, w))
            elif cpu and swiglu and kq_ffn(x, w, n):  # few rows on kernel forms: the layer's such experts in one C call
                kq.append((e, w))
            elif cpu:
                xs = x[toks] if xs is None else xs
                pieces.append((start, ffn(e, xs[start: start + n], w)))
            else:
                tok = toks[start: start + n]
                out.index_add_(0, tok, ffn(e, x[tok], w) * gates[start: start + n])
            start += n
    if pieces:
        if not deferred and not kq:
            ys = torch.cat([y for _, y in pieces]) if len(pieces) > 1 else pieces[0][1]
        else:  # deferred and kq rows stay 0 here: adding 0 leaves a sum's bits as they were
            ys = x.new_zeros(len(toks), x.shape[1])
            for s, y in pieces:
                ys[s: s + len(y)] = y
        out.index_add_(0, toks, ys * gates)
    if kq:  # the C call skips the entries of experts run here otherwise
        kq_moe(out, x.contiguous(), [w for _, w in kq], [e for e, _ in kq], ids.long().contiguous(), weights.float().contiguous())
    if deferred:
        dev = _device(deferred[0][3][0])
        hx, ht, hg, *routing = early if early is not None and dev.type == "cpu" else (x.to(dev), toks.to(dev), gates.to(dev))
        if swiglu and dev.type == "cpu":  # host experts on forms (a GPU's misses): all in one C call, in float32
            hf = hx.float()
            if all(kq_ffn(hf, w, n) for _, _, n, w in deferred):
                hi, hw = routing or (ids.cpu(), weights.cpu())
                host = torch.zeros(hx.shape)
                kq_moe(host, hf.contiguous(), [w for *_, w in deferred], [e for e, *_ in deferred],
                       hi.long().contiguous(), hw.float().contiguous())
                out += host.to(x.device, x.dtype)
                return out
        host = torch.zeros(hx.shape, dtype=x.dtype, device=dev)
        for e, start, n, w in deferred:
            tok = ht[start: start + n]
            w = tuple(t.to(x.dtype) if isinstance(t, torch.Tensor) else t for t in w)  # copies: quant.linear casts
            host.index_add_(0, tok, ffn(e, hx[tok], w) * hg[start: start + n])
        out += host.to(x.device)
    return out


def _device(t) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else (t.data if isinstance(t, QTensor) else t.planes[0]).device


def _runs_beside(w, x) -> bool:
    """Whether an expert's weights run where x is: same device, full tensors in x's dtype (low-bit copies
    take any activation dtype). Else they are slow-tier weights, run there after the device's experts."""
    return all(_device(t) == x.device and not (isinstance(t, torch.Tensor) and t.dtype != x.dtype) for t in w)
