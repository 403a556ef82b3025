"""Activation-aware int4 copies (beyond the paper): `emoe quantize --calibrate N` fits each expert's int4 copy so
that its outputs on the model's own activations stay close, not only its weights.

A plain fit (quant.fit_int4) rounds every weight to its nearest level: the error it leaves is spread evenly over
the input channels, whatever flows through them. GPTQ (Frantar et al., 2022) quantises one input column at a time
and moves what rounding left onto the columns not yet quantised, in proportion to how the calibration activations
correlate with them (their Hessian X^T X), so that X W^T changes least. The copies keep the format, the groups and the
bytes of the plain ones; only their values differ. On the embedded model's experts, with Hessians from 96 training
prompts, the squared error of the experts' outputs on 48 validation prompts' activations fell 34% (per 32: 0.00255
to 0.00168; per 64: 0.00347 to 0.00230), where weighting the plain fit by each channel's activation energy gained
5-6% (scripts/ab_calibrated_copies.py; docs/results/calibrated_copies.txt).

The calibration holds one Hessian per expert per input (hidden x hidden and intermediate x intermediate, float32):
about 0.8 MiB an expert on the embedded model, but 0.83 GiB on Mixtral's (6.6 GiB a layer, 212 GiB in all). Where all
of them do not fit in half the memory available, `Passes` records as many layers at a time as do, one pass over the
prompts for each group (Mixtral on a 64 GiB machine: 8 passes of 4 layers); a model one of whose layers does not fit
is refused rather than swapped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import QTensor, fit_int4, group_size, int4_params, pack_int4

MIN_TOKENS = 64  # an expert routed fewer calibration tokens than this keeps the plain fit (too few to trust)
DAMP = 0.01      # of the Hessian's mean diagonal, added to it: keeps its inverse finite and the updates modest


class Hessians:
    """Per expert, X^T X of its input tokens (gate and up read them) and of its intermediate activations (down
    reads those), accumulated over calibration runs through the engine's expert-function hook (dispatch.ffn)."""

    def __init__(self):
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.mids: dict[tuple[int, int], torch.Tensor] = {}
        self.tokens: dict[tuple[int, int], int] = {}

    def ffn(self, layer: int):
        """Layer `layer`'s expert function for run_experts: SwiGLU, recording what each expert's matrices read."""
        def run(e: int, x: torch.Tensor, w) -> torch.Tensor:
            gate, up, down = w
            xf = x.float()
            mid = F.silu(xf @ gate.float().T) * (xf @ up.float().T)
            key = (layer, e)
            self._add(self.inputs, key, xf)
            self._add(self.mids, key, mid)
            self.tokens[key] = self.tokens.get(key, 0) + len(x)
            return (mid @ down.float().T).to(x.dtype)
        return run

    @staticmethod
    def _add(acc: dict, key, x: torch.Tensor) -> None:
        h = (x.T @ x).cpu()
        acc[key] = h if key not in acc else acc[key].add_(h)

    def of(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inputs', intermediates' Hessian) of an expert with enough calibration tokens, else None."""
        if self.tokens.get(key, 0) < MIN_TOKENS:
            return None
        return self.inputs[key], self.mids[key]


def collect(model_dir: str, examples, max_tokens: int = 32, batch: int = 8, on_batch=None, layers=None,
            check: bool = True, **engine) -> Hessians:
    """Run examples through the model (its own outputs: profile.exact_engine) recording the Hessians of the experts
    of `layers` (None: every MoE layer; the others run as they would unrecorded). SwiGLU families only: others'
    experts (gpt-oss's clamped, biased ones) read other intermediates."""
    from .engine import Engine, EngineConfig, SamplingParams
    from .profile import exact_engine
    cfg = _checked(model_dir)  # (before the model loads)
    layers = set(cfg.moe_layers if layers is None else layers)
    avail = _available_memory()
    if check and avail is not None and layer_bytes(cfg) * len(layers) > avail // 2:
        raise ValueError(f"--calibrate holds each expert's Hessians: {layer_bytes(cfg) * len(layers) / 2**30:.1f} GiB "
                         f"for {len(layers)} MoE layer(s), more than half the {avail / 2**30:.1f} GiB available")
    eng = Engine(EngineConfig(model_dir, max_batch=batch, **(engine or exact_engine())))
    hess, base = Hessians(), eng.dispatch.ffn
    eng.dispatch.ffn = lambda layer: hess.ffn(layer) if layer in layers else base(layer)
    params = SamplingParams(max_tokens=max_tokens)
    examples = [e for e in examples if eng.fits(e.prompt, max_tokens)]
    for i in range(0, len(examples), batch):
        chunk = examples[i: i + batch]
        eng.generate([e.prompt for e in chunk], params, tasks=[e.task for e in chunk])
        if on_batch:
            on_batch(len(chunk))
    return hess


def _checked(model_dir: str):
    from .checkpoint import Checkpoint
    cfg = Checkpoint(model_dir).config
    if cfg.spec.experts == "gpt_oss":
        raise ValueError("--calibrate fits SwiGLU experts; this model's experts (gpt-oss's) are not plain SwiGLU")
    return cfg


def layer_bytes(cfg) -> int:
    """Bytes of one MoE layer's Hessians (float32, inputs' and intermediates' per expert)."""
    return 4 * (cfg.hidden_size ** 2 + cfg.moe_intermediate_size ** 2) * cfg.num_experts


class Passes:
    """Hessians for copies.save_copies, recorded as many MoE layers at a time as fit in half the memory available:
    save_copies asks for its experts in layer order, so each group's pass over the prompts runs once, when its first
    expert is asked for, and the group before it is dropped first. Where everything fits, one pass as `collect`."""

    def __init__(self, model_dir: str, examples, max_tokens: int = 32, on_batch=None, memory: int | None = None):
        cfg = _checked(model_dir)
        room, one = (memory if memory is not None else _available_memory() or 1 << 62) // 2, layer_bytes(cfg)
        if one > room:
            raise ValueError(f"--calibrate holds each expert's Hessians: {one / 2**30:.1f} GiB for one MoE layer, "
                             f"more than half the {2 * room / 2**30:.1f} GiB available")
        moe, k = list(cfg.moe_layers), room // one
        self.groups = [moe[i: i + k] for i in range(0, len(moe), k)]
        self.run = lambda layers: collect(model_dir, examples, max_tokens, on_batch=on_batch, layers=layers,
                                          check=False)  # (sized above)
        self._at, self._held = None, None
        self.fitted = 0  # experts fitted to their outputs so far (the others had too few tokens)

    def of(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        group = next(i for i, g in enumerate(self.groups) if key[0] in g)
        if group != self._at:
            self._at, self._held = group, None  # (freed before the next group's are recorded)
            self._held = self.run(self.groups[group])
        h = self._held.of(key)
        self.fitted += h is not None
        return h


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group: int = 32, block: int = 128) -> QTensor:
    """w [rows, cols] as quant.quantize(w, 4, group) holds it (asymmetric, fp16 scale and offset per group of
    columns), its columns quantised in order with each one's rounding error moved onto the columns after it
    through the inverse Hessian's Cholesky factor. A group's scale and offset are fitted (quant.fit_int4) when
    its first column is reached, on the weights as updated by then. The moves onto columns past the current
    block of columns wait for the block's end and go as one product (GPTQ's lazy batches): the same result, in
    matrix products rather than a rank-one update per column (a 1024 x 4096 matrix: 3 s on this 2-core CPU)."""
    rows, cols = w.shape
    g = group_size(cols, group)
    B = max(g, block // g * g)  # whole groups per block: a group is fitted on columns already updated
    W = w.float().clone()
    H = hessian.to(W.device, torch.float64, copy=True)  # (on w's device: a GPU fits a 14336-column matrix in seconds)
    dead = H.diagonal() == 0  # channels no calibration token used: nothing to compensate through them
    H[dead, dead] = 1.0
    H.diagonal().add_(DAMP * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    u = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    scales, zeros = [], []
    for b0 in range(0, cols, B):
        b1 = min(b0 + B, cols)
        Wb, err = W[:, b0:b1], torch.empty(rows, b1 - b0, device=W.device)
        for j in range(b1 - b0):
            if j % g == 0:
                s, z = (t.reshape(rows) for t in int4_params(*fit_int4(Wb[:, j: j + g].unsqueeze(1))))
                scales.append(s)
                zeros.append(z)
                sf, zf = s.float(), z.float()
            i = b0 + j
            q = ((Wb[:, j] - zf) / sf + 8).round_().clamp_(0, 15)
            u[:, i] = q.to(torch.uint8)
            err[:, j] = (Wb[:, j] - ((q - 8) * sf + zf)) / U[i, i]
            Wb[:, j + 1:] -= err[:, j, None] * U[i, i + 1: b1][None, :]
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return QTensor(pack_int4(u).cpu(), torch.stack(scales, 1).cpu(), (rows, cols), 4, g, torch.stack(zeros, 1).cpu())
