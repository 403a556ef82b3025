"""concurrency.Concurrency: the requests in flight moved toward the cap that measured the fewest bytes read per token."""
import pytest

from emoe.concurrency import Concurrency
from emoe.engine import Engine, EngineConfig, SamplingParams


def _drive(c: Concurrency, cost, windows: int) -> list[int]:
    """Runs `windows` full windows, each at the current cap, whose bytes per token are cost(cap)."""
    read = made = 0
    c.observe(c.cap, read, made)
    caps = []
    for _ in range(windows):
        caps.append(c.cap)
        for _ in range(c.window):  # one token a step, the cap's rows in flight
            read, made = read + cost(c.cap), made + 1
            c.observe(c.cap, read, made)
    return caps


def test_it_climbs_down_where_fewer_streams_read_less_and_stays_where_more_do():
    thrash = Concurrency(4, window=8, explore=2)  # the random model's case: each stream more evicts what the next reads
    caps = _drive(thrash, lambda b: 100 * b, 40)
    assert caps[0] == 4 and caps[-12:].count(1) >= 10 and thrash.trail  # (a try of 2 now and then)
    share = Concurrency(4, window=8, explore=2)  # the embedded model's: a read serves several rows
    caps = _drive(share, lambda b: 100 / b, 40)
    assert caps[0] == 4 and caps.count(4) >= 0.85 * len(caps) and share.cap == 4
    with pytest.raises(ValueError, match="slots"):
        Concurrency(0)


def test_a_window_the_cap_did_not_fill_measures_nothing():
    c = Concurrency(4, window=4)
    c.observe(1, 0, 0)
    for t in range(1, 20):
        c.observe(1, 1000 * t, t)  # one request at a time while the cap is 4: a short queue, not the cap
    assert c.cost == {} and c.cap == 4


def test_the_engine_admits_within_the_cap_from_disk_with_lru(qwen_gguf_import, forms_cache_on):
    eng = Engine(EngineConfig(str(qwen_gguf_import), device="cpu", miss_policy="load", budget=0.5, experts_on="disk", max_batch=4))
    assert eng.concurrency is not None and eng.max_rows == 4
    eng.concurrency.cap = 2
    seen, real = [], eng.step
    eng.step = lambda: seen.append(len(eng.running) + len(eng.prefilling)) or real()
    got = eng.generate(["hello there", "the cat sat on", "one more", "and another"], SamplingParams(max_tokens=6,
                                                                                                   ignore_eos=True),
                       chat=False)
    assert max(seen) == 2 and all(len(r.output_ids) == 6 for r in got)
    host = Engine(EngineConfig(str(qwen_gguf_import), device="cpu", miss_policy="host", budget=0.5, experts_on="disk", max_batch=4))
    assert host.concurrency is None and host.room() == 4  # a plan's reads serve every row: not capped
