"""Prometheus metrics of one serving instance, named like vLLM's with an `emoe:` prefix.

Each `Metrics` owns its own CollectorRegistry (not prometheus-client's global one) so several servers
can live in one process (tests). The engine loop thread writes; `/metrics` renders `text()`.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# latency buckets cover a tiny CPU model (ms) up to a large model under load (minutes)
_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
        0.75, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str = "emoe"):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        L = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, L, buckets=buckets, registry=r).labels(model_name)

        def counter(name, doc, labels=()):
            c = Counter(name, doc, L + list(labels), registry=r)
            return c if labels else c.labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, L, registry=r).labels(model_name)

        self.ttft = hist("emoe:time_to_first_token_seconds", "Time from arrival to the first token.", _LAT)
        self.itl = hist("emoe:inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL)
        self.e2e = hist("emoe:e2e_request_latency_seconds", "Time from arrival to the last token.", _LAT)
        self.queue = hist("emoe:request_queue_time_seconds", "Time from arrival to admission.", _LAT)
        self.prompt_tokens = counter("emoe:prompt_tokens", "Prompt tokens prefilled.")
        self.prefix_reused = counter("emoe:prefix_reused_tokens",
                                     "Prompt tokens whose KV a slot still held from its last request (not prefilled).")
        self.generation_tokens = counter("emoe:generation_tokens", "Output tokens generated.")
        self._success = counter("emoe:request_success", "Finished requests by finish reason.", ["finished_reason"])
        self.expert_hits = counter("emoe:expert_hits", "Routed token-assignments whose expert was resident.")
        self.expert_misses = counter("emoe:expert_misses", "Routed token-assignments whose expert was not resident.")
        self.expert_bytes_loaded = counter("emoe:expert_bytes_loaded", "Expert bytes moved into the fast tier.")
        self.expert_shadow_runs = counter("emoe:expert_shadow_runs", "Expert runs on a low-bit copy (a miss not rerouted).")
        self.expert_host_runs = counter("emoe:expert_host_runs", "Expert runs on the host, in the slow tier (a miss run in place).")
        self._slo_met = counter("emoe:slo_met", "Finished requests that met both TTFT and TPOT SLOs.", ["task"])
        self._slo_missed = counter("emoe:slo_missed", "Finished requests that missed an SLO.", ["task"])
        self.running = gauge("emoe:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("emoe:num_requests_waiting", "Requests waiting for admission.")
        self.resident_bytes = gauge("emoe:resident_expert_bytes", "Bytes of routed experts resident.")
        self.budget_bytes = gauge("emoe:expert_budget_bytes", "Byte budget of resident routed experts.")
        self.kv_bytes = gauge("emoe:kv_cache_bytes", "Bytes of the KV cache (all slots).")
        self.refusals = counter("emoe:scheduler_refusals", "Admissions refused to protect a running request's SLO.")
        self.late = counter("emoe:scheduler_late_admissions", "Requests admitted already unable to meet their TTFT.")
        self.step_base = gauge("emoe:decode_step_base_seconds", "Fitted decode step cost a (step = a + c·n).")
        self.step_per_req = gauge("emoe:decode_step_per_request_seconds", "Fitted decode step cost c per request.")
        self._last = (0, 0, 0, 0, 0, 0)  # already counted: hits, misses, bytes loaded, shadow and host runs, reused
        self._last_sched = (0, 0)  # scheduler counters already counted: refusals, late admissions

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def slo(self, task: str | None, met: bool) -> None:
        (self._slo_met if met else self._slo_missed).labels(self.model_name, task or "unknown").inc()

    def sync_engine(self, engine, running: int, waiting: int) -> None:
        """Counters from the cache's cumulative stats (deltas since the last call) and the gauges."""
        s = engine.cache.stats
        now = (s.hits, s.misses, s.bytes_loaded, s.shadow_uses, s.host_runs, engine.reused_tokens)
        # stats can only grow, except when someone resets them; then count from zero again
        last = self._last if all(a >= b for a, b in zip(now, self._last)) else (0,) * len(now)
        for c, a, b in zip((self.expert_hits, self.expert_misses, self.expert_bytes_loaded, self.expert_shadow_runs,
                            self.expert_host_runs, self.prefix_reused), now, last):
            c.inc(a - b)
        self._last = now
        self.running.set(running)
        self.waiting.set(waiting)
        self.resident_bytes.set(engine.cache.used_bytes)
        self.budget_bytes.set(engine.cache.budget_bytes)
        self.kv_bytes.set(engine.kv.nbytes)

    def sync_scheduler(self, scheduler, ctx) -> None:
        """What the scheduler decided and believes: refusal and late-admission counts, the fitted step cost."""
        r, l = self._last_sched
        self.refusals.inc(max(0, scheduler.refusals - r))
        self.late.inc(max(0, scheduler.late_admissions - l))
        self._last_sched = (scheduler.refusals, scheduler.late_admissions)
        self.step_base.set(ctx.step_base_s)
        self.step_per_req.set(ctx.token_cost_s)

    def text(self) -> bytes:
        return generate_latest(self.registry)
