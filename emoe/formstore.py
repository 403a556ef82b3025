"""Slow tier for a CPU with less RAM than the model: the experts' kernel forms on disk, read one expert at a time.

On a CPU both tiers are host memory, and a GGUF's experts are multiplied in their kernel forms (forms.py), about
the file's size. The fast tier (cache.ExpertCache) then holds those forms, under the byte budget, for the experts
the residency policy picks; this tier reads any other expert's forms from the forms cache's layer files
(formcache), built from the file at the first start: one O_DIRECT read per expert, in the layout the C
routines multiply, so a miss neither repacks nor passes through the page cache. llama.cpp maps the file
instead, and when the file outgrows RAM the kernel's page cache decides what stays: docs/results/
larger_than_ram.txt measures both under the same memory limit.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from . import formcache
from .checkpoint import PACKED, Checkpoint, TensorLoc
from .quant import KTensor
from .store import ALIGN, DiskStore, StoreStats, _form_kinds, _trim_heap, layer_forms

READERS = 4  # concurrent reads of a layer's misses
SPARE_BYTES = 32 << 20  # read buffers kept for reuse once nothing views them (beyond the fast tier's budget)


class FormsUnavailable(RuntimeError):
    """This checkpoint's experts cannot be held as forms on disk (the caller keeps the dequantising disk tier)."""


def usable(ckpt: Checkpoint, int8: bool = False) -> bool:
    """Whether the experts are stored packed (a GGUF's blocks, MXFP4, FP8): what has forms of the file's size;
    with int8, full-precision experts too, as int8 forms (forms.host_forms_of: 10 bits a weight, not their own)."""
    return int8 or all(locs.layout in PACKED for locs in ckpt.experts.values())


def open_for(ckpt: Checkpoint, device: torch.device, cfg, policy) -> "FormDiskStore | None":
    """An engine's store (cfg: its EngineConfig) where a CPU holds packed experts on disk (any, with host_int8), so
    the fast tier holds experts at about the file's size rather than dequantised (float32: 7x a Q4_K expert);
    None elsewhere: a GPU, experts in RAM, full-precision checkpoints without host_int8, low-bit copies (which
    packed forms do not take), and every expert resident (budget 1, `all`: the dequantised reference)."""
    if device.type != "cpu" or cfg.experts_on != "disk" or not cfg.host_kernel or cfg.budget == 1.0 \
            or policy.name == "all" or getattr(policy, "shadow_bits", 0) or not usable(ckpt, cfg.host_int8):
        return None
    try:
        return FormDiskStore(ckpt, cfg.host_int8, cfg.host_form_bits)
    except FormsUnavailable as e:
        print(f"[emoe] experts held dequantised in the fast tier: {e}", file=sys.stderr)
        return None


