"""How many requests run at once where every miss is a disk read loaded by LRU (formstore with `load`): measured.

More requests at once route a step to more experts. Where their rows share experts, a read serves several of them;
where they do not and the fast tier is small, each step evicts what the next one needs. Both happen: on a random
2.1 GiB Q4_K_M at a 505 MiB budget four prompts at once ran at 2.4 tokens/s (hit rate 0.01), one at a time at 5.8;
on the embedded model's task stream four at once read 15% less than one at a time. Static caps from the budget were
right on one and wrong on the other (docs/results/larger_than_ram.txt, run 5), so this measures the cost that
decides, bytes read per generated token, over windows at the current cap, and moves the cap to a neighbour that
measured cheaper (by `margin`): a hill climb over the caps one off and half or twice this one (the cost can fall
off a cliff where a step's experts outgrow the fast tier, past a plateau one step would not cross), which tries a
neighbour after `explore` windows and waits twice as long after each try that did not pay, so where the cap is
right it rarely leaves it.
"""
from __future__ import annotations


class Concurrency:
    def __init__(self, slots: int, window: int = 32, margin: float = 0.1, explore: int = 3):
        if slots < 1 or window < 1 or explore < 1 or not 0 <= margin < 1:
            raise ValueError(f"slots, window and explore must be >= 1 and margin in [0, 1), got {slots}, {window}, "
                             f"{explore} and {margin}")
        self.slots, self.cap, self.window, self.margin, self.explore = slots, slots, window, margin, explore
        self.cost: dict[int, float] = {}  # cap → read bytes per generated token, its latest full window
        self.trail: list[tuple[int, int]] = []  # (tokens generated, new cap): what a run reports
        self._start: tuple[int, int] | None = None  # (bytes read, tokens) at the window's start
        self._rows = self._steps = self._windows = self._tries = 0
        self._origin: int | None = None  # the cap a window tried a neighbour from
        self._wait = self._next = explore  # windows until the next try, doubled after each that did not pay

    def observe(self, rows: int, bytes_read: int, tokens: int) -> None:
        """After a step with `rows` requests in flight, the slow tier's bytes read and the tokens generated so far."""
        if self._start is None:
            self._start = (bytes_read, tokens)
            return
        self._rows += rows
        self._steps += 1
        spent, made = bytes_read - self._start[0], tokens - self._start[1]
        if made < self.window:
            return
        if abs(self._rows / self._steps - self.cap) <= 0.5:  # rows at the cap (not a short queue, not draining a higher one)
            self.cost[self.cap] = spent / made
            self._windows += 1
            self._move(tokens)
        self._start, self._rows, self._steps = (bytes_read, tokens), 0, 0

    def _move(self, tokens: int) -> None:
        here, cost = self.cap, self.cost
        near = sorted({b for b in (here - 1, here + 1, here // 2, 2 * here) if 1 <= b <= self.slots} - {here})
        if self._origin is not None:  # the window just measured tried `here` from `_origin`: kept only if cheaper
            origin, self._origin = self._origin, None
            new = here if cost[here] < cost[origin] * (1 - self.margin) else origin
            self._wait = self.explore if new == here else min(64, 2 * self._wait)  # a failed try waits twice as long
            self._next = self._windows + self._wait
        elif near and self._windows >= self._next:  # a neighbour tried (first the unmeasured ones)
            unknown = [b for b in near if b not in cost]
            new, self._origin = (unknown or near)[0 if unknown else self._tries % len(near)], here
            self._tries += 1
        else:
            best = min([here, *(b for b in near if b in cost)], key=cost.get)
            new = best if cost[best] < cost[here] * (1 - self.margin) else here
        if new != here:
            self.cap = new
            self.trail.append((tokens, new))
