"""Where each routed expert's packed rows lie inside the GGUF an `emoe import-gguf` folder names, for
`Checkpoint` (layout "gguf": the slow tier reads them as stored, gguf_blocks unpacks them where they land)."""
from __future__ import annotations

import json
from pathlib import Path

from .gguf_import import EXPERTS, FORMAT, FUSED, GGUFError, open_gguf


def _meta(directory: Path) -> dict:
    from .checkpoint import CheckpointError
    try:
        return json.loads((directory / "gguf.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory}/gguf.json is malformed ({type(e).__name__}: {e})") from None


def projections_in_file(directory: Path) -> dict[str, tuple[int, ...]]:
    """A lean import's dense projections (import_gguf(lean=True)): name → float shape, read from the GGUF."""
    from .checkpoint import CheckpointError
    try:
        return {name: tuple(int(d) for d in shape) for name, shape in _meta(directory).get("in_file", {}).items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/gguf.json's in_file is malformed ({type(e).__name__}: {e})") from None


def dequantized_in_file(directory: Path, names, shapes: dict, dtype) -> dict:
    """The named projections of a lean import, dequantised from the GGUF's blocks (float32 arithmetic)."""
    from .checkpoint import CheckpointError
    model = open_gguf(Path(_meta(directory)["files"][0]["path"]))
    out = dict(model.dequantized_blocks(set(names), dtype))
    for name in names:
        if name not in out or tuple(out[name].shape) != shapes[name]:
            raise CheckpointError(f"{directory}: {name} is not in {model.files[0].name} as gguf.json says "
                                  f"({tuple(out[name].shape) if name in out else 'missing'}, not {shapes[name]}): "
                                  f"import it again")
    return out


def index_experts(directory: Path, config) -> dict:
    """Where each routed expert's packed rows lie in the GGUF named by DIR/gguf.json: {(layer, e): ExpertLocs}.
    A GGUF that changed size since the import, or of another shape than config.json, is refused."""
    from .checkpoint import CheckpointError, ExpertLocs, TensorLoc
    try:
        meta = json.loads((directory / "gguf.json").read_text())
        files = [(Path(f["path"]), int(f["bytes"])) for f in meta["files"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/gguf.json is malformed ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/gguf.json has format {meta.get('format')!r}, this emoe reads {FORMAT}: "
                              f"run `emoe import-gguf` again")
    for f, size in files:
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{f} is missing or changed since `emoe import-gguf` wrote {directory}: "
                                  f"import it again")
    try:
        model = open_gguf(files[0][0])
    except GGUFError as e:
        raise CheckpointError(str(e)) from None
    if model.config()["model_type"] != config.family:
        raise CheckpointError(f"{files[0][0].name} is a {model.arch} model but {directory}/config.json says "
                              f"{config.family}")
    h, i, n = config.hidden_size, config.moe_intermediate_size, config.num_experts
    out = {}
    for layer in config.moe_layers:
        fused = f"blk.{layer}.{FUSED}.weight" in model.tensors
        if not fused and f"blk.{layer}.ffn_gate_exps.weight" not in model.tensors:  # early Mixtral: one per expert
            for e in range(n):
                locs = []
                for kind, want in zip(("gate", "up", "down"), ((h, i), (h, i), (i, h))):
                    path, t = model.expert_tensor(layer, f"ffn_{kind}.{e}")
                    if tuple(int(d) for d in t.shape) != want:
                        raise CheckpointError(f"{path.name}: blk.{layer}.ffn_{kind}.{e} has ggml shape "
                                              f"{tuple(t.shape)}, config implies {want}")
                    locs.append((TensorLoc(str(path), int(t.data_offset), int(t.n_bytes), "U8",
                                           (want[1], int(t.n_bytes) // want[1])), int(t.tensor_type)))
                out[(layer, e)] = ExpertLocs(tuple(l for l, _ in locs), "gguf", qtypes=tuple(q for _, q in locs))
            continue
        parts = []
        for kind, want in ([(FUSED, (h, 2 * i)), (EXPERTS[2], (i, h))] if fused else zip(EXPERTS, ((h, i), (h, i), (i, h)))):
            path, t = model.expert_tensor(layer, kind)
            ne = tuple(int(d) for d in t.shape)  # ggml order: columns, rows, experts
            if ne != (*want, n):
                raise CheckpointError(f"{path.name}: blk.{layer}.{kind} has ggml shape {ne}, config implies "
                                      f"{(*want, n)}")
            per = int(t.n_bytes) // n  # one expert's block; (start, stride, bytes, rows) of each part in it
            if kind == FUSED:  # gate's rows, then up's: the two halves of each expert's block
                parts += [(str(path), int(t.data_offset) + half * per // 2, per, per // 2, i, int(t.tensor_type))
                          for half in (0, 1)]
            else:
                parts.append((str(path), int(t.data_offset), per, per, want[1], int(t.tensor_type)))
        for e in range(n):
            out[(layer, e)] = ExpertLocs(tuple(TensorLoc(p, start + e * stride, size, "U8", (rows, size // rows))
                                               for p, start, stride, size, rows, _ in parts),
                                         "gguf", qtypes=tuple(q for *_, q in parts))
    return out
