"""A llama.cpp GGUF file → a model folder emoe serves, with the experts left where they are.

`emoe import-gguf FILE --out DIR` writes config.json, the tokenizer and chat template, generation_config.json,
the dense tensors (attention, norms, routers, shared experts, embeddings: a few percent of an MoE's bytes)
dequantised into DIR/dense-*.safetensors, and DIR/gguf.json naming the GGUF file(s). The routed experts are
not copied: `Checkpoint` indexes them in the GGUF itself, one contiguous byte range per expert, so the slow
tier reads them packed and they are dequantised (gguf_blocks) only where they land. Architectures: ARCHS.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import torch

from . import gguf_hybrid as hybrid
from .gguf_blocks import FLOAT_TYPES

FORMAT = 1
# llama.cpp's architecture → transformers' model_type ('llama' with experts is Mixtral's)
ARCHS = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "llama": "mixtral", "gpt-oss": "gpt_oss",
         "deepseek2": "deepseek_v3",  # deepseek2: deepseek_v2 where the gating is softmax (config())
         "deepseek32": "deepseek_v32",  # DeepSeek-V3.2: deepseek2's layers and a DSA indexer (unread: hf_config)
         "glm-dsa": "glm_moe_dsa",  # GLM-5: the same
         "llama4": "llama4",
         "glm4moe": "glm4_moe", "dots1": "dots1", "minimax-m2": "minimax_m2", "ernie4_5-moe": "ernie4_5_moe",
         "granitemoe": "granitemoe",  # granitemoeshared where the file has a shared expert (config())
         **hybrid.ARCHS}  # Qwen3-Next, Qwen3.5-MoE: linear attention (gguf_hybrid)
# llama.cpp's tensor names → Hugging Face names (per layer, then global)
LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate",
         "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
         "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "attn_sinks": "self_attn.sinks", "post_attention_norm": "post_attention_layernorm",
         "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
         "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
         "attn_kv_b": "self_attn.kv_b_proj"}
# FLOAT_TYPES (F32, F16, BF16) are kept as stored; quantised dense tensors go to the import's dtype
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
FUSED = "ffn_gate_up_exps"  # newer converters may stack gate and up: [E, 2I, H], gate rows first
OLD_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")  # early Mixtral files: one per expert


class GGUFError(ValueError):
    """The file is not a GGUF emoe can import, or the import folder does not match its file."""


def _reader(path: Path):
    import gguf
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/AssertionError on bad magic or a truncated table
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def shards(path: Path) -> list[Path]:
    """All files of a split GGUF (NAME-00001-of-00003.gguf …) from its first, or [path]."""
    m = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if not m:
        return [path]
    if int(m.group(2)) != 1:
        raise GGUFError(f"{path} is shard {int(m.group(2))} of a split GGUF: give the first, "
                        f"{m.group(1)}-00001-of-{m.group(3)}.gguf")
    files = [path.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(3)}.gguf") for i in range(1, int(m.group(3)) + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GGUFError(f"split GGUF {path.name} is missing {missing}")
    return files


class GGUFModel:
    """The metadata and tensor table of a (possibly split) GGUF file."""

    def __init__(self, path: str | Path):
        self.files = shards(Path(path).resolve())
        self.readers = [_reader(f) for f in self.files]
        self.meta = {k: f.contents() for r in self.readers for k, f in r.fields.items() if not k.startswith("GGUF.")}
        self.tensors = {t.name: (f, t) for f, r in zip(self.files, self.readers) for t in r.tensors}
        self.arch = self.meta.get("general.architecture")
        if self.arch not in ARCHS:
            raise GGUFError(f"{self.files[0].name}: architecture {self.arch!r} is not supported "
                            f"(emoe imports {sorted(ARCHS)} GGUFs)")
        # converters append multi-token-prediction blocks after the model's (GLM-4.5, DeepSeek-V3.2): never run here
        n = self.layers
        self.tensors = {k: v for k, v in self.tensors.items()
                        if not ((m := re.match(r"blk\.(\d+)\.", k)) and int(m.group(1)) >= n)}

    def get(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise GGUFError(f"{self.files[0].name}: metadata {self.arch}.{key} is missing")
        return v

    @property
    def layers(self) -> int:
        """The model's blocks: block_count less the multi-token-prediction ones (nextn_predict_layers)."""
        return int(self.need("block_count")) - int(self.get("nextn_predict_layers") or 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.layers) if any(
            f"blk.{i}.{k}.weight" in self.tensors for k in ("ffn_gate_exps", FUSED, "ffn_gate.0"))]

    def config(self) -> dict:
        """A Hugging Face config.json for the model (gguf_config.config_json)."""
        from .gguf_config import config_json  # (it reads ARCHS from here)
        return config_json(self)

    def tokenizer(self):
        """A `tokenizers.Tokenizer` from the vocabulary the GGUF carries (gguf_vocab)."""
        from .gguf_vocab import build_tokenizer
        return build_tokenizer(self.meta, self.files[0].name)

    def tokenizer_config(self) -> dict:
        m, tokens = self.meta, self.meta["tokenizer.ggml.tokens"]
        name = lambda key: tokens[m[key]] if m.get(key) is not None else None  # noqa: E731
        return {"chat_template": m.get("tokenizer.chat_template"), "eos_token": name("tokenizer.ggml.eos_token_id"),
                "bos_token": name("tokenizer.ggml.bos_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id")}

    def stop_ids(self) -> list[int]:
        keys = ("eos_token_id", "eot_token_id", "eom_token_id")
        return sorted({self.meta[f"tokenizer.ggml.{k}"] for k in keys if self.meta.get(f"tokenizer.ggml.{k}") is not None})

    def check_names(self) -> None:
        """Every tensor is an expert's or has a Hugging Face name (checked before anything is written)."""
        for name in self.tensors:
            if _hf_name(name, self.arch) is None and not re.fullmatch(r"blk\.\d+\.ffn_\w+_exps\.bias", name) \
                    and not re.fullmatch(r"blk\.\d+\.(attn_k_b|attn_v_b)\.weight|blk\.\d+\.indexer\..*", name) \
                    and name.split(".")[2 if name.startswith("blk.") else 0] not in (*EXPERTS, FUSED) \
                    and not OLD_EXPERT.fullmatch(name) and name != "rope_freqs.weight":
                raise GGUFError(f"{self.files[0].name}: tensor {name} has no place in a {self.arch} model")

    def dense(self, dtype: torch.dtype, skip=frozenset()):
        """(Hugging Face name, tensor) for every tensor but the routed experts and those named in `skip`, one at
        a time, dequantised: to `dtype` where the file quantised it, as stored where it is a float tensor."""
        import gguf
        heads = {"attn_q": self.need("attention.head_count"), "attn_k": self.get("attention.head_count_kv")}
        heads["attn_k"] = heads["attn_k"] or heads["attn_q"]
        cfg = self.config() if self.arch in hybrid.ARCHS else None
        biases: dict[tuple[int, str], torch.Tensor] = {}  # gpt-oss's expert biases, joined below
        halves: dict[tuple[int, str], torch.Tensor] = {}  # stored apart, joined below: DeepSeek k_b / v_b, Granite gate / up
        for name, (_, t) in self.tensors.items():
            m = re.fullmatch(r"blk\.(\d+)\.(ffn_\w+_exps\.bias|attn_k_b\.weight|attn_v_b\.weight)", name)
            if m:
                w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float()
                if "exps" not in m.group(2) and t.tensor_type not in FLOAT_TYPES:
                    w = w.to(dtype)
                (biases if "exps" in m.group(2) else halves)[(int(m.group(1)), m.group(2).split(".")[0])] = w
                continue
            hf = _hf_name(name, self.arch)
            if hf is None or hf in skip:  # an expert's (check_names has refused anything else), or left in the file
                continue
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
            if t.tensor_type not in FLOAT_TYPES:
                w = w.to(dtype)
            if hf.endswith("shared_expert_gate.weight"):
                w = w.reshape(1, -1)  # stored as a vector [H]; transformers' Linear(H, 1)
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if self.arch == "llama" and kind in heads and name.endswith(".weight"):
                w = _unpermute(w, heads[kind])
            if cfg is not None:
                yield from hybrid.convert(self, name, hf, w, cfg)
                continue
            if hf.endswith("shared_mlp.gate.weight") or hf.endswith("shared_mlp.up.weight"):
                halves[(int(name.split(".")[1]), kind)] = w  # Granite stacks them: input_linear [gate; up]
                continue
            yield hf.removesuffix(".weight") if hf.endswith("self_attn.sinks.weight") else hf, w.contiguous()
        for layer in sorted({k[0] for k in halves}):
            if (layer, "ffn_gate_shexp") in halves:
                yield f"model.layers.{layer}.shared_mlp.input_linear.weight", \
                    torch.cat((halves[(layer, "ffn_gate_shexp")], halves[(layer, "ffn_up_shexp")])).contiguous()
                continue
            k_b, v_b = halves[(layer, "attn_k_b")], halves[(layer, "attn_v_b")]  # [H, rank, nope], [H, v, rank]
            yield f"model.layers.{layer}.self_attn.kv_b_proj.weight", torch.cat((k_b.transpose(1, 2), v_b), 1).flatten(0, 1)
        for layer in sorted({k[0] for k in biases}):  # transformers' gpt-oss: [E, 2I], gate and up interleaved
            gate_up = biases.get((layer, FUSED))
            gate, up = gate_up.chunk(2, -1) if gate_up is not None else (biases[(layer, "ffn_gate_exps")],
                                                                         biases[(layer, "ffn_up_exps")])
            pre = f"model.layers.{layer}.mlp.experts"
            yield f"{pre}.gate_up_proj_bias", torch.stack((gate, up), -1).flatten(-2).contiguous()
            yield f"{pre}.down_proj_bias", biases[(layer, "ffn_down_exps")].contiguous()

    def dense_blocks(self, names=None):
        """The dense projections (quant.DENSE_PROJECTIONS) the file holds quantised, one at a time, as their
        packed rows: (Hugging Face name, uint8 [rows, bytes], ggml type), what llama.cpp multiplies. Tensors
        the import joins (Granite's shared gate/up) or splits (DeepSeek's kv_b) are left out; a hybrid model's
        (Qwen3-Next, Qwen3.5) come in the import's row order where reordering whole rows gives it
        (gguf_hybrid.block_rows), and are left out where it does not. names: only these (the others' rows are
        not read)."""
        from .quant import DENSE_PROJECTIONS
        cfg = self.config() if self.arch in hybrid.ARCHS else None
        heads = {"attn_q": self.need("attention.head_count"), "attn_k": self.get("attention.head_count_kv")}
        heads["attn_k"] = heads["attn_k"] or heads["attn_q"]
        for name, (_, t) in self.tensors.items():
            hf = _hf_name(name, self.arch)
            if hf is None or not hf.endswith(".weight") or t.tensor_type in FLOAT_TYPES or t.data.ndim != 2 \
                    or hf.removesuffix(".weight").rsplit(".", 1)[-1] not in DENSE_PROJECTIONS \
                    or names is not None and hf not in names:
                continue
            rows = torch.from_numpy(np.array(t.data))
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if self.arch == "llama" and kind in heads:
                rows = _unpermute(rows, heads[kind])  # rows move whole: blocks run along each row
            if cfg is not None and (rows := hybrid.block_rows(self, name, rows, cfg)) is None:
                continue
            yield hf, rows, int(t.tensor_type)

    def head_blocks(self):
        """DeepSeek's k_b and v_b as the file packs them, per head ([H, rank, nope] and [H, v, rank]), as 2-D rows
        (name, uint8 [H rank or H v, bytes], ggml type) under the names decode_block.mla_weights reads: a decode
        step's per-head products (heads_linear) run on them as they are, the weights llama.cpp multiplies."""
        for name, (_, t) in self.tensors.items():
            m = re.fullmatch(r"blk\.(\d+)\.attn_(k|v)_b\.weight", name)
            if m and t.tensor_type not in FLOAT_TYPES and t.data.ndim == 3:
                rows = torch.from_numpy(np.array(t.data))
                yield f"model.layers.{m.group(1)}.self_attn.{m.group(2)}_b_heads", rows.flatten(0, 1), int(t.tensor_type)

    def block_shapes(self) -> dict[str, list[int]]:
        """dense_blocks' names → the float shape [rows, columns] each dequantises to."""
        from gguf import GGML_QUANT_SIZES
        out = {}
        for hf, rows, qtype in self.dense_blocks():
            block, size = GGML_QUANT_SIZES[qtype]
            out[hf] = [rows.shape[0], rows.shape[1] // size * block]
        return out

    def dequantized_blocks(self, names, dtype: torch.dtype):
        """(name, float tensor) for the dense_blocks named, one at a time: a lean import's projections (below)."""
        from .gguf_blocks import dequantize
        for hf, rows, qtype in self.dense_blocks(names):
            yield hf, dequantize(rows, qtype).to(dtype)

    def expert_tensor(self, layer: int, kind: str):
        """(file, gguf-py tensor) of one stacked expert tensor [E, rows, packed row bytes]."""
        name = f"blk.{layer}.{kind}.weight"
        if name not in self.tensors:
            raise GGUFError(f"{self.files[0].name}: tensor {name} is missing")
        return self.tensors[name]


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves each head's two rotary halves for its GPT-J-style rope."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()


# where an architecture names a tensor otherwise than LAYER does
RENAMED = {"llama": {"ffn_gate_inp": "block_sparse_moe.gate"}, "gpt-oss": {"ffn_gate_inp": "mlp.router"},
           "deepseek2": {"ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                         "ffn_down_shexp": "mlp.shared_experts.down_proj", "exp_probs_b": "mlp.gate.e_score_correction"},
           **{arch: hybrid.NAMES for arch in hybrid.ARCHS}}
RENAMED["glm4moe"] = RENAMED["dots1"] = RENAMED["deepseek32"] = RENAMED["glm-dsa"] = RENAMED["deepseek2"]
RENAMED["ernie4_5-moe"] = {**RENAMED["deepseek2"], "exp_probs_b": "mlp.moe_statics.e_score_correction"}
RENAMED["granitemoe"] = {"ffn_gate_inp": "block_sparse_moe.router.layer", "ffn_gate_shexp": "shared_mlp.gate",
                         "ffn_up_shexp": "shared_mlp.up", "ffn_down_shexp": "shared_mlp.output_linear"}
RENAMED["llama4"] = {"ffn_gate_inp": "feed_forward.router", "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
                     "ffn_up_shexp": "feed_forward.shared_expert.up_proj",
                     "ffn_down_shexp": "feed_forward.shared_expert.down_proj"}
RENAMED["minimax-m2"] = {"ffn_gate_inp": "block_sparse_moe.gate", "exp_probs_b": "block_sparse_moe.e_score_correction"}


def _hf_name(name: str, arch: str = "") -> str | None:
    if name in GLOBAL:
        return GLOBAL[name]
    if arch in hybrid.ARCHS and hybrid.hf_name(name):
        return hybrid.hf_name(name)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    names = {**LAYER, **RENAMED.get(arch, {})}
    if m and m.group(2) in names:
        hf = f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
        return hf.replace("e_score_correction.bias", "e_score_correction_bias")  # transformers' spelling
    return None


@functools.lru_cache(maxsize=2)
def _opened(path: str, stamp: tuple) -> GGUFModel:
    return GGUFModel(path)


def open_gguf(path: str | Path) -> GGUFModel:
    """GGUFModel(path), parsed once per process while the file is unchanged: an engine's start reads the table
    in two or three places (the experts' index, the dense forms, a lean import's projections), and each parse
    took 0.4 s of a 3.7 s start on the DeepSeek-shaped file (gguf-py reading the tokenizer's metadata)."""
    p = Path(path).resolve()
    st = p.stat()
    return _opened(str(p), (st.st_size, st.st_mtime_ns))


def import_gguf(path: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                shard_bytes: int = 2 << 30, lean: bool = False) -> Path:
    """Write the model folder for a GGUF file (see the module docstring); returns it. The dense tensors go
    out in shards of about shard_bytes, so a 235B model's (~16 GB) never sit in memory at once. lean: the
    dense projections the file quantised (dense_blocks': attention, shared experts, lm_head) are not written
    but listed in gguf.json (`in_file`, with their shapes). A CPU multiplies them on the file's own blocks
    (forms.file_dense) and never reads float copies; where one is wanted (a GPU, --no-dense-blocks)
    Checkpoint.dense_state dequantises it from the file as it loads. Most of a large model's dense bytes, and
    of the import's time, are those projections."""
    from safetensors.torch import save_file
    model, out = GGUFModel(path), Path(out)
    cfg, tok = model.config(), model.tokenizer()  # checked, with every tensor's name, before anything is written
    model.check_names()
    if out.exists() and any(out.iterdir()) and not (out / "gguf.json").is_file():
        raise GGUFError(f"{out} exists and is not an emoe GGUF import; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("dense*.safetensors"), out / "gguf.json"]:  # an earlier import's, if any
        old.unlink(missing_ok=True)
    shard: dict[str, torch.Tensor] = {}
    n = 0

    def flush() -> None:
        nonlocal n
        if shard:
            n += 1
            save_file(shard, str(out / f"dense-{n:05d}.safetensors"), metadata={"format": "pt",
                                                                               "source": model.files[0].name})
            shard.clear()
    in_file = model.block_shapes() if lean else {}
    for name, w in model.dense(dtype, skip=in_file.keys()):
        shard[name] = w
        if sum(t.numel() * t.element_size() for t in shard.values()) >= shard_bytes:
            flush()
    flush()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.json").write_text(tok.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps(model.tokenizer_config(), indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": model.stop_ids()}, indent=2))
    (out / "gguf.json").write_text(json.dumps({"format": FORMAT, "files": [
        {"path": str(f), "bytes": f.stat().st_size} for f in model.files], "in_file": in_file}, indent=2))
    return out
