"""What the command line prints about an engine: where its bytes are, and what a run did. Bound to Engine
as methods (eng.memory_line(), eng.summary(seconds))."""
from __future__ import annotations


def memory_line(eng) -> str:
    """Where the bytes are: fast-tier experts (of the budget), KV, dense weights, and the RAM tier."""
    gib, c = 2 ** 30, eng.cache
    nb = lambda t: t.nbytes  # noqa: E731  (tensors and kernel forms alike)
    from .ckernel import describe
    from .quant import KTensor
    dense = sum(nb(t) for t in eng.model.w.values())
    forms = sum(isinstance(t, KTensor) for t in eng.model.w.values())  # --dense-blocks / --dense-int8
    ram = sum(nb(t) for ts in getattr(eng.store, "_experts", {}).values() for t in ts)
    return (f"[emoe] memory: experts {c.used_bytes / gib:.2f} of a {c.budget_bytes / gib:.2f} GiB budget on "
            f"{eng.device.type}, KV {eng.kv.nbytes / gib:.2f} GiB, dense {dense / gib:.2f} GiB"
            + (f" ({forms} projections in kernel forms)" if forms else "") + "; "
            + (f"RAM tier {ram / gib:.2f} GiB" + (" (kernel forms)" if eng.store.forms else "")
               if eng.store.tier == "ram" else "experts read from disk")
            + (f"; forms run by {describe(eng.model.activations)}" if (forms or eng.store.forms) and eng.device.type == "cpu" else ""))


def summary(eng, seconds: float) -> str:
    from .ckernel import describe
    s, c = eng.cache.stats, eng.cache
    shadows = (f" incl. int{c.shadow_bits}{f'/int{c.hi_bits}' if c.hi_bits else ''} copies of the "
               f"{len(c._shadow)} others ({s.shadow_uses} expert runs on them"
               f"{', in CPU kernel forms' if c.kernel else ''}"
               + (f", int4 calibrated on {cal}" if (cal := getattr(c.copy_files.get(4), "calibrated", "")) else "")
               + ")") if c.shadow_bits else ""
    if s.host_runs:
        shadows += (f", {s.host_runs} expert runs on the host from the {eng.store.tier} tier"
                    + (f" (packed experts in CPU kernel forms, run by {describe(eng.model.activations)})" if eng.store.forms else ""))
    n = getattr(eng.policy, "min_tokens", None)
    if n is not None:  # auto
        shadows += (", auto: every miss run on the host" if n == float("inf") else ", auto: every miss loaded"
                    if n <= 1 else f", auto: misses of {n:.0f}+ tokens loaded, fewer run on the host")
    return (f"[emoe] resident experts {c.used_bytes / 2**20:.1f}/{eng.total_expert_bytes / 2**20:.1f} MiB "
            f"({c.used_bytes / eng.total_expert_bytes:.0%}){shadows}, full-precision hit rate {s.hit_rate:.1%}, "
            f"loaded {s.bytes_loaded / 2**20:.1f} MiB in {s.load_seconds:.2f}s, "
            f"{eng.tokens_generated / max(seconds, 1e-9):.1f} tokens/s")
