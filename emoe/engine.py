"""The engine: wires checkpoint → store → cache → policy → model, and runs requests step by step.

`admit` gives requests KV slots and prefills them (in chunks; all at once, or a chunk per step); each
`step()` decodes one token for every running request. Requests hold a KV slot from admission to finish,
so they can join and leave the batch between steps (iteration-level batching); `admit` is the hook a
scheduler drives.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, fields, replace

import torch

from . import ckernel, decode_block, grammar
from .cache import BudgetError
from .checkpoint import Checkpoint
from .config import ModelConfig
from .model import KVCache, MoEModel
from .loader import Loader, Mover
from .concurrency import Concurrency
from .policies import PreGated, Reroute, make_policy
from .prompt_cache import PromptCache, take_slot
from .dispatch import ExpertDispatch, run_experts
from .forms import file_dense
from .quant import int8_dense
from .report import memory_line, summary
from .tokenizer import TextCodec
from .sequence import Request, SamplingParams, logprob_entries, penalise, sample  # noqa: F401 — interface too
from .tier import kv_slots, open_tiers
from .traces import TraceRecorder


@dataclass(slots=True)
class EngineConfig:
    model: str
    budget: float = 1.0            # fraction of all routed-expert bytes [0, 1], or bytes when > 1
    miss_policy: str = "reroute"   # a policies.MISS_POLICIES name: reroute | load | host | shadow | all | …
    experts_on: str = "disk"       # disk | ram
    device: str | None = None      # default: cuda when available, else cpu
    dtype: str | None = None       # compute dtype; default float32 on CPU, the checkpoint's on CUDA
    max_batch: int = 8
    max_len: int = 1024            # KV slot length: prompt + output tokens of one request
    prefill_chunk: int = 512       # prompt tokens per request per forward: bounds activation and score memory
    prefix_reuse: bool = False     # a new request takes the free KV slot whose last occupant shares its prefix
    prompt_cache_mb: int = 0       # with prefix_reuse: a slot's KV kept in host memory when it is taken over (prompt_cache)
    trace: bool = False
    memory_bytes: int | None = None  # experts + KV together; when set, max_batch is what the rest holds
    qkernel: bool = True           # on CPU, run low-bit copies with PyTorch's int4 kernel, not dequantised
    host_kernel: bool = True       # packed experts in RAM: host misses on the int4 kernel (forms.py)
    dense_int8: bool = False       # on CPU, dense projections as int8 copies on that kernel (quant.int8_dense)
    dense_blocks: bool = False     # on CPU, a GGUF import's dense projections on the file's blocks (forms.file_dense)
    host_int8: bool = False        # with host_kernel, full-precision experts in RAM as int8 forms too
    host_form_bits: int = 8        # 4: a GGUF's sub-4-bit requantised types (Q2_K, IQ1-IQ3) as int4 forms (lossy)
    kv_dtype: str | None = None    # the attention layers' KV cache (MLA's latents); default the compute dtype
    async_loads: bool | None = None  # plans' loads on a worker thread (loader.Mover); default: on a GPU only

    def __post_init__(self):
        if not self.budget >= 0:
            raise ValueError(f"budget must be >= 0 (a fraction up to 1.0, or bytes; 0 with the host miss policy: "
                             f"every expert runs in the slow tier), got {self.budget}")
        if self.max_batch < 1 or self.max_len < 2 or self.prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1 and max_len >= 2")
        if self.experts_on not in ("disk", "ram"):
            raise ValueError(f"experts_on must be 'disk' or 'ram', got {self.experts_on!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.kv_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported kv_dtype {self.kv_dtype!r} (float32, bfloat16 or float16)")
        if self.prompt_cache_mb < 0:
            raise ValueError(f"prompt_cache_mb must be >= 0, got {self.prompt_cache_mb}")
        if self.host_form_bits not in (4, 8):
            raise ValueError(f"host_form_bits must be 4 or 8, got {self.host_form_bits}")


class Engine:
    def __init__(self, cfg: EngineConfig, policy=None, residency=None):
        """policy: a miss-policy object (default: by name from cfg.miss_policy). residency: a callable
        capacity → residency policy (residency.py) that plans which experts stay resident."""
        self.ecfg = cfg
        self.ckpt = Checkpoint(cfg.model)
        self.cfg: ModelConfig = self.ckpt.config
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ckpt_dtype = next(iter(self.ckpt.experts.values())).dtype
        self.dtype = getattr(torch, cfg.dtype) if cfg.dtype else (ckpt_dtype if self.device.type == "cuda" else torch.float32)
        self.codec = TextCodec(self.ckpt.dir, self.ckpt.tokenizer_path, self.cfg.eos_token_ids)
        keep32 = self.cfg.spec.fp32_router  # DeepSeek and GLM keep router weights and bias in fp32, as trained
        gguf_cpu = self.device.type == "cpu" and (self.ckpt.dir / "gguf.json").is_file()  # an import-gguf folder
        on_blocks = cfg.dense_blocks and gguf_cpu
        forms = file_dense(self.ckpt.dir, self.ckpt.dense_shapes()) if on_blocks else {}
        dense = {k: v.to(self.device, torch.float32 if keep32 and k.endswith((".gate.weight", "e_score_correction_bias"))
                         else self.dtype) for k, v in self.ckpt.dense_state(skip=forms.keys()).items()}
        dense.update(forms)  # the float copies they replace are never read
        if cfg.dense_int8 and self.device.type == "cpu":
            dense = int8_dense(dense)
        self.model = MoEModel(self.cfg, dense)
        self.model.activations = ckernel.for_gguf() if gguf_cpu else None
        self.policy = policy or make_policy(cfg.miss_policy)
        c = self.cfg
        layers = list(c.moe_layers)
        full = cfg.miss_policy == "all" and policy is None or self.policy.name == "all"
        tiers = open_tiers(self.ckpt, cfg, self.device, self.dtype, self.policy, full)
        self.store, self.cache = tiers.store, tiers.cache
        self.expert_numel, self.total_expert_bytes = tiers.expert_numel, tiers.total_expert_bytes
        plan_cap = getattr(self.policy, "plan_capacity", lambda cap: cap)(self.cache.capacity)  # Slack keeps some free
        self.residency = residency(plan_cap) if residency is not None else None
        if self.residency is not None and self.cache.hi_bits:  # plans choose each expert's precision
            self.residency.levels = self.cache.levels(c.top_k)
        if isinstance(self.policy, Reroute) and self.policy.plan is None and self.residency is not None:
            self.policy.plan = self.residency.initial()
        if isinstance(self.policy, PreGated) and not self.policy.routers:
            routers = {l: dense[f"model.layers.{l}.{c.spec.moe_prefix}.{c.spec.router}.weight"] for l in layers}
            self.policy.routers = {a: (b, routers[b]) for a, b in zip(layers, layers[1:])}
        self.policy.prepare(self.cache, layers)
        short = [l for l in layers if len(self.cache.resident(l)) < c.top_k]
        if getattr(self.policy, "full_topk", False) and short:
            raise BudgetError(f"layers {short} hold fewer than top-{c.top_k} resident experts; "
                              f"rerouting needs a full top-k in every MoE layer")
        self.loader = Loader(self.cache)
        # (a GPU's copies run on their own stream: 1.05-1.09x tokens/s on an H200; a CPU's compete with compute)
        on = cfg.async_loads if cfg.async_loads is not None else self.device.type == "cuda"
        if on and self.residency is not None and not self.cache.forms:
            self.cache.mover = Mover(self.device, self.dtype)  # (after the start's fill, which nothing overlaps)
        self.cache.stats.__init__()  # count only what serving does, not the initial fill
        self.max_len = min(cfg.max_len, c.max_position_embeddings)
        slots = kv_slots(c, cfg, self.max_len, self.dtype, self.cache.budget_bytes)
        self.kv = KVCache.empty(c, slots, self.max_len, self.dtype, self.device,
                                getattr(torch, cfg.kv_dtype) if cfg.kv_dtype else None)
        tracing = cfg.trace or self.residency is not None
        self.recorder = TraceRecorder(c.num_layers, c.num_experts, slots, device=self.device) if tracing else None
        self.dispatch = ExpertDispatch(self.cache, self.policy, self.recorder, self.model.expert_fn)
        self.free_slots = list(range(slots))
        self.max_batch = slots
        # where misses are disk reads loaded by LRU: the requests in flight as measured cheapest (concurrency.py)
        self.concurrency = Concurrency(slots) if self.cache.forms and self.policy.name == "load" else None
        self.running: list[Request] = []
        self.prefilling: list[Request] = []  # admitted, prompt not yet all in the KV cache
        self.last_prefill = (0, 0.0)  # (tokens, seconds) of the last prefill chunk: serving prices prefill by it
        self.slot_tokens: dict[int, list[int]] = {}  # prefix_reuse: the tokens whose KV a free slot still holds
        # a recurrent layer's state holds every token it saw: a prefix of it cannot be restored
        self.prompt_cache = PromptCache(cfg.prompt_cache_mb << 20) \
            if cfg.prefix_reuse and cfg.prompt_cache_mb and not c.linear_layers else None
        self.reused_tokens = 0  # prompt tokens not prefilled, their KV found in a slot (cumulative)
        self.tokens_generated = 0
        self._grammar_tok = None
        self._ids = itertools.count()
        if self.device.type == "cuda":
            self._warm_up()
        else:
            decode_block.prepare(self.model)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """CUDA loads kernels and cuBLAS lazily, so the first tokens served would pay seconds for it
        (26 instead of 348 tokens/s on an H200) and skew every timing. Two dummy tokens through KV slot 0
        (a request's prefill overwrites what they leave) run each kernel once. Experts run whatever
        copy is held, through `peek`: no counter, trace, LRU order or residency changes."""
        def dispatch(layer, x, probs, weights, ids):  # through one expert of each kind held: full, int4, int8
            held = {e: self.cache.peek((layer, e)) for e in range(self.cfg.num_experts)}
            kinds = list({(type(w[0]).__name__, getattr(w[0], "bits", 0)): e for e, w in held.items() if w}.values())
            if not kinds:
                return torch.zeros_like(x)
            pick = torch.tensor(kinds, device=ids.device)[torch.arange(ids.numel(), device=ids.device) % len(kinds)]
            return run_experts(x, weights, pick.view_as(ids), lambda e, n: held[e], self.cfg.num_experts,
                               self.model.expert_fn(layer))
        tokens = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        pos = torch.arange(2, device=self.device)[None]
        valid = torch.ones(1, 2, dtype=torch.bool, device=self.device)
        slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model.forward(tokens, pos, valid, dispatch, self.kv, slot, last_only=True).argmax(-1).tolist()  # syncs

    # -- requests --------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[dict] | list[int], params: SamplingParams, task: str | None = None,
                     chat: bool = True, request_id: str | None = None, tools: list[dict] | None = None,
                     template_kwargs: dict | None = None) -> Request:
        """prompt: text (wrapped in the chat template with chat), chat messages (rendered with `tools` and
        the template's `template_kwargs`, if any), or token ids as they are."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if not all(0 <= t < self.cfg.vocab_size for t in prompt):
                raise ValueError(f"prompt token ids must lie in 0..{self.cfg.vocab_size - 1}")
            ids = list(prompt)
        elif isinstance(prompt, list):
            ids = self.codec.encode(self.codec.apply_chat(prompt, tools, template_kwargs))
        else:
            ids = self.codec.encode(self.codec.apply_chat([{"role": "user", "content": prompt}]) if chat else prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if params.logit_bias and max(params.logit_bias) >= self.cfg.vocab_size:
            raise ValueError(f"logit_bias names token {max(params.logit_bias)}; this model's ids lie in "
                             f"0..{self.cfg.vocab_size - 1}")
        if len(ids) + 1 > self.max_len:
            raise ValueError(f"prompt is {len(ids)} tokens; this engine serves at most {self.max_len - 1} "
                             f"(model context {self.cfg.max_position_embeddings}, max_len {self.max_len})")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        constraint = grammar.Constraint(self.grammar_tokenizer(), params.grammar, self.cfg.vocab_size, params.think,
                                        grammar.think_phase(ids, params.think) if params.think else "grammar") \
            if params.grammar else None
        return Request(request_id or f"req-{next(self._ids)}", ids, params, task, gen=gen, constraint=constraint)

    def grammar_tokenizer(self):
        """The tokenizer structured output masks by (grammar.tokenizer), built at the first such request."""
        if self._grammar_tok is None:
            self._grammar_tok = grammar.tokenizer(self.ckpt.tokenizer_path.read_text(), self.cfg.vocab_size,
                                                  sorted(self.codec.stop_ids))
        return self._grammar_tok

    def fits(self, prompt: str, max_tokens: int, chat: bool = True) -> bool:
        """Whether a prompt plus max_tokens of output fits one KV slot (harnesses skip those that do not)."""
        text = self.codec.apply_chat([{"role": "user", "content": prompt}]) if chat else prompt
        return len(self.codec.encode(text)) + max_tokens <= self.max_len

    def admit(self, reqs: list[Request], complete: bool = True) -> None:
        """Give reqs KV slots and prefill them: every chunk now (complete), or one chunk per `step`,
        interleaved with decoding, so a long prompt delays the running requests by a chunk per step rather
        than by its whole prefill (serving)."""
        if len(reqs) > len(self.free_slots):
            raise RuntimeError(f"{len(reqs)} requests but only {len(self.free_slots)} free KV slots")
        if self.residency is not None:  # the loader runs on every scheduling decision
            t0 = time.perf_counter()
            plan = self.residency.plan(self.running + self.prefilling + list(reqs), self.cache)
            if plan and self._follows(plan):
                self.loader.apply(plan, t0)
            else:
                self.loader.stats.seconds += time.perf_counter() - t0
        for r in reqs:  # echo needs every prompt position's logits: nothing reused
            r.slot, r.prefilled = self._take_slot(r.prompt_ids, reuse=r.params.prompt_logprobs is None)
            self.reused_tokens += r.prefilled
        self.prefilling.extend(reqs)
        if complete:
            ready = []
            while any(r.prefilled < len(r.prompt_ids) for r in reqs):
                ready += self._prefill_chunk()
            self._start(ready)

    def _take_slot(self, prompt: list[int], reuse: bool = True) -> tuple[int, int]:
        """(free slot, prompt tokens whose KV it holds): prompt_cache.take_slot, with prefix_reuse."""
        return take_slot(self.free_slots, self.slot_tokens, prompt, self.ecfg.prefix_reuse and reuse,
                         bool(self.cfg.linear_layers), self.prompt_cache, self.kv)

    def _start(self, ready: list[tuple[Request, torch.Tensor]]) -> list[Request]:
        """Requests whose prompt is in the cache: first token, the residency's prompt-aware refresh, then
        the running batch. Returns those that finished at once."""
        if not ready:
            return []
        new = [r for r, _ in ready]
        done = self._emit(new, torch.stack([lg for _, lg in ready]))
        live = [r for r in new if r.finish_reason is None]
        if self.residency is not None:
            t0 = time.perf_counter()
            plan = self.residency.after_prefill(self.running + live, live, [self.recorder.peek(r.slot) for r in live],
                                                  self.cache)
            if plan and self._follows(plan):
                self.loader.apply(plan, t0)
        self.running.extend(live)
        return done

    def _follows(self, plan) -> bool:
        """Whether the miss policy takes the residency's plan now (adaptive.Adapt: not while it runs as LRU)."""
        follows = getattr(self.policy, "follows", None)
        return follows is None or follows(plan)

    def abort(self, req: Request) -> None:
        if req.finish_reason is None:
            self._finish(req, "abort")
            self.running = [r for r in self.running if r is not req]
            self.prefilling = [r for r in self.prefilling if r is not req]

    # -- steps -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, rows: list[Request], seqs: list[list[int]], starts: list[int], phase: str,
                 last_only: bool = True) -> torch.Tensor:
        T = max(len(s) for s in seqs)
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        pos = torch.zeros(len(rows), T, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, (s, p0) in enumerate(zip(seqs, starts)):
            tokens[b, : len(s)] = torch.tensor(s)
            pos[b, : len(s)] = torch.arange(p0, p0 + len(s))
            valid[b, : len(s)] = True
        slots = torch.tensor([r.slot for r in rows])
        if hasattr(self.policy, "begin"):  # per-token task, for policies that treat tasks differently
            self.policy.begin([r.task for r, s in zip(rows, seqs) for _ in s])
        d = self.device
        if self.recorder is not None:
            self.recorder.phase, self.recorder.owners = phase, slots[:, None].expand(len(rows), T)[valid].to(d)
        return self.model.forward(tokens.to(d), pos.to(d), valid.to(d), self.dispatch, self.kv,
                                  slots.to(d), last_only=last_only)

    def _prefill_chunk(self) -> list[tuple[Request, torch.Tensor]]:
        """The next prefill_chunk prompt tokens of every request still prefilling, each attending to the
        cache its earlier chunks filled: a long prompt's attention scores and expert batches stay bounded.
        Returns (request, last logits) for those whose prompt is now complete."""
        t0, rows, C = time.perf_counter(), list(self.prefilling), self.ecfg.prefill_chunk
        seqs = [r.prompt_ids[r.prefilled: r.prefilled + C] for r in rows]
        want = [r.params.prompt_logprobs is not None for r in rows]  # `echo`: every position's logits
        logits = self._forward(rows, seqs, [r.prefilled for r in rows], "prefill", last_only=not any(want))
        if any(want):
            for b, r in enumerate(rows):  # position p's logits predict prompt token p + 1
                n = min(len(seqs[b]), len(r.prompt_ids) - 1 - r.prefilled)
                if want[b] and n > 0:
                    nxt = r.prompt_ids[r.prefilled + 1: r.prefilled + 1 + n]
                    r.prompt_logprobs += logprob_entries(logits[b, :n], nxt, r.params.prompt_logprobs)
            logits = logits[torch.arange(len(rows)), torch.tensor([len(s) - 1 for s in seqs])]
        for r, s in zip(rows, seqs):
            r.prefilled += len(s)
        self.prefilling = [r for r in rows if r.prefilled < len(r.prompt_ids)]
        if self.device.type == "cuda":  # one sync per chunk, so that the chunk's time is its own
            torch.cuda.synchronize(self.device)
        self.last_prefill = (sum(map(len, seqs)), time.perf_counter() - t0)
        return [(r, lg) for r, lg in zip(rows, logits) if r.prefilled == len(r.prompt_ids)]

    def step(self) -> list[Request]:
        """One prefill chunk for the requests admitted without `complete`, then one decoded token for every
        request that was running; returns the requests that finished."""
        rows = list(self.running)
        flight = len(rows) + len(self.prefilling)
        self.last_prefill = (0, 0.0)
        done = self._start(self._prefill_chunk()) if self.prefilling else []
        if rows:
            logits = self._forward(rows, [[r.output_ids[-1]] for r in rows], [r.length - 1 for r in rows], "decode")
            for r in rows:
                r.fed += 1
            done += self._emit(rows, logits)
        self.running = [r for r in self.running if r.finish_reason is None]
        if self.concurrency is not None:
            self.concurrency.observe(flight, self.store.stats.bytes_read, self.tokens_generated)
        return done

    @staticmethod
    def _sample(r: Request, logits: torch.Tensor) -> int:
        p = r.params
        return sample(penalise(logits, p, r.prompt_ids, r.output_ids) if p.penalised else logits, p, r.gen)

    def _emit(self, rows: list[Request], logits: torch.Tensor) -> list[Request]:
        now, done = time.perf_counter(), []
        greedy = logits.argmax(-1).tolist()  # one host sync for the batch, not one per row
        held = [i for i, r in enumerate(rows) if r.constraint is not None]  # structured output: masks of all at once
        masks = dict(zip(held, grammar.mask_rows([rows[i].constraint for i in held], logits[held]))) if held else {}
        for i, (r, lg, best) in enumerate(zip(rows, logits, greedy)):
            if r.constraint is not None:  # the grammar's tokens only (logprobs stay the model's)
                masked = masks[i]
                if bool(masked.isneginf().all()):  # nothing can follow in this vocabulary: the answer ends here
                    self._finish(r, "stop")
                    done.append(r)
                    continue
                tok = self._sample(r, masked)
                r.constraint.advance(tok)
            else:
                tok = best if r.params.temperature == 0 and not r.params.penalised else self._sample(r, lg)
            if r.params.logprobs is not None:
                r.logprobs += logprob_entries(lg[None], [tok], r.params.logprobs)
            self.tokens_generated += 1
            r.first_token_at = r.first_token_at or now
            if reason := r.add_token(tok, self.codec.stop_ids, self.codec.decode, self.max_len):
                self._finish(r, reason)
                done.append(r)
        return done

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        if self.recorder is not None:
            r.trace = self.recorder.take(r.slot, r.id, r.task, len(r.prompt_ids), len(r.output_ids))
        if self.ecfg.prefix_reuse:
            self.slot_tokens[r.slot] = r.prompt_ids[: r.prefilled] + r.output_ids[: r.fed]
        self.free_slots.append(r.slot)
        if self.residency is not None:
            self.residency.observe(r)

    def text(self, r: Request) -> str:
        out = self.codec.decode(r.output_ids)
        for s in r.params.stop:
            if s in out:
                out = out[: out.index(s)]
        return out

    # -- convenience -----------------------------------------------------------------------------
    @torch.inference_mode()
    @contextlib.contextmanager
    def uncounted(self):
        """For scoring passes (teacher-forced, a metric's own) run through the served cache: its and the slow tier's
        counters are put back after them, so hit rate, bytes moved and read, host runs and stalls stay serving's, and
        a policy that watches the routing (adaptive.Adapt) does not see them. What the passes leave in an LRU cache
        stays."""
        saved = [(o, replace(o)) for o in (self.cache.stats, self.store.stats)]  # (reading .stats settles its counts)
        watch, self.dispatch._observe = self.dispatch._observe, None
        try:
            yield
        finally:
            self.dispatch._observe = watch
            self.cache.stats
            for o, was in saved:
                for f in fields(o):
                    setattr(o, f.name, getattr(was, f.name))

    def score(self, prompt_ids: list[int], continuation: list[int], task: str | None = None) -> torch.Tensor:
        """Teacher-forced logits [len(continuation), V] predicting each continuation token, computed
        under the current residency and miss policy (the strict accuracy metric)."""
        if not continuation or len(prompt_ids) + len(continuation) > self.max_len:
            raise ValueError("continuation must be non-empty and fit max_len")
        if not self.free_slots:
            raise RuntimeError("no free KV slot to score in")
        slot = self.free_slots[0]
        self.slot_tokens.pop(slot, None)  # its KV is about to be overwritten
        seq = prompt_ids + continuation[:-1]
        tokens = torch.tensor([seq], device=self.device)
        pos = torch.arange(len(seq), device=self.device)[None]
        valid = torch.ones_like(tokens, dtype=torch.bool)
        if hasattr(self.policy, "begin"):
            self.policy.begin([task] * len(seq))
        if self.recorder is not None:
            self.recorder.phase, self.recorder.owners = "prefill", torch.full((len(seq),), slot, device=self.device)
        logits = self.model.forward(tokens, pos, valid, self.dispatch, self.kv, torch.tensor([slot], device=self.device))
        if self.recorder is not None:  # routing of prompt + continuation, kept for analysis
            self.last_score_trace = self.recorder.take(slot, "score", None, len(prompt_ids), len(continuation))
        return logits[0, len(prompt_ids) - 1:]

    @property
    def max_rows(self) -> int:
        """Requests in flight at most: every KV slot, or the cap that concurrency.Concurrency measured cheapest."""
        return self.max_batch if self.concurrency is None else self.concurrency.cap

    def room(self) -> int:
        """Requests that may be admitted now: free KV slots, within max_rows in flight."""
        return max(0, min(len(self.free_slots), self.max_rows - len(self.running) - len(self.prefilling)))

    def generate(self, prompts: list, params: SamplingParams, tasks: list[str | None] | None = None,
                 chat: bool = True) -> list[Request]:
        """Run prompts to completion, keeping up to max_batch in flight (FCFS)."""
        waiting = [self.make_request(p, params, t, chat) for p, t in zip(prompts, tasks or [None] * len(prompts))]
        all_reqs = list(waiting)
        while waiting or self.running:
            n = min(self.room(), len(waiting))
            if n:
                self.admit(waiting[:n])
                waiting = waiting[n:]
            self.step()
        return all_reqs

    # what the CLI prints about a run (report.py)
    memory_line = memory_line
    summary = summary
