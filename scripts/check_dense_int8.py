"""How much `--dense-int8` and `--host-int8` move a model's answers: teacher-forced next-token agreement
with the model's own all-resident float32 run (greedy, 4 prompts x 24 tokens), every expert run on the host
(budget 0, a GGUF's kernel forms where it has them), with the dense projections in float32 or as int8
copies (all of them, all but lm_head, attention only, lm_head only), and with full-precision experts as
int8 forms (--host-int8; a packed model's experts have their own forms already).

    python scripts/check_dense_int8.py MODEL_DIR [MODEL_DIR ...]
"""
from __future__ import annotations

import sys

import torch

from emoe import quant
from emoe.engine import Engine, EngineConfig, SamplingParams

PROMPTS = ["Summarize: the city council met on Tuesday to discuss the new park.",
           "Is this review positive? The food was cold.", "Answer the question: What is the capital of France?",
           "Write an SQL query: how many singers are there?"]


def main() -> None:
    full = quant.DENSE_PROJECTIONS
    variants = [("dense float32", ()), ("int8: all", full), ("int8: all but lm_head", tuple(x for x in full if x != "lm_head")),
                ("int8: attention", ("q_proj", "k_proj", "v_proj", "o_proj")), ("int8: lm_head", ("lm_head",)),
                ("host-int8 experts", None)]
    print(f"{'model':40} " + " ".join(f"{v:>22}" for v, _ in variants))
    for model in sys.argv[1:]:
        ref = Engine(EngineConfig(model, miss_policy="all", max_batch=4))
        outs = [r.output_ids for r in ref.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True), chat=False)]
        ids = [ref.codec.encode(p) for p in PROMPTS]
        row = []
        for _, keep in variants:
            quant.DENSE_PROJECTIONS = keep or ()  # which projections int8_dense converts
            eng = Engine(EngineConfig(model, miss_policy="host", budget=0, experts_on="ram", max_batch=4,
                                      dense_int8=bool(keep), host_int8=keep is None))
            hits = sum(int((eng.score(i, o).argmax(-1) == torch.tensor(o)).sum()) for i, o in zip(ids, outs))
            row.append(hits / sum(map(len, outs)))
        quant.DENSE_PROJECTIONS = full
        print(f"{model[-40:]:40} " + " ".join(f"{a:>22.3f}" for a in row), flush=True)


if __name__ == "__main__":
    main()
