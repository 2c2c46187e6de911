"""The loop's measured step costs and the join decision they make (``actors/step_cost.py``): pure logic, and the
loop's admission using them."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from actors.step_cost import StepCosts, StepTimer, step_costs, work
from zimage_common.config import JoinPolicy

K = 23040.0  # 6 x 3840: the full model's attention length


def costs(**by_lengths) -> StepCosts:
    c = StepCosts(K)
    for lengths, seconds in by_lengths.values():
        c.observe(work(lengths, K), seconds)
    return c


def test_estimates_come_from_what_was_measured_and_nothing_is_guessed_above_it():
    c = costs(one=((1100,), 0.030), two=((1100, 1100), 0.045))
    assert c.estimate(work((1100,), K)) == pytest.approx(0.030)
    mid = c.estimate(work((1650,), K))
    assert 0.030 < mid < 0.045  # between the measured buckets
    assert c.estimate(work((800,), K)) == pytest.approx(0.030)  # smaller, within 2x: no slower than the smallest
    assert c.estimate(work((200,), K)) is None  # far below what was measured
    assert c.estimate(work((1100,) * 3, K)) is None  # above: how much batching gains there is not known
    c.observe(work((1100,), K), 0.5)  # a slow outlier (a compile, a shared GPU) does not raise the estimate
    assert c.estimate(work((1100,), K)) == pytest.approx(0.030)


def test_timeline_counts_each_sample_until_it_leaves():
    c = costs(one=((1000,), 1.0), two=((1000, 1000), 1.5))
    total, end = c.timeline([((1000,), 2), ((1000,), 4)])
    assert end == pytest.approx(2 * 1.5 + 2 * 1.0) and total == pytest.approx(2 * 1.5 + end)


@pytest.mark.parametrize("pair, joins", [(0.040, True), (0.052, False)])
def test_equal_samples_join_where_a_pair_step_costs_less_than_one_and_a_half_lone_ones(pair, joins):
    """Two equal 9-step samples: joining at any step lowers the summed completion times iff a pair's step costs less
    than 1.5 lone ones (the second's wait saved against both slowed)."""
    c = costs(one=((1100,), 0.030), two=((1100, 1100), pair))
    assert all(c.pays([((1100,), 9 - k)], ((1100,), 9)) is joins for k in range(1, 9))


def test_a_short_request_joins_a_long_one_at_a_size_that_saturates_the_gpu():
    c = costs(one=((4200,), 0.090), two=((4200, 4200), 0.170))
    assert c.pays([((4200,), 6)], ((4200,), 9)) is False  # an equal newcomer waits
    assert c.pays([((4200,), 48)], ((4200,), 2)) is True  # a 2-step one beside 48 steps left does not
    assert c.pays([((4200,), 5), ((4200,), 5)], ((4200,), 9)) is None  # three at once: never measured


def test_the_timer_folds_step_times_into_the_costs():
    now = [0.0]
    c = StepCosts(K)
    t = StepTimer(c, None, clock=lambda: now[0])
    t.start(work((1000,), K))
    now[0] = 0.25
    t.stop()
    t.start(work((1000,), K))
    t.abandon()  # a failed step says nothing
    t.stop()
    assert c.estimate(work((1000,), K)) == pytest.approx(0.25) and list(c._times.values())[0] == deque([0.25])


def test_step_costs_live_on_the_engine_and_fakes_have_none():
    engine = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(dim=64)))
    assert step_costs(engine) is step_costs(engine) and step_costs(engine).attn_tokens == 6 * 64
    assert step_costs(None) is None and step_costs(SimpleNamespace()) is None


def _sample(name: str, side: int, steps: int, step: int = 0, caption: int = 0):
    from actors.steploop import RunningSample

    return RunningSample(name, 0, torch.zeros(16, side, side), torch.zeros(caption, 4), None, 0.0, None, steps,
                         step=step)


def _admitted(engine, running, waiting, policy=None):
    from actors.steploop import StepLoop

    loop = StepLoop(engine, policy=policy)
    loop._running, loop._waiting = list(running), deque(waiting)
    loop._admit()
    return [s.name for s in loop._running]


def test_the_loop_joins_by_its_measured_costs_and_falls_back_on_its_rules():
    """A 64x64-latent sample (1,024 image tokens) that ran one step: the rules (``window`` 1) would let an equal
    newcomer in; the measured costs decide instead where they know the sets, both ways."""
    engine = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(dim=64)), devices={})
    c = step_costs(engine)
    one, two = work((1024,), c.attn_tokens), work((1024, 1024), c.attn_tokens)
    assert _admitted(engine, [_sample("a", 64, 9, step=1)], [_sample("b", 64, 9)]) == ["a", "b"]  # rules: window
    c.observe(one, 0.030)
    c.observe(two, 0.058)  # a pair's step nearly twice a lone one: the newcomer waits
    assert _admitted(engine, [_sample("a", 64, 9, step=1)], [_sample("b", 64, 9)]) == ["a"]
    engine.step_costs = None
    c = step_costs(engine)
    c.observe(one, 0.030)
    c.observe(two, 0.036)  # nearly free: it joins even where the rules say no (past the window, over free_tokens)
    assert _admitted(engine, [_sample("a", 64, 9, step=5)], [_sample("b", 64, 9)],
                     policy=JoinPolicy(free_tokens=0, window=0, short_ratio=0)) == ["a", "b"]
    # ``never`` (router.scheduling = batch) is never overruled
    assert _admitted(engine, [_sample("a", 64, 9, step=5)], [_sample("b", 64, 9)],
                     policy=JoinPolicy(never=True)) == ["a"]
