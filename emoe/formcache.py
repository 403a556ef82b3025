"""The RAM tier's kernel forms kept on disk between starts, one safetensors file per layer.

Building forms from a GGUF's blocks runs at 0.1-0.5 GB/s on a CPU (repacking, and requantising the types
the kernel cannot take as they are), so a 20 GB model spent a minute or more in it at every start; reading
the finished layers back runs at disk or page-cache speed. A layer's file is its one allocation (store's
_contiguous) as a uint8 tensor plus a JSON layout of the views into it; the folder is keyed by the
checkpoint's files (names, sizes, modification times), the options that shape the forms and the source of
the code that builds them, so any change builds afresh. Written only where the disk has room to spare.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .ckernel import lut_able  # whether forms take codebooks and scales per 16 (forms.codebook_form, q3_k_form)
from .quant import KTensor

VERSION = 1
_DTYPES = {str(d): d for d in (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32, torch.int32,
                               torch.int16, torch.int64, torch.float8_e4m3fn)}


def folder(ckpt, options: dict) -> Path | None:
    """Where this checkpoint's forms under these options live; None when EMOE_FORMS_CACHE=0. The key covers the
    folder's files and every file the experts' bytes come from (a GGUF import reads them from the .gguf)."""
    if os.environ.get("EMOE_FORMS_CACHE", "1") == "0":
        return None
    src = Path(__file__).parent
    h = hashlib.sha256(json.dumps([VERSION, torch.__version__, sorted(options.items()), lut_able()], default=str).encode())
    try:
        files = {str(f) for f in ckpt.dir.iterdir() if f.is_file()}
        files |= {loc.path for locs in ckpt.experts.values() for loc in locs.locs}
        for f in sorted(files):
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        for name in ("forms.py", "gguf_blocks.py", "gguf_iq.py", "kernel_layout.py", "quant.py", "store.py"):
            h.update((src / name).read_bytes())
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emoe" / "forms"
    except (OSError, RuntimeError):  # what cannot be identified, or no home for it: not cached
        return None
    return base / h.hexdigest()[:20]


def _nbytes(d) -> int:
    _, dtype, shape = d
    return torch.Size(shape).numel() * torch.empty(0, dtype=_DTYPES[dtype]).element_size()


def _view(buf, d, shift: int = 0):
    off, dtype, shape = d
    return buf[off - shift: off - shift + _nbytes(d)].view(_DTYPES[dtype]).view(shape)


def extent(descs: list[dict]) -> tuple[int, int]:
    """The bytes [start, end) of the layer's buffer that an expert's saved descriptors (for `item`) cover."""
    views = [v for d in descs for v in ([d["t"]] if "t" in d else
                                         [*d["planes"], *d["sz"], *([d["high"]] if d.get("high") else [])])]
    return min(v[0] for v in views), max(v[0] + _nbytes(v) for v in views)


def item(buf, d: dict, shift: int = 0):
    """One saved tensor or kernel form as views into buf, whose byte 0 is the layer's byte `shift`."""
    if "t" in d:
        return _view(buf, d["t"], shift)
    return KTensor(tuple(_view(buf, p, shift) for p in d["planes"]), tuple(_view(buf, z, shift) for z in d["sz"]),
                   tuple(d["shape"]), d["bits"], d["group"],
                   None if d.get("lut") is None else torch.tensor(d["lut"], dtype=_DTYPES[d["lut_dtype"]]),
                   None if d.get("high") is None else _view(buf, d["high"], shift), d.get("hbits", 0), d.get("i8", False))


def load_layer(where: Path | None, layer: int, keys: list, pin: bool) -> list[tuple] | None:
    """The layer's experts (in keys' order) as saved, or None where there is no complete file for them."""
    path = None if where is None else where / f"layer-{layer}.safetensors"
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
            if layout["keys"] != [list(k) for k in keys]:
                return None
            buf = f.get_tensor("buf")
        buf = buf.pin_memory() if pin else buf
        return [tuple(item(buf, d) for d in ex) for ex in layout["experts"]]
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError):
        return None  # a torn or foreign file: built afresh, and written again


def index_layer(where: Path | None, layer: int, keys: list) -> tuple[str, int, list] | None:
    """Where a saved layer's bytes lie, without reading them: (file, offset of the layer's byte 0 in it, each
    expert's saved descriptors, for `item`), or None where there is no complete file for these keys."""
    path = None if where is None else where / f"layer-{layer}.safetensors"
    if path is None or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        layout = json.loads(header["__metadata__"]["layout"])
        a, b = header["buf"]["data_offsets"]
        if layout["keys"] != [list(k) for k in keys] or 8 + n + b != path.stat().st_size:
            return None
        return str(path), 8 + n + a, layout["experts"]
    except (OSError, KeyError, ValueError):
        return None


def save_layer(where: Path | None, layer: int, keys: list, experts: list[tuple], buf: torch.Tensor) -> bool:
    """Write a layer's experts (views into buf) unless the disk lacks twice their size free. True if written."""
    if where is None:
        return False
    try:
        where.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(where).free < 2 * buf.nbytes:
            return False
        base = buf.data_ptr()

        def desc(t):
            return [t.data_ptr() - base, str(t.dtype), list(t.shape)]

        layout = {"keys": [list(k) for k in keys],
                  "experts": [[{"t": desc(t)} if isinstance(t, torch.Tensor) else
                               {"planes": [desc(p) for p in t.planes], "sz": [desc(z) for z in t.sz],
                                "shape": list(t.shape), "bits": t.bits, "group": t.group,
                                "lut": None if t.lut is None else t.lut.tolist(),
                                "lut_dtype": None if t.lut is None else str(t.lut.dtype),
                                "high": None if t.high is None else desc(t.high), "hbits": t.hbits, "i8": t.i8}
                               for t in ex] for ex in experts]}
        tmp = where / f".layer-{layer}.{os.getpid()}.tmp"
        save_file({"buf": buf.cpu()}, str(tmp), metadata={"layout": json.dumps(layout)})
        os.replace(tmp, where / f"layer-{layer}.safetensors")  # whole or absent, for a second process too
        return True
    except OSError:
        return False


def note(where: Path, ckpt_dir: Path, nbytes: int) -> None:
    """After writing: the folder names its checkpoint, older folders of the same checkpoint (other options, an
    older emoe) go, and the command line says where the bytes went."""
    source = str(Path(ckpt_dir).resolve())
    try:
        (where / "source.txt").write_text(source)
        for other in where.parent.iterdir():
            mark = other / "source.txt"
            if other != where and mark.is_file() and mark.read_text() == source:
                shutil.rmtree(other, ignore_errors=True)
    except OSError:
        pass
    print(f"[emoe] kernel forms saved in {where} ({nbytes / 2**30:.2f} GiB): the next start reads them instead of "
          f"building them again (EMOE_FORMS_CACHE=0: neither)", file=sys.stderr)
