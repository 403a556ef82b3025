"""Low-bit shadow copies of experts: group-wise symmetric int8 / int4 quantisation (pure functions).

The fast tier can hold a small quantised copy of every expert it does not hold at full precision, so a
token routed to a missing expert runs an approximation of *that* expert instead of being rerouted to a
different one (HOBBIT-style mixed precision, arXiv 2411.01433). Scales are per `group` consecutive
input columns (fp16): on the embedded model's experts int4 keeps ~10% relative weight error, int8 ~0.5%.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

BITS = (4, 8)


@dataclass(frozen=True, slots=True)
class QTensor:
    data: torch.Tensor    # int8 values (bits 8) or two int4 values per uint8 (bits 4)
    scale: torch.Tensor   # fp16 [rows, cols // group]
    shape: tuple[int, int]
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def group_size(cols: int, group: int) -> int:
    """The requested group if it divides the row, else one scale per row."""
    return group if cols % group == 0 else cols


def qbytes(shape: tuple[int, int], bits: int, group: int) -> int:
    """Bytes a QTensor of this shape occupies (what the cache budgets before quantising anything)."""
    rows, cols = shape
    return rows * cols * bits // 8 + rows * (cols // group_size(cols, group)) * 2


def quantize(w: torch.Tensor, bits: int = 4, group: int = 32) -> QTensor:
    if bits not in BITS:
        raise ValueError(f"shadow precision must be one of {BITS} bits, got {bits}")
    if w.dim() != 2 or w.shape[1] % 2:
        raise ValueError(f"expects a 2-D matrix with an even number of columns, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g = group_size(cols, group)
    qmax = 2 ** (bits - 1) - 1
    x = w.float().reshape(rows, cols // g, g)
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12).half()
    q = torch.round(x / scale.float()).clamp_(-qmax, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:  # offset to 0..14 and pack two per byte
        u = (q + 8).to(torch.uint8)
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return QTensor(q.contiguous(), scale.reshape(rows, cols // g).contiguous(), (rows, cols), bits, g)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    if q.bits == 4:  # unpack into one preallocated buffer: fewer passes than stack + reshape on CPU
        v = torch.empty(rows, cols // 2, 2, dtype=torch.uint8, device=q.data.device)
        v[..., 0] = q.data & 0x0F
        v[..., 1] = q.data >> 4
        x = v.view(rows, cols // q.group, q.group).to(dtype).sub_(8)
    else:
        x = q.data.view(rows, cols // q.group, q.group).to(dtype)
    return x.mul_(q.scale.to(dtype)[..., None]).view(rows, cols)


# -- copies made ahead of time (`emoe quantize`): safetensors files beside the checkpoint -----------------
def copies_path(model_dir: str | Path, bits: int, group: int = 32) -> Path:
    return Path(model_dir) / "shadows" / f"int{bits}-g{group}.safetensors"


def source_id(model_dir: str | Path, store, first: tuple[int, int]) -> str:
    """The checkpoint's layout fingerprint plus a hash of one expert's weights: copies made from other
    weights with the same layout are caught too."""
    from .profile import fingerprint
    h = hashlib.sha256(fingerprint(model_dir).encode())
    for t in store.read(*first):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_copies(model_dir: str | Path, store, keys: list[tuple[int, int]], bits: int, group: int = 32) -> Path:
    """Quantise every expert once and write the copies (what the cache would otherwise do at startup)."""
    out = {}
    for layer, e in keys:
        for name, t in zip(("gate", "up", "down"), store.read(layer, e)):
            q = quantize(t, bits, group)
            out[f"{layer}.{e}.{name}.data"], out[f"{layer}.{e}.{name}.scale"] = q.data, q.scale
    path = copies_path(model_dir, bits, group)
    path.parent.mkdir(exist_ok=True)
    save_file(out, str(path), metadata={"bits": str(bits), "group": str(group),
                                        "source": source_id(model_dir, store, keys[0])})
    return path


class CopyFile:
    """Lazy reader of one precision's copies; refuses (clear error) copies made from other weights."""

    def __init__(self, path: Path, model_dir: str | Path, store, first: tuple[int, int]):
        self.path, self.model_dir = path, model_dir
        try:
            self._f = safe_open(str(path), framework="pt")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable copies file ({e}); re-run `emoe quantize --model "
                             f"{model_dir}`") from None
        meta = self._f.metadata() or {}
        self.bits, self.group = int(meta.get("bits", 0)), int(meta.get("group", 0))
        if meta.get("source") != source_id(model_dir, store, first):
            raise ValueError(f"{path} holds copies of other weights; re-run `emoe quantize --model {model_dir}`")

    def get(self, key: tuple[int, int]):
        out = []
        for name in ("gate", "up", "down"):
            try:
                data, scale = (self._f.get_tensor(f"{key[0]}.{key[1]}.{name}.{p}") for p in ("data", "scale"))
            except SafetensorError as e:
                raise ValueError(f"{self.path} lacks expert {key} ({e}); re-run `emoe quantize --model "
                                 f"{self.model_dir}`") from None
            cols = data.shape[1] * (2 if self.bits == 4 else 1)
            out.append(QTensor(data, scale, (data.shape[0], cols), self.bits, cols // scale.shape[1]))
        return tuple(out)
