"""The tiers an engine serves from: the slow tier's store, the byte budget it resolves to, and the fast tier's cache
with its low-bit copies (made ahead of time by `emoe quantize`, the GGUF file's own values, or quantised at start);
and, in one memory pool, the KV slots the experts' budget leaves room for."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from . import ckernel, formstore
from .cache import BudgetError, ExpertCache
from .copies import CopyFile, copies_path
from .gguf_blocks import GGUFCopies
from .store import check_memory, open_store


def resolve_budget(budget: float, total_bytes: int) -> int:
    """--budget: up to 1, a fraction of the routed experts' bytes; above, bytes."""
    return int(budget * total_bytes) if budget <= 1.0 else int(budget)


@dataclass(slots=True)
class Tiers:
    store: object
    cache: ExpertCache
    expert_numel: int
    total_expert_bytes: int


def open_tiers(ckpt, cfg, device: torch.device, dtype: torch.dtype, policy, full: bool) -> Tiers:
    """cfg: the EngineConfig. full: every expert resident (the budget is all of them). Refuses (BudgetError) a budget
    below what the miss policy needs, and (check_memory) one the machine cannot hold, before anything is read."""
    c = ckpt.config
    layers = list(c.moe_layers)
    numel = 3 * c.moe_intermediate_size * c.hidden_size
    store = formstore.open_for(ckpt, device, cfg, policy)
    expert_bytes = store.expert_nbytes if store is not None else numel * torch.empty((), dtype=dtype).element_size()
    total = expert_bytes * len(layers) * c.num_experts
    budget = total if full else resolve_budget(cfg.budget, total)
    need = policy.min_experts(layers, c.num_experts, c.top_k) * expert_bytes
    if budget < need:
        raise BudgetError(f"budget {budget} bytes ({budget / total:.1%} of expert bytes) "
                          f"is smaller than what '{cfg.miss_policy}' needs: {need} bytes "
                          f"({need // expert_bytes} experts of {expert_bytes} bytes; "
                          f"top-{c.top_k} over {len(layers)} MoE layers)")
    check_memory(ckpt, cfg.experts_on, device, min(budget, total))
    store = store or open_store(ckpt, cfg.experts_on, host_forms=cfg.host_kernel and hasattr(policy, "defers"),
                                int8=cfg.host_int8, form_bits=cfg.host_form_bits)
    if device.type == "cpu":
        ckernel.library()  # built now (under a second, once per machine), not in the first long prompt
    cache = ExpertCache(store, 0, device, dtype, c.num_layers, c.num_experts, numel, kernel=cfg.qkernel)
    cache.budget_bytes = min(budget, total)
    if getattr(policy, "shadow_bits", 0):
        # copies are made in policy.prepare, after the initial plan (none only to be dropped), or read from the
        # files `emoe quantize` wrote beside the checkpoint
        cache.enable_shadow(layers, policy.shadow_bits, policy.hi_bits, fill=False,
                            copies=_copies(ckpt, cache, store, (layers[0], 0)))
    return Tiers(store, cache, numel, total)


def kv_slots(c, cfg, max_len: int, dtype: torch.dtype, expert_budget: int) -> int:
    """KV slots: cfg.max_batch, or with cfg.memory_bytes one memory pool, where what the experts' budget leaves goes
    to slots of max_len tokens (BudgetError where it leaves none)."""
    if cfg.memory_bytes is None:
        return cfg.max_batch
    kv_dtype = dtype if cfg.kv_dtype is None else getattr(torch, cfg.kv_dtype)
    per_slot = c.kv_numel_per_token * max_len * torch.empty((), dtype=kv_dtype).element_size() \
        + 4 * c.state_numel_per_slot  # linear-attention states, float32
    slots = (cfg.memory_bytes - expert_budget) // per_slot
    if slots < 1:
        raise BudgetError(f"memory {cfg.memory_bytes} bytes leaves no {max_len}-token KV slot next to "
                          f"{expert_budget} bytes of experts ({per_slot} bytes per slot)")
    return slots


def _copies(ckpt, cache, store, first):
    """copies(bits, group) for enable_shadow: where this checkpoint's copies at that precision come from, or None
    (quantised at startup)."""
    gguf = next(iter(ckpt.experts.values())).layout == "gguf"

    def copies(b: int, group: int):
        if gguf:  # the file's own 4/8-bit values, repacked
            return GGUFCopies(cache, b)
        path = copies_path(ckpt.dir, b, group)
        if path.is_file():
            return CopyFile(path, ckpt.dir, store, first)
        other = sorted(path.parent.glob(f"int{b}-g*.safetensors"))
        if other:  # made for the other layout (quant.copy_group): said, not silently ignored
            print(f"[emoe] {other[0]} holds int{b} copies per {other[0].stem.split('-g')[-1]} values, this layout "
                  f"takes them per {group}: quantising at startup instead (`emoe quantize --layout "
                  f"{'portable' if group > 32 else 'kernel'}` writes them)", file=sys.stderr)
        return None
    return copies
