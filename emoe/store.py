"""Slow tier: one expert's tensors, read on demand.

`disk` reads the expert's byte range with O_DIRECT into a reused page-aligned buffer, so the page cache
neither hides the real read cost nor keeps bytes that the budget says are gone; where the filesystem
refuses O_DIRECT it falls back to buffered reads followed by posix_fadvise(DONTNEED). `ram` reads every
expert once into host memory (pinned when CUDA is present) — the classic CPU-offload setup.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import formcache
from .checkpoint import PACKED, Checkpoint, ExpertLocs, TensorLoc
from .gguf_blocks import dequantize as unpack_gguf
from .quant import KTensor, dequantize

ALIGN = 4096


@dataclass(slots=True)
class StoreStats:
    reads: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def bandwidth(self) -> float:
        return self.bytes_read / self.seconds if self.seconds else 0.0


def _spans(locs: ExpertLocs) -> list[list[TensorLoc]]:
    """Group an expert's tensors into contiguous runs within one file, so most experts take one read."""
    parts = sorted(locs.parts(), key=lambda p: (p.path, p.start))
    runs = [[parts[0]]]
    for p in parts[1:]:
        last = runs[-1][-1]
        if p.path == last.path and p.start == last.start + last.nbytes:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _to_tensor(buf, offset: int, loc: TensorLoc) -> torch.Tensor:
    view = memoryview(buf)[offset: offset + loc.nbytes]
    return torch.frombuffer(view, dtype=loc.torch_dtype).reshape(loc.shape).clone()


