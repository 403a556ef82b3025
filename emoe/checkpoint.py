"""A Hugging Face checkpoint folder → config, dense weights and an index of expert tensors.

Safetensors headers are parsed here (8-byte little-endian length + JSON) so that the store can read one
expert's bytes with plain `pread`/O_DIRECT at known offsets; dense weights go through `safetensors`
itself. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ConfigError, ModelConfig
from .deltanet import unfuse

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "U8": torch.uint8,  # MXFP4 blocks and scales
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # block-scaled FP8, with weight_scale_inv
FP8 = ("F8_E4M3", "F8_E5M2")
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """The checkpoint folder is missing files or holds something emoe cannot use."""


@dataclass(frozen=True, slots=True)
class TensorLoc:
    path: str
    start: int        # absolute byte offset of the data in the file
    nbytes: int
    dtype: str        # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _entry(path: Path, name: str, meta: dict, data_start: int, size: int) -> TensorLoc:
    """One header entry, checked: a known dtype, offsets inside the file, and a shape that fills them."""
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
    a, b = (int(x) for x in meta["data_offsets"])
    if not 0 <= a <= b <= size - data_start:
        raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated or corrupt)")
    shape = tuple(int(d) for d in meta["shape"])
    numel = 1
    for d in shape:
        numel *= d
    if min(shape, default=0) < 0 or numel * DTYPES[meta["dtype"]].itemsize != b - a:
        raise CheckpointError(f"{path}: tensor {name} has shape {shape} but {b - a} bytes")
    return TensorLoc(str(path), data_start + a, b - a, meta["dtype"], shape)


def read_header(path: Path) -> dict[str, TensorLoc]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = _entry(path, name, meta, 8 + n, size)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry ({type(e).__name__}: {e})") from None
    return out


FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # MXFP4's E2M1 values


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """MXFP4 (OCP microscaling): blocks [R, G, 16] uint8 hold 32 E2M1 values per group (low nibble first),
    scales [R, G] a power-of-two exponent per group (biased by 127) → [R, G·32]. One lookup per byte
    (both nibbles at once) and one multiply per value, in `dtype`: E2M1 values times a power of two are
    exact in bf16."""
    lut = torch.tensor(FP4, dtype=dtype, device=blocks.device)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # byte → (low, high) nibble values
    vals = pairs.index_select(0, blocks.flatten().int()).view(*blocks.shape[:-1], 32)
    # 2^(s-127) built from its float32 bits, exact on every device (exp2 need not be exact on a GPU);
    # s = 0 is the subnormal 2^-127, as transformers' ldexp gives
    s = scales.to(torch.int32)
    scale = torch.where(s > 0, s << 23, torch.full_like(s, 1 << 22)).view(torch.float32)
    return (vals * scale.to(dtype)[..., None]).flatten(-2)


def fp8_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype=torch.bfloat16) -> torch.Tensor:
    """Block-scaled FP8 (the DeepSeek-V3, Qwen3 and GLM-4.5 FP8 releases): w [O, I] times its block's
    scale_inv [ceil(O/bo), ceil(I/bi)], in fp32, then `dtype`: transformers' dequantisation, value for value."""
    (bo, bi), (o, i) = block, w.shape
    s = scale_inv.float().repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]
    return (w.float() * s).to(dtype)


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing FP8 checkpoints (tests, benchmarks): each block scaled so that its largest
    value is E4M3's 448 → (weight in float8_e4m3fn, scale_inv in float32)."""
    (bo, bi), (o, i) = block, w.shape
    g = torch.nn.functional.pad(w.float(), (0, -i % bi, 0, -o % bo)).unflatten(1, (-1, bi)).unflatten(0, (-1, bo))
    scale = (g.abs().amax((1, 3)) / 448.0).clamp_min(1e-12)  # [O/bo, I/bi]
    q = (g / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:o, :i].to(torch.float8_e4m3fn)
    return q, scale


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing MXFP4 checkpoints (benchmarks, tests): [..., R, C] → blocks [..., R, C/32, 16]
    and scales [..., R, C/32]; each group of 32 gets the smallest power of two that brings its largest
    value within E2M1's ±6, and each value the nearest E2M1 value."""
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    mag = (g.abs() / torch.exp2(exp)[..., None]).clamp(max=6.0)
    idx = ((mag[..., None] - torch.tensor(FP4[:8])).abs().argmin(-1) + 8 * (g < 0)).to(torch.uint8)
    return (idx[..., 0::2] | (idx[..., 1::2] << 4)).contiguous(), (exp + 127).to(torch.uint8)