class FormDiskStore:
    tier = "disk"
    forms = True
    form_tier = True  # reads give the forms the fast tier holds as they are (cache.ExpertCache.bring)

    def __init__(self, ckpt: Checkpoint, int8: bool = False, form_bits: int = 8):
        """Each layer's forms are read from the forms cache, built there at the first start one layer at a time
        (never more than a layer's forms in RAM). Where the cache is off (EMOE_FORMS_CACHE=0) or the disk has no
        room for a layer (its forms take about the file's size again), that layer's misses read the checkpoint's
        packed bytes and make their forms then: fewer bytes read, at the cost of repacking on every miss."""
        if not usable(ckpt, int8):
            raise FormsUnavailable("the experts are not stored packed (a GGUF's blocks, MXFP4 or FP8); --host-int8 "
                                   "holds full-precision ones as int8 forms")
        self.kinds = (int8, _form_kinds(ckpt, form_bits, fit=False))
        where = formcache.folder(ckpt, {"int8": int8, "kinds": self.kinds[1]})
        self.ckpt, self.stats, self.direct = ckpt, StoreStats(), True
        self._disk = DiskStore(ckpt)  # reads the checkpoint (to build, or per miss), then the layer files
        by_layer: dict[int, list] = {}
        for key in ckpt.experts:
            by_layer.setdefault(key[0], []).append(key)
        self._spans: dict[tuple[int, int], tuple[TensorLoc, int, list]] = {}
        self._sizes: dict[tuple[int, int], int] = {}  # every expert's forms' bytes
        self._from_file: set[int] = set()  # layers whose forms are made from the checkpoint at each read
        self._staged: dict[tuple[int, int], object] = {}
        self._pool, self._lock = None, threading.Lock()
        self._lent: dict[int, deque] = {}  # size -> the latest read buffers of that size (_buffer)
        self._lent_lock, self.spare_bytes = threading.Lock(), SPARE_BYTES
        self._buffer_at: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # address -> a read's buffer
        wrote = 0
        for layer, keys in by_layer.items():
            index = formcache.index_layer(where, layer, keys)
            if index is None:
                got, buf = layer_forms(self._disk, keys[:1] if where is None else keys, self.kinds)
                if not all(isinstance(t, KTensor) for ts in got for t in ts):
                    raise FormsUnavailable("some expert matrices have no kernel form (float experts: --host-int8)")
                if where is not None and formcache.save_layer(where, layer, keys, got, buf):
                    wrote += buf.nbytes
                    index = formcache.index_layer(where, layer, keys)
                if index is None:  # a layer's experts share their types, so the first one's size is every one's
                    self._from_file.add(layer)
                    self._sizes.update((k, sum(t.nbytes for t in got[0])) for k in keys)
                del got, buf
                _trim_heap()
            if index is not None:
                path, base, experts = index
                for key, descs in zip(keys, experts):
                    lo, hi = formcache.extent(descs)
                    self._spans[key] = (TensorLoc(path, base + lo, hi - lo, "U8", (hi - lo,)), lo, descs)
                    self._sizes[key] = hi - lo
        if wrote:
            formcache.note(where, ckpt.dir, wrote)
        self.expert_nbytes = max(self._sizes.values())  # what the fast tier charges each
        self.total_nbytes = sum(self._sizes.values())
        made = (f"; {len(self._from_file)} of {len(by_layer)} layers' forms made from the file at each read ("
                + ("the forms cache is off" if where is None else f"no room for them in {where}") + ")"
                if self._from_file else "")
        print(f"[emoe] experts on disk as kernel forms ({self.total_nbytes / 2**30:.2f} GiB"
              f"{'' if where is None else f' in {where}'}){made}; the fast tier holds the budget's share of them in RAM",
              file=sys.stderr)

    def read(self, layer: int, expert: int) -> tuple[KTensor, ...]:
        """The expert's forms, in memory of their own (the fast tier keeps them): as staged, or read now."""
        key = (layer, expert)
        got = self._staged.pop(key, None)
        if got is None:
            t0 = time.perf_counter()
            got = self._read_one(key)
            self.stats.seconds += time.perf_counter() - t0
        self.stats.reads += 1
        if layer in self._from_file:
            self.stats.bytes_read += self.ckpt.experts[key].nbytes
            return got
        loc, lo, descs = self._spans[key]
        self.stats.bytes_read += loc.nbytes
        return tuple(formcache.item(got, d, lo) for d in descs)

    def stage(self, layer: int, experts) -> None:
        """Read these experts' forms now, several at once, for the reads that follow (a layer's misses: a disk
        serves concurrent reads faster than one after another). What an earlier call staged and nothing read
        is dropped."""
        self._stage([(layer, e) for e in experts])

    def stage_keys(self, keys) -> None:
        """stage for (layer, expert) keys of any layers: a plan's admissions (cache.set_resident)."""
        self._stage(list(keys))

    def _stage(self, keys: list) -> None:
        self._staged.clear()
        if len(keys) < 2:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="emoe-read")
        t0 = time.perf_counter()
        self._staged = dict(zip(keys, self._pool.map(self._read_one, keys)))
        self.stats.seconds += time.perf_counter() - t0

    def _read_one(self, key):
        """An expert's bytes read straight into page-aligned memory of their own (O_DIRECT needs the alignment;
        the tensor keeps the mapping alive), so concurrent reads share no buffer and nothing is copied; or, for a
        layer without saved forms, its packed bytes read (through the checkpoint reader's one buffer) and repacked."""
        if key[0] in self._from_file:
            from .forms import host_forms_of
            with self._lock:
                packed = self._disk.read_raw(*key)
            return host_forms_of(self.ckpt.experts[key], packed, *self.kinds)
        loc = self._spans[key][0]
        fd, direct = self._disk._fd(loc.path)
        lo = loc.start - loc.start % ALIGN
        hi = -(-(loc.start + loc.nbytes) // ALIGN) * ALIGN
        mem = self._buffer(hi - lo)
        try:
            got = os.preadv(fd, [mem], lo)
        except OSError:  # a filesystem that took O_DIRECT at open but not at read: DiskStore falls back
            with self._lock:  # (into its one buffer)
                return self._disk._read_run([loc])[0]
        if got < loc.start + loc.nbytes - lo:
            raise OSError(f"short read of {loc.path} at {lo}: {got} bytes")
        if not direct:
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        whole = torch.frombuffer(mem, dtype=torch.uint8)
        with self._lent_lock:  # (recycle finds the buffer from an expert's forms' views)
            self._buffer_at[whole.untyped_storage().data_ptr()] = mem
        return whole[loc.start - lo: loc.start - lo + loc.nbytes]

    def _buffer(self, size: int):
        """A page-aligned buffer for a read: one of the latest reads' (or evicted experts') that nothing views any
        more, else a new one. A new mapping costs page faults, and unmapping it later costs again: 0.81-0.87 ms a
        0.32 MiB read here against 0.40-0.50 into a used one, 0.44-0.48 against 0.08-0.10 ms of CPU (scripts/
        ab_read_buffers.py --micro). Kept: the latest spare_bytes' worth of each size (at least one buffer: an expert
        larger than spare_bytes keeps one), which bounds what spares hold beyond the fast tier's budget; spare_bytes
        0: a new mapping every read."""
        with self._lent_lock:
            if not self.spare_bytes:
                self._lent.clear()
                return mmap.mmap(-1, size)
            ring = self._lent.setdefault(size, deque())
            for i in range(len(ring)):
                m = ring[i]
                if sys.getrefcount(m) == 3:  # the ring's, m's and the call's own: no tensor views it
                    del ring[i]
                    ring.append(m)
                    return m
            m = mmap.mmap(-1, size)
            self._keep(ring, m)
            return m

    def _keep(self, ring: deque, m) -> None:
        ring.append(m)
        if len(ring) > max(1, self.spare_bytes // len(m)):
            ring.popleft()  # forgotten: unmapped once nothing views it

    def recycle(self, forms) -> None:
        """An evicted expert's forms (cache.evict): their buffer joins the latest reads', for a read to take once
        they are gone (LRU's next load, a plan's admissions), where it would be unmapped and a new one mapped."""
        t = forms[0] if isinstance(forms[0], torch.Tensor) else getattr(forms[0], "planes", (None,))[0]
        if t is None:
            return
        with self._lent_lock:
            m = self._buffer_at.get(t.untyped_storage().data_ptr())
            if m is None or not self.spare_bytes:
                return
            ring = self._lent.setdefault(len(m), deque())
            if all(x is not m for x in ring):
                self._keep(ring, m)

    def read_packed(self, layer: int, expert: int):
        return self.read(layer, expert), lambda ts: ts

    read_host = read

    def host_forms(self, layer: int, expert: int) -> None:
        """None: every expert here takes a read (dispatch then fetches each through the miss policy)."""
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._disk.close()
