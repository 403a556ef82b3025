"""Slow tier: one expert's tensors, read on demand.

`disk` reads the expert's byte range with O_DIRECT into a reused page-aligned buffer, so the page cache
neither hides the real read cost nor keeps bytes that the budget says are gone; where the filesystem
refuses O_DIRECT it falls back to buffered reads followed by posix_fadvise(DONTNEED). `ram` reads every
expert once into host memory (pinned when CUDA is present) — the classic CPU-offload setup.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

import torch

from .checkpoint import PACKED, Checkpoint, ExpertLocs, TensorLoc

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

    def __init__(self, ckpt: Checkpoint):
        """MXFP4 and FP8 experts stay so in RAM (4.25 or 8 bits a weight, dequantised per read): gpt-oss-120b's
        experts take about 61 GB of host memory that way instead of 230 in bf16."""
        self.ckpt, self.stats = ckpt, StoreStats()
        disk = DiskStore(ckpt)
        pin = torch.cuda.is_available()
        self._packed = {key for key, locs in ckpt.experts.items() if locs.layout in PACKED}
        self._experts = {key: tuple(t.pin_memory() if pin else t
                                    for t in (disk.read_raw(*key) if key in self._packed else disk.read(*key)))
                         for key in ckpt.experts}
        disk.close()
        self.direct = False
        self.packed = bool(self._packed)  # reads unpack: a host run pays that each time, a load once

    def read_packed(self, layer: int, expert: int):
        """As DiskStore.read_packed; only MXFP4 and FP8 experts are held packed here."""
        t0 = time.perf_counter()
        key = (layer, expert)
        out = self._experts[key]
        self.stats.reads += 1
        self.stats.bytes_read += sum(t.numel() * t.element_size() for t in out)
        self.stats.seconds += time.perf_counter() - t0
        return out, (self.ckpt.experts[key].untangle if key in self._packed else (lambda ts: ts))

    def read(self, layer: int, expert: int):
        packed, unpack = self.read_packed(layer, expert)
        return unpack(packed)

    def close(self) -> None:
        pass


def open_store(ckpt: Checkpoint, tier: str):
    stores = {"disk": DiskStore, "ram": RamStore}
    if tier not in stores:
        raise ValueError(f"unknown expert tier {tier!r}; choose one of {sorted(stores)}")
    return stores[tier](ckpt)


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
