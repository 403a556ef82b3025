"""Copies made ahead of time (`emoe quantize`): every expert's int4/int8 copies in a safetensors file beside the
checkpoint, tied to its weights, so a shadow policy reads them at startup instead of quantising (for a 45 GB Mixtral,
a one-off pass instead of one per start). int4 copies are the plain fit (quant.quantize) or, with a calibration's
Hessians, fitted to the experts' outputs (calibrate.gptq_int4); the file's format is the same either way."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .calibrate import gptq_int4
from .quant import QTensor, quantize


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


def save_copies(model_dir: str | Path, store, keys: list[tuple[int, int]], bits: int, group: int = 32,
                hessians=None, calibrated: str = "") -> Path:
    """Quantise every expert once and write the copies (what the cache would otherwise do at startup). hessians
    (calibrate.Hessians): int4 copies of the experts it has enough tokens for are fitted to their outputs."""
    out = {}
    fit_on = "cuda" if torch.cuda.is_available() else "cpu"  # calibrated fits: matrix products a GPU does far faster
    for layer, e in keys:
        hs = hessians.of((layer, e)) if hessians is not None and bits == 4 else None
        for i, (name, t) in enumerate(zip(("gate", "up", "down"), store.read(layer, e))):
            q = quantize(t, bits, group) if hs is None else gptq_int4(t.to(fit_on), hs[i == 2], group)
            out[f"{layer}.{e}.{name}.data"], out[f"{layer}.{e}.{name}.scale"] = q.data, q.scale
            if q.zero is not None:
                out[f"{layer}.{e}.{name}.zero"] = q.zero
    path = copies_path(model_dir, bits, group)
    path.parent.mkdir(exist_ok=True)
    save_file(out, str(path), metadata={"bits": str(bits), "group": str(group), "calibrated": calibrated,
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
        meta, self._keys = self._f.metadata() or {}, set(self._f.keys())
        self.bits, self.group = int(meta.get("bits", 0)), int(meta.get("group", 0))
        self.calibrated = meta.get("calibrated", "")  # what `quantize --calibrate` ran on ("": the plain fit)
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
            zname = f"{key[0]}.{key[1]}.{name}.zero"  # (files from before int4 had offsets: symmetric)
            zero = self._f.get_tensor(zname) if zname in self._keys else None
            out.append(QTensor(data, scale, (data.shape[0], cols), self.bits, cols // scale.shape[1], zero))
        return tuple(out)
