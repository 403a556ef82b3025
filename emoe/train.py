"""Train the embedded model: a small Mixtral-format MoE on the task prompt sets plus general text.

Resumable: parameters and AdamW state are checkpointed to safetensors (never pickle) with a JSON
sidecar; the run stops at --minutes and exports a HF folder (config.json, model.safetensors in bf16,
tokenizer.json, tokenizer_config.json with a chat template) that emoe's own loader reads.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ModelConfig
from .datasets import load_split
from .model import rms_norm, route, swiglu
from .rope import rope

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(slots=True)
class TrainConfig:
    vocab: int = 8192
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    experts: int = 16
    top_k: int = 2
    expert_inter: int = 384
    seq: int = 256
    batch: int = 16
    lr: float = 3e-3
    aux_coef: float = 0.01
    task_share: float = 0.6   # share of sequences drawn from task examples (rest: general text)
    seq_entropy: float = 0.0  # penalty on each sequence's routing entropy: fewer experts per prompt
    minutes: float = 80.0
    seed: int = 0
    trainable: str = "all"    # "router": only the router gates move (reshape routing, keep what experts know)

    def __post_init__(self):
        if self.trainable not in ("all", "router"):
            raise ValueError(f"trainable must be 'all' or 'router', not {self.trainable!r}")

    def model_config(self) -> dict:
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": self.vocab,
                "hidden_size": self.hidden, "intermediate_size": self.expert_inter,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "num_local_experts": self.experts,
                "num_experts_per_tok": self.top_k, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "hidden_act": "silu",
                "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 0,
                "eos_token_id": 3, "router_aux_loss_coef": self.aux_coef, "torch_dtype": "bfloat16"}


def train_tokenizer(texts, vocab: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))


def chat_text(prompt: str, answer: str) -> str:
    return f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{answer}<|end|>\n"


class Batches:
    """Packed sequences: task examples in chat form, or windows of general text."""

    def __init__(self, tok, general: str, cfg: TrainConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.by_task: dict[str, list[list[int]]] = {}
        for e in load_split("train"):  # tasks drawn uniformly, so big sets do not crowd out small ones
            self.by_task.setdefault(e.task, []).append(tok.encode(chat_text(e.prompt, e.answer)).ids)
        self.tasks = sorted(self.by_task)
        self.general = tok.encode(general).ids if general else []
        self.eot = tok.token_to_id("<|endoftext|>")

    def sequence(self) -> list[int]:
        n = self.cfg.seq + 1
        if self.general and self.rng.random() >= self.cfg.task_share:
            i = self.rng.randrange(0, len(self.general) - n)
            return self.general[i: i + n]
        out, task = [], self.rng.choice(self.tasks)  # one task per sequence, so its routing can specialise
        while len(out) < n:
            out += self.rng.choice(self.by_task[task]) + [self.eot]
        return out[:n]

    def next(self) -> torch.Tensor:
        return torch.tensor([self.sequence() for _ in range(self.cfg.batch)])


def init_params(mc: ModelConfig, seed: int) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    H, I, E = mc.hidden_size, mc.moe_intermediate_size, mc.num_experts
    hd = mc.head_dim

    def n(*shape, std=0.02):
        return torch.nn.Parameter(torch.randn(*shape, generator=g) * std)

    p = {"model.embed_tokens.weight": n(mc.vocab_size, H), "lm_head.weight": n(mc.vocab_size, H),
         "model.norm.weight": torch.nn.Parameter(torch.ones(H))}
    out_std = 0.02 / math.sqrt(2 * mc.num_layers)
    for i in range(mc.num_layers):
        a = f"model.layers.{i}."
        p[a + "input_layernorm.weight"] = torch.nn.Parameter(torch.ones(H))
        p[a + "post_attention_layernorm.weight"] = torch.nn.Parameter(torch.ones(H))
        p[a + "self_attn.q_proj.weight"] = n(mc.num_heads * hd, H)
        p[a + "self_attn.k_proj.weight"] = n(mc.num_kv_heads * hd, H)
        p[a + "self_attn.v_proj.weight"] = n(mc.num_kv_heads * hd, H)
        p[a + "self_attn.o_proj.weight"] = n(H, mc.num_heads * hd, std=out_std)
        p[a + "block_sparse_moe.gate.weight"] = n(E, H)
        p[a + "experts.gate"] = n(E, I, H)   # stacked for training; exported per expert
        p[a + "experts.up"] = n(E, I, H)
        p[a + "experts.down"] = n(E, H, I, std=out_std)
    return p


def forward_loss(p, mc: ModelConfig, tokens: torch.Tensor, aux_coef: float, seq_entropy: float = 0.0):
    x_in, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x_in.shape
    pos = torch.arange(T).expand(B, T)
    x = F.embedding(x_in, p["model.embed_tokens.weight"])
    aux = 0.0
    for i in range(mc.num_layers):
        a = f"model.layers.{i}."
        h = rms_norm(x, p[a + "input_layernorm.weight"], mc.rms_norm_eps)
        q = F.linear(h, p[a + "self_attn.q_proj.weight"]).view(B, T, mc.num_heads, -1).transpose(1, 2)
        k = F.linear(h, p[a + "self_attn.k_proj.weight"]).view(B, T, mc.num_kv_heads, -1).transpose(1, 2)
        v = F.linear(h, p[a + "self_attn.v_proj.weight"]).view(B, T, mc.num_kv_heads, -1).transpose(1, 2)
        q, k = rope(q, pos, mc.rope_theta), rope(k, pos, mc.rope_theta)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + F.linear(o.transpose(1, 2).reshape(B, T, -1), p[a + "self_attn.o_proj.weight"])
        h = rms_norm(x, p[a + "post_attention_layernorm.weight"], mc.rms_norm_eps).reshape(B * T, -1)
        logits = F.linear(h, p[a + "block_sparse_moe.gate.weight"])
        probs, w, ids = route(logits, mc.top_k, mc.norm_topk_prob)
        out = torch.zeros_like(h)
        for e in range(mc.num_experts):
            tok, slot = torch.where(ids == e)
            if len(tok):
                y_e = swiglu(h[tok], p[a + "experts.gate"][e], p[a + "experts.up"][e], p[a + "experts.down"][e])
                out = out.index_add(0, tok, y_e * w[tok, slot, None])
        # Switch-style balance loss: fraction of assignments times mean router probability per expert
        frac = torch.bincount(ids.reshape(-1), minlength=mc.num_experts).float() / ids.numel()
        aux = aux + mc.num_experts * (frac * probs.mean(0)).sum()
        if seq_entropy:  # concentrate each sequence on few experts; the balance term keeps the batch spread
            p_seq = probs.view(B, T, -1).mean(1)
            aux = aux + seq_entropy / aux_coef * -(p_seq * p_seq.clamp_min(1e-9).log()).sum(-1).mean()
        x = x + out.view(B, T, -1)
    x = rms_norm(x, p["model.norm.weight"], mc.rms_norm_eps)
    lm = F.cross_entropy(F.linear(x, p["lm_head.weight"]).reshape(-1, mc.vocab_size), y.reshape(-1))
    return lm + aux_coef * aux / mc.num_layers, lm


EXPERT_KEYS = {"gate": "w1", "up": "w3", "down": "w2"}  # stacked training tensor -> Mixtral per-expert name
PART_OF = {v: k for k, v in EXPERT_KEYS.items()}


def export(p, mc: ModelConfig, cfg: TrainConfig, out: Path, tok_path: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in p.items():
        if ".experts." in name:
            a, part = name.rsplit(".experts.", 1)
            key = EXPERT_KEYS[part]
            for e in range(mc.num_experts):
                state[f"{a}.block_sparse_moe.experts.{e}.{key}.weight"] = t[e].detach().to(torch.bfloat16).contiguous()
        else:
            state[name] = t.detach().to(torch.bfloat16).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.model_config(), indent=1))
    (out / "tokenizer.json").write_bytes(tok_path.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|end|>", "bos_token": "<|endoftext|>",
         "model_max_length": 1024}, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 0]}))


def load_init(folder: Path) -> dict[str, torch.Tensor]:
    """Parameters to start from: a run folder's train.safetensors, or an exported model folder
    (per-expert bf16 tensors, restacked into the training layout in fp32)."""
    folder = Path(folder)
    if (folder / "train.safetensors").exists():
        return load_file(str(folder / "train.safetensors"))
    if not (folder / "model.safetensors").exists():
        raise SystemExit(f"{folder} holds neither train.safetensors (a run) nor model.safetensors (a model)")
    flat, out, experts = load_file(str(folder / "model.safetensors")), {}, {}
    for name, t in flat.items():
        m = re.fullmatch(r"(.+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", name)
        if m:
            part = PART_OF[m.group(3)]
            experts.setdefault(f"{m.group(1)}.experts.{part}", {})[int(m.group(2))] = t.float()
        else:
            out[name] = t.float()
    for name, per in experts.items():
        out[name] = torch.stack([per[e] for e in range(len(per))])
    return out


def train(out: Path, run_dir: Path, general_text: Path | None, cfg: TrainConfig, overwrite: bool = False,
          init: Path | None = None) -> Path:
    """init: a previous run folder or an exported model folder whose parameters start this one (fine-tuning,
    see `load_init`)."""
    from tokenizers import Tokenizer
    if (out / "model.safetensors").exists() and not overwrite:
        raise SystemExit(f"{out} already holds a model; pass --overwrite to replace it")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    general = general_text.read_text(errors="ignore") if general_text else ""
    tok_path = run_dir / "tokenizer.json"
    if init is not None and not tok_path.exists():  # fine-tuning keeps the tokenizer the weights know
        tok_path.write_bytes((Path(init) / "tokenizer.json").read_bytes())
    if not tok_path.exists():
        texts = [chat_text(e.prompt, e.answer) for e in load_split("train")]
        train_tokenizer(texts + [general[i: i + 10000] for i in range(0, len(general), 10000)], cfg.vocab, tok_path)
    tok = Tokenizer.from_file(str(tok_path))
    mc = ModelConfig.from_hf(cfg.model_config())
    params = init_params(mc, cfg.seed)
    if init is not None and not (run_dir / "state.json").exists():
        start = load_init(init)
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(start[k])
    if cfg.trainable == "router":
        for name, v in params.items():
            v.requires_grad_(name.endswith("block_sparse_moe.gate.weight"))
    opt = torch.optim.AdamW([v for v in params.values() if v.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    step, state_path = 0, run_dir / "state.json"
    if state_path.exists():  # resume
        meta = json.loads(state_path.read_text())
        if meta["config"] != asdict(cfg) | {"minutes": meta["config"]["minutes"]}:
            raise SystemExit(f"{run_dir} holds a run with a different config; use another --run-dir")
        saved = load_file(str(run_dir / "train.safetensors"))
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(saved[k])
        for k, v in params.items():
            if v.requires_grad and f"exp_avg/{k}" in saved:
                opt.state[v] = {"step": torch.tensor(float(meta["step"])), "exp_avg": saved[f"exp_avg/{k}"],
                                "exp_avg_sq": saved[f"exp_avg_sq/{k}"]}
        step = meta["step"]
    rng = random.Random(cfg.seed + step)
    data = Batches(tok, general, cfg, rng)
    total = cfg.minutes * 60
    elapsed = json.loads(state_path.read_text()).get("elapsed", 0.0) if state_path.exists() else 0.0
    bar = tqdm(total=int(total), initial=int(elapsed), desc="train (s)", unit="s")
    ema, t_last = None, time.time()

    def save():
        blob = {k: v.detach().contiguous() for k, v in params.items()}
        for k, v in params.items():
            st = opt.state.get(v)
            if st:
                blob[f"exp_avg/{k}"], blob[f"exp_avg_sq/{k}"] = st["exp_avg"], st["exp_avg_sq"]
        save_file(blob, str(run_dir / "train.safetensors"))
        state_path.write_text(json.dumps({"step": step, "elapsed": elapsed, "config": asdict(cfg), "loss": ema}))

    while elapsed < total:
        # warm-up, then cosine decay to 10% over the wall-clock budget (the step count is not known ahead)
        lr = cfg.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / total)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, lm = forward_loss(params, mc, data.next(), cfg.aux_coef, cfg.seq_entropy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed, t_last = elapsed + now - t_last, now
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        bar.n = int(elapsed)
        bar.set_postfix(step=step, loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            save()
    save()
    bar.close()
    export(params, mc, cfg, out, tok_path)
    return out


