"""`--host-form-bits 4` forms (a GGUF's sub-4-bit experts requantised to int4, forms.int4_form) fitted by least squares
(quant.fit_int4) against the group's range alone, each scored teacher-forced against the default int8 forms on one
random model: docs/results/int4_offsets.txt, section 4.

    python scripts/ab_int4_forms.py Q2_K [--work /tmp/int4forms]

Builds a random Qwen3-MoE (hidden 512, 4 layers) with the type's expert blocks (tests/gguf_writer.py), imports it,
generates 24 greedy continuations of random prompts on the int8 forms, and reports next-token agreement and mean
|Δ log p| of the int4 forms along them. Forms are not cached (EMOE_FORMS_CACHE=0): each fit builds its own.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["EMOE_FORMS_CACHE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from emoe import forms, quant  # noqa: E402
from emoe.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from emoe.gguf_import import import_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("qtype", help="the experts' GGUF type, e.g. Q2_K, IQ3_XXS, IQ2_XXS")
    ap.add_argument("--work", default="/tmp/int4forms")
    a = ap.parse_args()
    from gguf_writer import write_gguf
    from tiny import make_tiny
    d = Path(a.work) / a.qtype
    if not (d / "imp").exists():
        d.mkdir(parents=True, exist_ok=True)
        hf = make_tiny("qwen3_moe", d / "hf", hidden_size=512, moe_intermediate_size=512, num_attention_heads=8,
                       num_hidden_layers=4)
        import_gguf(write_gguf(hf, d / "m.gguf", expert_types=(a.qtype,) * 3, dense_type="Q8_0"), d / "imp",
                    dtype=torch.float32)

    def engine(bits: int) -> Engine:
        return Engine(EngineConfig(str(d / "imp"), budget=0.0, miss_policy="host", experts_on="ram", host_form_bits=bits))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 250, (12,), generator=g).tolist() for _ in range(24)]
    ref = engine(8)
    conts = [ref.generate([p], SamplingParams(max_tokens=24, temperature=0.0), chat=False)[0].output_ids for p in prompts]
    ref_lp = [torch.log_softmax(ref.score(p, c).float(), -1) for p, c in zip(prompts, conts)]
    del ref
    fit = quant.fit_int4
    for name, steps in (("range fit", 0), ("least squares", 2)):
        forms.fit_int4 = lambda x, steps=steps: fit(x, steps)
        eng, agree, total, dlp = engine(4), 0, 0, []
        for p, c, rl in zip(prompts, conts, ref_lp):
            lp = torch.log_softmax(eng.score(p, c).float(), -1)
            agree, total = agree + int((lp.argmax(-1) == torch.tensor(c)).sum()), total + len(c)
            dlp.append((lp - rl).abs().mean())
        print(f"{a.qtype:8s} {name:14s} agreement with the int8 forms {agree / total:.3f} over {total} positions, "
              f"mean |dlogp| {float(torch.stack(dlp).mean()):.4f}", flush=True)
        del eng
    forms.fit_int4 = fit


if __name__ == "__main__":
    main()
