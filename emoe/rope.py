"""Rotary position embeddings: frequencies (YaRN as transformers computes them), per-forward cos/sin tables,
and the rotation of the two halves of each head."""
from __future__ import annotations

import math

import torch

from .config import Yarn


def rope_frequencies(d: int, theta: float, yarn: Yarn | None = None, factors: tuple | None = None
                     ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of a d-dim rotary embedding and the factor on cos/sin (YaRN as transformers does it;
    factors: each frequency divided by its own, as llama.cpp's rope_freqs and Llama 3's scaling give them)."""
    base = theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)
    if factors is not None:
        return 1.0 / (base * torch.tensor(factors, dtype=torch.float)), 1.0
    if yarn is None:
        return 1.0 / base, 1.0

    def dim_of(rotations: float) -> float:
        return d * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = dim_of(yarn.beta_fast), dim_of(yarn.beta_slow)
    if yarn.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # high-frequency dims keep their frequency, low-frequency ones are interpolated
    return (1.0 / (yarn.factor * base)) * (1 - keep) + (1.0 / base) * keep, yarn.attention_factor


def llama3_factors(d: int, theta: float, factor: float, low: float, high: float, ctx: int) -> tuple[float, ...]:
    """Llama 3 rope scaling as per-frequency divisors (llama.cpp's converter writes them as rope_freqs): wavelengths
    above ctx / low stretched by factor, below ctx / high kept, smoothly between."""
    out = []
    for b in (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)).tolist():
        wavelen = 2 * math.pi * b
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(float(factor))
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def rope_tables(pos: torch.Tensor, inv: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, d] of positions pos [B, T]: the same for every layer of a forward."""
    freqs = pos[:, None, :, None].float() * inv.to(pos.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, scale: float = 1.0,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [B, heads, T, d]; pos: [B, T]; rotates the two halves of x (tables: rope_tables made beforehand)."""
    d = x.shape[-1]
    cos, sin = tables or rope_tables(pos, inv, scale, x.dtype)
    half = torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)
    return x * cos + half * sin


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    return apply_rope(x, pos, rope_frequencies(x.shape[-1], theta)[0])