class DiskStore:
    tier = "disk"
    forms = False

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.stats = ckpt, StoreStats()
        span = max(sum(p.nbytes for p in locs.parts()) for locs in ckpt.experts.values())
        self._buf = mmap.mmap(-1, (span // ALIGN + 3) * ALIGN)  # anonymous mmap: page aligned
        self._fds: dict[str, tuple[int, bool]] = {}
        self.direct = all(self._fd(p)[1] for p in {loc.locs[0].path for loc in ckpt.experts.values()})

    def _fd(self, path: str) -> tuple[int, bool]:
        if path not in self._fds:
            try:
                self._fds[path] = (os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), hasattr(os, "O_DIRECT"))
            except OSError:
                self._fds[path] = (os.open(path, os.O_RDONLY), False)
        return self._fds[path]

    def _read_run(self, run: list[TensorLoc]) -> list[torch.Tensor]:
        start, end = run[0].start, run[-1].start + run[-1].nbytes
        fd, direct = self._fd(run[0].path)
        lo = start - start % ALIGN if direct else start
        hi = -(-end // ALIGN) * ALIGN if direct else end
        if hi - lo > len(self._buf):  # a forms tier's experts (formstore) can outgrow the checkpoint's spans
            self._buf = mmap.mmap(-1, -(-(hi - lo) // ALIGN) * ALIGN)
        view = memoryview(self._buf)[: hi - lo]
        try:
            got = os.preadv(fd, [view], lo)
        except OSError:  # e.g. EINVAL: this filesystem accepted the flag at open but not the read
            os.close(fd)
            self._fds[run[0].path] = (os.open(run[0].path, os.O_RDONLY), False)
            self.direct = False
            return self._read_run(run)
        if got < end - lo:
            raise OSError(f"short read of {run[0].path} at {lo}: {got} < {end - lo} bytes")
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        return [_to_tensor(self._buf, p.start - lo, p) for p in run]

    def read(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ckpt.experts[(layer, expert)].untangle(self.read_raw(layer, expert))

    def read_host(self, layer: int, expert: int):
        return self.read(layer, expert)

    def read_packed(self, layer: int, expert: int):
        """(tensors as stored, the function that unpacks them): a fast tier on another device can copy the
        packed bytes (MXFP4: 4.25 bits a weight) and unpack them there."""
        return self.read_raw(layer, expert), self.ckpt.experts[(layer, expert)].untangle

    def read_raw(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """The expert's tensors as the checkpoint stores them (before `ExpertLocs.untangle`)."""
        locs = self.ckpt.experts[(layer, expert)]
        t0 = time.perf_counter()
        got = {}
        for run in _spans(locs):
            for loc, t in zip(run, self._read_run(run)):
                got[id(loc)] = t
        self.stats.reads += 1
        self.stats.bytes_read += locs.nbytes
        self.stats.seconds += time.perf_counter() - t0
        return tuple(got[id(p)] for p in locs.parts())

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


class RamStore:
    tier = "ram"

    def __init__(self, ckpt: Checkpoint, host_forms: bool = False, int8: bool = False, form_bits: int = 8):
        """MXFP4 and FP8 experts stay so in RAM (4.25 or 8 bits a weight, dequantised per read): gpt-oss-120b's
        experts take about 61 GB of host memory that way instead of 230 in bf16. host_forms: GGUF matrices
        with a CPU-kernel form (forms.host_form), gpt-oss's MXFP4 and FP8 releases' experts are held in it
        instead, where RAM holds them, so a host run multiplies them as they are; a load dequantises them
        where it lands, as it does packed blocks. int8 (with host_forms): full-precision experts too, as int8
        forms quantised per 32 (forms.host_forms_of). form_bits=4: the low-bit types' forms as int4 (_form_kinds)."""
        self.ckpt, self.stats = ckpt, StoreStats()
        kinds = _form_kinds(ckpt, form_bits) if host_forms else None
        disk = DiskStore(ckpt)
        pin = torch.cuda.is_available()
        self._packed = {key for key, locs in ckpt.experts.items() if locs.layout in PACKED}
        self._experts = {}
        by_layer: dict[int, list] = {}
        for key in ckpt.experts:
            by_layer.setdefault(key[0], []).append(key)
        where = formcache.folder(ckpt, {"int8": int8, "kinds": kinds}) if host_forms else None
        wrote = 0
        for layer, keys in by_layer.items():
            got = formcache.load_layer(where, layer, keys, pin)  # a previous start's forms
            if got is None:
                got, buf = layer_forms(disk, keys, (int8, kinds) if host_forms else None, pin)
                if any(isinstance(t, KTensor) for ts in got for t in ts) and formcache.save_layer(where, layer, keys, got, buf):
                    wrote += buf.nbytes
                del buf
            self._experts.update(zip(keys, got))
        if wrote:
            formcache.note(where, ckpt.dir, wrote)
        _trim_heap()
        disk.close()
        self._formed = {key for key, ts in self._experts.items() if any(isinstance(t, KTensor) for t in ts)}
        # experts wholly in forms, as host runs take them: the same tuple each time (a decode step asks per expert)
        self._as_forms = {key: ts for key, ts in self._experts.items() if all(isinstance(t, KTensor) for t in ts)}
        self._nbytes = {key: sum(t.nbytes for t in ts) for key, ts in self._experts.items()}  # read per host run
        self.forms = bool(self._formed)
        self.direct = False
        self.packed = bool(self._packed)  # reads unpack: a host run pays that each time, a load once

    def read_packed(self, layer: int, expert: int):
        """As DiskStore.read_packed; only MXFP4 and FP8 experts are held packed here."""
        t0 = time.perf_counter()
        key = (layer, expert)
        out = self._experts[key]
        self.stats.reads += 1
        self.stats.bytes_read += self._nbytes[key]
        self.stats.seconds += time.perf_counter() - t0
        locs = self.ckpt.experts[key]
        if key in self._formed:
            return out, functools.partial(_unform, locs)
        return out, (locs.untangle if key in self._packed else (lambda ts: ts))

    def read(self, layer: int, expert: int):
        packed, unpack = self.read_packed(layer, expert)
        return unpack(packed)

    def host_forms(self, layer: int, expert: int) -> tuple | None:
        """The expert's (gate, up, down) kernel forms where it is held wholly in them, else None; reads nothing
        and counts nothing (a caller that runs them counts with `ran_host`)."""
        return self._as_forms.get((layer, expert))

    def ran_host(self, layer: int, n: int, nbytes: int) -> None:
        """Count n host runs of the layer's form-held experts, nbytes in all, as read_host would have."""
        self.stats.reads += n
        self.stats.bytes_read += nbytes

    def read_host(self, layer: int, expert: int):
        """The expert as a host run takes it: matrices held in a kernel form as they are, others unpacked."""
        forms = self._as_forms.get((layer, expert))
        if forms is not None:  # nothing to read or unpack: counted as read_packed counts
            self.stats.reads += 1
            self.stats.bytes_read += self._nbytes[(layer, expert)]
            return forms
        packed, unpack = self.read_packed(layer, expert)
        if (layer, expert) not in self._formed:
            return unpack(packed)
        return _unform(self.ckpt.experts[(layer, expert)], packed, keep_forms=True)

    def close(self) -> None:
        pass


def layer_forms(disk: DiskStore, keys: list, forms: tuple | None, pin: bool = False) -> tuple[list[tuple], torch.Tensor]:
    """A layer's experts read from the checkpoint, with host forms where forms = (int8, kinds) asks for them
    (forms.host_forms_of), in one allocation (_contiguous): what the RAM tier holds and the forms cache saves."""
    from .forms import host_forms_of
    held = []
    for key in keys:
        locs = disk.ckpt.experts[key]
        ts = disk.read_raw(*key) if locs.layout in PACKED else disk.read(*key)
        held.append(host_forms_of(locs, ts, *forms) if forms is not None else ts)
    return _contiguous(held, pin)


def _unform(locs: ExpertLocs, tensors: tuple, keep_forms: bool = False) -> tuple:
    """An expert the RAM tier holds with host forms (gate, up, down), as a load takes it (keep_forms: as a
    host run does): forms dequantised, float32 for a GGUF as its blocks unpack, else bf16 as the releases'
    do; a GGUF's matrices without a form unpacked by type; full-precision matrices as they are."""
    gguf = locs.layout == "gguf"
    return tuple(t if keep_forms and isinstance(t, KTensor) else unpack_gguf(t, q) if gguf
                 else dequantize(t, torch.bfloat16) if isinstance(t, KTensor) else t
                 for t, q in zip(tensors, locs.qtypes if gguf else tensors))


def _contiguous(experts: list[tuple], pin: bool) -> tuple[list[tuple], torch.Tensor]:
    """A layer's expert tensors (kernel forms' too) moved into one allocation (returned too: formcache writes
    it), pinned for CUDA copies. Made
    one expert at a time, they would sit between the holes that reading and repacking left in the heap,
    which then never shrinks (RSS far above the bytes held, with GGUF kernel forms); held together, the heap's high-water
    mark stays one layer's temporaries."""
    parts = [t for ts in experts for t in ts for t in ((t,) if isinstance(t, torch.Tensor) else
                                                     t.planes + t.sz + ((t.high,) if t.high is not None else ()))]
    if not parts:
        return experts, torch.empty(0, dtype=torch.uint8)
    sizes = [-(-t.nbytes // 64) * 64 for t in parts]  # 64-byte aligned, as torch's own allocations
    buf = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
    moved, at = {}, 0
    for t, n in zip(parts, sizes):
        moved[id(t)] = buf[at: at + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
        at += n

    def place(t):
        if isinstance(t, torch.Tensor):
            return moved[id(t)]
        return replace(t, planes=tuple(moved[id(p)] for p in t.planes), sz=tuple(moved[id(z)] for z in t.sz),
                       high=None if t.high is None else moved[id(t.high)])
    return [tuple(place(t) for t in ts) for ts in experts], buf


def _mem_available(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int | None:
    """Bytes that can be allocated without swapping or an OOM kill, or None where unknown: the kernel's
    MemAvailable, and less where this process's memory cgroup (a container's limit) leaves less, counting
    what the group holds other than page cache as taken."""
    try:
        with open(f"{proc}/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    group = _cgroup_room(proc, cgroups)
    return avail if group is None else min(avail, group)


def memory_cgroups(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> list[tuple[Path, bool]]:
    """This process's memory cgroup folders, v1's first, each with whether it is v1 (memory.limit_in_bytes) or v2
    (memory.max); none where /proc does not say."""
    try:
        lines = Path(f"{proc}/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        v1 = "memory" in ctrl.split(",")
        if v1 or (ctrl == "" and line.startswith("0::")):
            found.append((Path(cgroups) / ("memory" if v1 else "") / path.lstrip("/"), v1))
    return sorted(found, key=lambda f: not f[1])


def _cgroup_room(proc: str, cgroups: str) -> int | None:
    """A memory cgroup's limit less its anonymous memory (v1: memory.limit_in_bytes, total_rss; v2: memory.max,
    anon), or None where there is no limit or it cannot be read."""
    for d, v1 in memory_cgroups(proc, cgroups):
        try:
            limit = (d / ("memory.limit_in_bytes" if v1 else "memory.max")).read_text().strip()
            stat = dict(ln.split() for ln in (d / "memory.stat").read_text().splitlines() if ln.count(" ") == 1)
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        return max(0, int(limit) - int(stat.get("total_rss" if v1 else "anon", 0)))
    return None


def _form_kinds(ckpt: Checkpoint, bits: int = 8, fit: bool = True) -> dict:
    """Which packed kinds (forms.form_parts) the RAM tier holds as host forms, and at how many bits (4 or 8, for
    the low-bit types that are quantised again: forms.int4_able; bits=4 asks for int4 there), while the tier
    fits 85% of the RAM available: where it would not, those types' int8 forms become int4 ones first (largest
    growth first: half the bytes), then the types that grow the tier most stay packed and host runs dequantise
    them, slower but in the file's size. fit=False: every kind at `bits`, whatever RAM holds (formstore's disk tier)."""
    from .forms import form_parts, form_ratio, int4_able
    packed: dict = {}
    for locs in ckpt.experts.values():
        for kind, nbytes in form_parts(locs):
            packed[kind] = packed.get(kind, 0) + nbytes
    packed = {k: n for k, n in packed.items() if form_ratio(k) is not None}
    want = {k: 4 if bits == 4 and int4_able(k) else 8 for k in packed}
    base, avail = sum(locs.nbytes for locs in ckpt.experts.values()), _mem_available() if fit else None
    growth = lambda k, b: (form_ratio(k, b) - 1) * packed[k]  # noqa: E731
    fits = lambda: avail is None or base + sum(growth(k, b) for k, b in want.items()) <= 0.85 * avail  # noqa: E731
    halved, dropped = [], []
    for k in sorted((k for k in want if want[k] == 8 and int4_able(k)), key=lambda k: -growth(k, 8)):
        if fits():
            break
        want[k] = 4
        halved.append(k)
    for k in sorted(want, key=lambda k: -form_ratio(k, want[k])):
        if fits():
            break
        del want[k]
        dropped.append(k)
    if halved or dropped:
        print(f"[emoe] int8 kernel forms of every expert would take more than 85% of the {avail / 2**30:.1f} GiB of "
              f"RAM available: " + ", ".join(
                  ([f"{len(halved)} low-bit block types held as int4 forms (lossy: --no-host-kernel keeps all "
                    f"packed, exact but dequantised per run)"] if halved else [])
                  + ([f"{len(dropped)} of {len(packed)} block types stay packed and host runs dequantise them "
                      f"(--no-host-kernel keeps all packed)"] if dropped else [])), file=sys.stderr)
    return want


def check_memory(ckpt: Checkpoint, tier: str, device: torch.device, fast_bytes: int) -> None:
    """Refuse, before the tiers are filled, experts that cannot fit: the RAM tier (as stored) and, on a CPU,
    the fast tier share host memory; on a GPU the fast tier must fit the device's free memory. Filling them
    anyway ends in the kernel's OOM kill (or CUDA's error) minutes into loading, with nothing said."""
    from .cache import BudgetError
    gib = 2 ** 30
    ram = sum(locs.nbytes for locs in ckpt.experts.values()) if tier == "ram" else 0
    host = ram + (fast_bytes if device.type == "cpu" else 0)
    avail = _mem_available()
    if avail is not None and host > avail:
        raise BudgetError(f"the experts need {host / gib:.1f} GiB of host memory ({ram / gib:.1f} GiB in the RAM tier, "
                          f"{(host - ram) / gib:.1f} GiB in a {device.type} fast tier) and {avail / gib:.1f} GiB are "
                          f"available: lower --budget" + (", or keep the experts on disk (--experts-on disk)"
                                                          if ram else ""))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if fast_bytes > free:
            raise BudgetError(f"the fast tier's {fast_bytes / gib:.1f} GiB of experts exceed the {free / gib:.1f} GiB "
                              f"free on {device}: lower --budget")


def _trim_heap() -> None:
    """Give the heap's free pages back (glibc's malloc_trim releases holes too, not only the top): what
    reading and repacking freed would otherwise stay in RSS. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def open_store(ckpt: Checkpoint, tier: str, host_forms: bool = False, int8: bool = False, form_bits: int = 8):
    """host_forms: hold what host runs can multiply directly (RAM only: from disk a host run reads anyway);
    int8: full-precision experts too, quantised; form_bits=4: low-bit GGUF types' forms as int4."""
    stores = {"disk": DiskStore, "ram": RamStore}
    if tier not in stores:
        raise ValueError(f"unknown expert tier {tier!r}; choose one of {sorted(stores)}")
    return RamStore(ckpt, host_forms, int8, form_bits) if tier == "ram" else DiskStore(ckpt)


def raw_direct_bandwidth(path: str, block: int = 4 << 20, limit: int = 1 << 30) -> float:
    """Sequential O_DIRECT read of a file (like `dd iflag=direct`), bytes/s — the yardstick for loads."""
    buf = mmap.mmap(-1, block)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    total, t0 = 0, time.perf_counter()
    try:
        while total < limit:
            n = os.preadv(fd, [buf], total)
            total += n
            if n < block:
                break
    finally:
        os.close(fd)
    return total / max(time.perf_counter() - t0, 1e-9)