@dataclass(frozen=True, slots=True)
class ExpertLocs:
    """Where one expert's bytes are, and how they are laid out; `untangle` turns what is read into the
    (gate [I, H], up [I, H], down [H, I]) that the rest of emoe runs.
      split:   gate, up, down as they are (per-expert tensors or transformers-5 fused slices)
      gpt_oss: gate_up [H, 2I] with gate and up columns interleaved, down [I, H]
      llama4:  gate_up [H, 2I], gate's columns then up's, down [I, H]
      mxfp4:   gpt-oss's original release: blocks and scales of gate_up [2I, H] (rows interleaved) and
               of down [H, I], dequantised to bf16 as they are read
      fp8:     gate, its scale_inv, up, its scale_inv, down, its scale_inv: block-scaled FP8, dequantised
               to bf16 as they are read
      gguf:    gate, up, down rows as a llama.cpp GGUF packs them (qtypes: their ggml types), dequantised
               as they are read (gguf_blocks; to float32)"""
    locs: tuple[TensorLoc, ...]
    layout: str = "split"
    block: tuple[int, int] | None = None  # fp8: the scale block [rows, columns]
    qtypes: tuple[int, ...] = ()  # gguf: each part's ggml type

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.locs)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.layout in PACKED else self.locs[0].torch_dtype

    def parts(self) -> tuple[TensorLoc, ...]:
        return self.locs

    def untangle(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.layout == "gpt_oss":
            gate_up, down = tensors
            return gate_up[:, 0::2].T.contiguous(), gate_up[:, 1::2].T.contiguous(), down.T.contiguous()
        if self.layout == "llama4":
            gate_up, down = tensors
            gate, up = gate_up.chunk(2, -1)
            return gate.T.contiguous(), up.T.contiguous(), down.T.contiguous()
        if self.layout == "mxfp4":
            gate_up, down = mxfp4_dequantize(*tensors[:2]), mxfp4_dequantize(*tensors[2:])
            return gate_up[0::2].contiguous(), gate_up[1::2].contiguous(), down
        if self.layout == "fp8":
            return tuple(fp8_dequantize(w, s, self.block) for w, s in zip(tensors[0::2], tensors[1::2]))
        if self.layout == "gguf":
            from .gguf_blocks import dequantize
            return tuple(dequantize(t, q) for t, q in zip(tensors, self.qtypes))
        return tensors


PACKED = ("mxfp4", "fp8", "gguf")  # layouts the RAM tier keeps as stored and `untangle` unpacks where they land
# where multimodal releases keep the language model's tensors (Qwen3.5; Llama 4, whose lm_head is inside too)
LM_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
UNUSED = ("model.visual.", "mtp.", "vision_model.", "multi_modal_projector.")  # vision towers, an MTP head


class Checkpoint:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"model folder {self.dir} does not exist")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.dir} has no config.json")
        try:
            self.raw_config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
        try:
            self.config = ModelConfig.from_hf(self.raw_config)
        except ConfigError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        self.fp8_block = self._fp8_block(self.raw_config.get("quantization_config"), cfg_path)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            bins = [p.name for p in self.dir.glob("*.bin")] + [p.name for p in self.dir.glob("*.pt")]
            hint = f" (found {bins}: pickle weights are refused, convert them to safetensors)" if bins else ""
            raise CheckpointError(f"{self.dir} has no *.safetensors weights{hint}")
        self.tensors: dict[str, TensorLoc] = {}
        for f in files:
            self.tensors.update(read_header(f))
        self.file_names: dict[str, str] = {}  # emoe's name → the file's, where a multimodal release nests the LM
        dense = {f"model.layers.{i}.feed_forward.": f"model.layers.{i}.mlp." for i in range(self.config.num_layers)
                 if i not in self.config.moe_layers} if self.config.family == "llama4" else {}
        for name in list(self.tensors):
            if name.startswith(UNUSED) or ".self_attn.indexer." in name:
                del self.tensors[name]  # (and an indexer within its top-k: config caps the context there)
                continue
            short = next((to + name[len(pre):] for pre, to in LM_PREFIXES.items() if name.startswith(pre)), name)
            layer = re.match(r"model\.layers\.\d+\.feed_forward\.", short)
            if layer and layer.group(0) in dense:  # Llama 4's dense layers: the MLP every other family names mlp
                short = dense[layer.group(0)] + short[layer.end():]
            if short != name:
                self.tensors[short], self.file_names[short] = self.tensors.pop(name), name
        self.in_file: dict[str, tuple[int, ...]] = {}  # a lean GGUF import's projections, left in the file
        if (self.dir / "gguf.json").is_file():  # an `emoe import-gguf` folder: experts stay in the GGUF
            from .gguf_index import index_experts, projections_in_file
            self.experts = index_experts(self.dir, self.config)
            self.in_file = projections_in_file(self.dir)
        else:
            self.experts = self._index_experts()

    @staticmethod
    def _fp8_block(qc, cfg_path: Path) -> tuple[int, int] | None:
        """The FP8 scale block from quantization_config; other quantisation methods are refused by name."""
        if not qc:
            return None
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method == "mxfp4":
            return None
        if method != "fp8":
            raise CheckpointError(f"{cfg_path}: quantization {method!r} is not supported (emoe reads float weights, "
                                  f"block-scaled FP8 and gpt-oss's MXFP4)")
        block = qc.get("weight_block_size") or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{cfg_path}: FP8 weight_block_size must be two positive integers, got {block!r}")
        return tuple(block)

    def _index_experts(self) -> dict[tuple[int, int], ExpertLocs]:
        cfg = self.config
        gk, uk, dk = cfg.spec.expert_keys
        out = {}
        fk, fdk = cfg.spec.fused_keys
        for layer in cfg.moe_layers:
            moe = f"model.layers.{layer}.{cfg.spec.moe_prefix}"
            pre = f"{moe}.experts"
            fused = self.tensors.get(f"{moe}.{fk}")
            mx = cfg.spec.experts == "gpt_oss" and f"{pre}.gate_up_proj_blocks" in self.tensors
            for e in range(cfg.num_experts):
                if mx:
                    locs = ExpertLocs(tuple(self._slice(self._need(f"{pre}.{n}"), e) for n in (
                        "gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")), "mxfp4")
                elif cfg.spec.experts in ("gpt_oss", "llama4"):
                    locs = ExpertLocs((self._slice(self._need(f"{pre}.gate_up_proj"), e),
                                       self._slice(self._need(f"{pre}.down_proj"), e)), cfg.spec.experts)
                elif fused is not None:  # transformers-5 layout: [E, 2I, H] and [E, H, I]
                    locs = self._fused_expert(fused, self._need(f"{moe}.{fdk}"), e)
                else:
                    locs = ExpertLocs(tuple(self._need(f"{pre}.{e}.{k}.weight") for k in (gk, uk, dk)))
                    if locs.locs[0].dtype in FP8:
                        locs = ExpertLocs(tuple(p for k in (gk, uk, dk) for p in (
                            self._need(f"{pre}.{e}.{k}.weight"), self._scale(f"{pre}.{e}.{k}.weight"))),
                            "fp8", self.fp8_block)
                if locs.layout != "fp8" and any(p.dtype in FP8 for p in locs.parts()):
                    raise CheckpointError(f"expert {layer}/{e}: FP8 weights are read per expert with their "
                                          f"weight_scale_inv, not in this layout")
                if locs.layout != "mxfp4" and not all(p.torch_dtype.is_floating_point for p in locs.parts()):
                    raise CheckpointError(f"expert {layer}/{e} is stored as {locs.parts()[0].dtype}: a quantised "
                                          f"format emoe does not read (it reads float weights and gpt-oss's MXFP4)")
                for part, shape in zip(locs.parts(), self._expert_shapes(locs.layout)):
                    if part.shape != shape:
                        raise CheckpointError(f"expert {layer}/{e} tensor has shape {part.shape}, "
                                              f"config implies {shape}")
                out[(layer, e)] = locs
        return out

    @staticmethod
    def _slice(stacked: TensorLoc, e: int) -> TensorLoc:
        """Expert e's contiguous [...] block of a tensor stacked over experts [E, ...]."""
        n = stacked.nbytes // stacked.shape[0]
        return TensorLoc(stacked.path, stacked.start + e * n, n, stacked.dtype, stacked.shape[1:])

    def _fused_expert(self, gate_up: TensorLoc, down: TensorLoc, e: int) -> ExpertLocs:
        """Expert e's slices of the stacked tensors: each is a contiguous byte range."""
        i, h = self.config.moe_intermediate_size, self.config.hidden_size
        elt = gate_up.nbytes // max(1, gate_up.shape[0] * gate_up.shape[1] * gate_up.shape[2])
        g0 = gate_up.start + e * 2 * i * h * elt
        return ExpertLocs((TensorLoc(gate_up.path, g0, i * h * elt, gate_up.dtype, (i, h)),
                           TensorLoc(gate_up.path, g0 + i * h * elt, i * h * elt, gate_up.dtype, (i, h)),
                           TensorLoc(down.path, down.start + e * h * i * elt, h * i * elt, down.dtype, (h, i))))

    def _scale(self, weight: str) -> TensorLoc:
        """An FP8 weight's block scales; needs the checkpoint's FP8 quantization_config."""
        if self.fp8_block is None:
            raise CheckpointError(f"{self.dir}: {weight} is FP8 but config.json has no fp8 quantization_config")
        return self._need(weight + "_scale_inv")

    def _expert_shapes(self, layout: str):
        i, h = self.config.moe_intermediate_size, self.config.hidden_size
        if layout == "fp8":
            bo, bi = self.fp8_block
            grid = lambda o, n: (-(-o // bo), -(-n // bi))  # noqa: E731
            return ((i, h), grid(i, h), (i, h), grid(i, h), (h, i), grid(h, i))
        return {"gpt_oss": ((h, 2 * i), (i, h)), "llama4": ((h, 2 * i), (i, h)),
                "mxfp4": ((2 * i, h // 32, 16), (2 * i, h // 32), (h, i // 32, 16), (h, i // 32))}.get(
                    layout, ((i, h), (i, h), (h, i)))

    def _need(self, name: str) -> TensorLoc:
        loc = self.tensors.get(name)
        if loc is None:
            raise CheckpointError(f"{self.dir}: weight {name} is missing from the safetensors files")
        return loc

    @property
    def expert_nbytes(self) -> int:
        return next(iter(self.experts.values())).nbytes

    def is_expert(self, name: str) -> bool:
        return re.search(r"\.experts\.(\d+\.|gate_up_proj$|down_proj$|\w+_(blocks|scales)$)"
                         r"|\.block_sparse_moe\.(input|output)_linear\.weight$", name) is not None

    def is_extra_layer(self, name: str) -> bool:
        """Layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction module): never run here."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return m is not None and int(m.group(1)) >= self.config.num_layers

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → stored shape of every tensor dense_state reads."""
        return {**{n: loc.shape for n, loc in self.tensors.items() if not self.is_expert(n) and not self.is_extra_layer(n)},
                **self.in_file}

    def dense_state(self, dtype: torch.dtype | None = None, skip=frozenset()) -> dict[str, torch.Tensor]:
        """Every non-expert tensor (embeddings, attention, norms, routers, shared experts) but those in `skip`
        (held otherwise: a GGUF's dense projections as forms of its blocks, forms.file_dense)."""
        by_file: dict[str, list[str]] = {}
        for name in self.dense_shapes():
            if name not in skip and name not in self.in_file:
                by_file.setdefault(self.tensors[name].path, []).append(name)
        out, fp8 = {}, {}
        if want := self.in_file.keys() - set(skip):
            from .gguf_index import dequantized_in_file
            out.update(dequantized_in_file(self.dir, want, self.in_file, dtype or torch.float32))
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    t = f.get_tensor(self.file_names.get(name, name))
                    if not t.is_floating_point():
                        raise CheckpointError(f"{self.dir}: {name} is stored as {t.dtype}: a quantised format "
                                              f"emoe does not read")
                    if self.tensors[name].dtype in FP8 or name.endswith("_scale_inv"):
                        fp8[name] = t  # dequantised below, once its scales are in
                    else:
                        out[name] = t.to(dtype) if dtype is not None else t.clone()
        for name in [n for n in fp8 if not n.endswith("_scale_inv")]:
            self._scale(name)
            w = fp8_dequantize(fp8[name], fp8[name + "_scale_inv"], self.fp8_block)
            out[name] = w.to(dtype) if dtype is not None else w
        cfg = self.config
        for layer in cfg.moe_layers:
            self._need(f"model.layers.{layer}.{cfg.spec.moe_prefix}.{cfg.spec.router}.weight")
        self._need("model.embed_tokens.weight")
        if "lm_head.weight" not in out and "lm_head.weight" not in skip:
            if not cfg.tie_word_embeddings:
                raise CheckpointError(f"{self.dir}: lm_head.weight is missing and embeddings are not tied")
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        if cfg.delta_net is not None:
            unfuse(out, cfg.delta_net, cfg.linear_layers)
        return out

    @property
    def tokenizer_path(self) -> Path:
        p = self.dir / "tokenizer.json"
        if not p.is_file():
            other = [q.name for q in self.dir.glob("*") if q.name in ("tokenizer.model", "vocab.json")
                     or q.suffix == ".tiktoken"]
            hint = (f" (it has {other}: write tokenizer.json once with transformers, "
                    f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))") if other else ""
            raise CheckpointError(f"{self.dir} has no tokenizer.json{hint}")
        return p
