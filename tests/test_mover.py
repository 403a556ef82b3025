"""loader.Mover: a plan's loads land on a worker thread. The cache holds, counts and budgets each admitted expert
at once, a read of its weights waits for it, and a failed copy raises where the weights are read."""
import threading

import pytest
import torch

from emoe.cache import BudgetError, ExpertCache
from emoe.loader import Mover

LAYERS, EXPERTS, I, H = 2, 4, 2, 3
NUMEL = 3 * I * H
EB = NUMEL * 4


class GatedStore:
    """Reads encode their key; landing them (the unpack, on the mover's thread) waits for `gate`."""

    def __init__(self):
        self.gate, self.fail = threading.Event(), set()

    def read(self, layer, expert):
        v = float(layer * 100 + expert)
        return (torch.full((I, H), v), torch.full((I, H), v + 0.25), torch.full((H, I), v + 0.5))

    def read_packed(self, layer, expert):
        def unpack(ts):
            self.gate.wait(5)
            if (layer, expert) in self.fail:
                raise OSError(f"read of {layer}/{expert} failed")
            return ts
        return self.read(layer, expert), unpack


@pytest.fixture
def cache():
    store = GatedStore()
    c = ExpertCache(store, 3 * EB, "cpu", torch.float32, LAYERS, EXPERTS, NUMEL)
    c.mover = Mover(c.device, c.dtype)
    yield c
    store.gate.set()
    c.mover.close()


def test_a_landing_expert_is_held_and_budgeted_at_once_and_read_when_landed(cache):
    cache.set_resident({0: [1, 2]})  # returns while both copies wait at the gate
    assert cache.resident() == [(0, 1), (0, 2)] and cache.mask[0].tolist() == [False, True, True, False]
    assert cache.used_bytes == 2 * EB and cache.stats.loads == 2 and cache.stats.bytes_loaded == 2 * EB
    with pytest.raises(BudgetError):  # the landing ones count: a third and fourth expert do not fit
        cache.set_resident({0: [1, 2], 1: [0, 1]})
    assert cache.resident() == [(0, 1), (0, 2)] and cache.used_bytes == 2 * EB
    threading.Timer(0.05, cache.store.gate.set).start()
    w = cache.get(0, 2)  # waits for the copy
    assert w[0][0, 0] == 2.0 and w[2][0, 0] == 2.5
    assert cache.stats.wait_seconds > 0.01
    waited = cache.stats.wait_seconds
    assert cache.get(0, 2) is w and cache.stats.wait_seconds == waited  # landed: no wait again


def test_evicting_a_landing_expert_waits_for_it_and_frees_its_bytes(cache):
    cache.set_resident({0: [0, 1]})
    cache.store.gate.set()
    cache.set_resident({0: [1, 3]})
    assert cache.resident() == [(0, 1), (0, 3)] and cache.used_bytes == 2 * EB
    assert cache.get(0, 3)[1][0, 0] == 3.25 and cache.peek((0, 1))[0][0, 0] == 1.0


def test_a_copy_that_fails_raises_where_its_weights_are_read(cache):
    cache.store.fail.add((1, 2))
    cache.store.gate.set()
    cache.set_resident({1: [2, 3]})
    assert cache.get(1, 3)[0][0, 0] == 103.0  # the next copy in the same job still lands
    with pytest.raises(OSError, match="1/2 failed"):
        cache.get(1, 2)
