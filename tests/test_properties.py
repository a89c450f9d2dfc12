"""Property-based tests (hypothesis) of the plan and the naming functions every shard relies on."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from synthgen.config import GenerateConfig
from synthgen.plan import BALANCES, MODES, PlanConfig, Planner
from synthgen.shards import MAX_SHARD_SIZE, MAX_SHARDS, sample_key

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_config(n: int, shard_size: int, oversample: int, filtered: bool) -> GenerateConfig:
    # pack/bank are never opened by these functions; any path will do.
    return GenerateConfig(n=n, out="unused", pack="unused", shard_size=shard_size, max_oversample=oversample,
                          min_score=0.0 if filtered else None)


configs = st.builds(make_config, n=st.integers(1, 10**7), shard_size=st.integers(1, MAX_SHARD_SIZE),
                    oversample=st.integers(1, 16), filtered=st.booleans())


@SETTINGS
@given(cfg=configs)
def test_shard_targets_add_up_to_n(cfg):
    targets = [cfg.shard_target(k) for k in range(cfg.num_shards)] if cfg.num_shards < 5000 else None
    if targets is not None:
        assert sum(targets) == cfg.n and all(1 <= t <= cfg.shard_size for t in targets)
    last = cfg.num_shards - 1
    assert cfg.shard_target(last) == cfg.n - last * cfg.shard_size and 1 <= cfg.shard_target(last) <= cfg.shard_size
    assert cfg.num_shards <= MAX_SHARDS or cfg.n > MAX_SHARDS


@SETTINGS
@given(cfg=configs, data=st.data())
def test_candidate_ranges_tile_the_id_space(cfg, data):
    """Shard k owns [k*B, (k+1)*B): every candidate id has exactly one shard, and ranges never overlap."""
    budget = cfg.candidate_budget
    assert budget == cfg.shard_size * (cfg.max_oversample if cfg.min_score is not None else 1)
    candidate = data.draw(st.integers(0, cfg.num_shards * budget - 1))
    owners = [k for k in range(max(0, candidate // budget - 1), candidate // budget + 2)
              if k * budget <= candidate < (k + 1) * budget]
    assert owners == [candidate // budget]
    k = data.draw(st.integers(0, cfg.num_shards - 1))
    first, last = k * budget, (k + 1) * budget - 1  # the shard's first and last candidate ids
    assert first // budget == last // budget == k and (last + 1) // budget == k + 1  # no gap, no overlap
    assert k == 0 or (first - 1) // budget == k - 1
    assert cfg.shard_target(k) <= budget  # a shard's target always fits its budget


@SETTINGS
@given(n=st.integers(1, 5000), shard_size=st.integers(1, 300))
def test_unfiltered_sample_ids_map_to_exactly_one_shard_and_key(n, shard_size):
    cfg = make_config(n, shard_size, 1, False)
    keys = {}
    for k in range(cfg.num_shards):
        for index in range(cfg.shard_target(k)):
            sample_id = k * cfg.candidate_budget + index  # unfiltered: the shard writes its ids in order
            assert sample_id not in keys
            keys[sample_id] = sample_key(k, index)
    assert sorted(keys) == list(range(n))
    assert len(set(keys.values())) == n and all("." not in key for key in keys.values())


@SETTINGS
@given(pairs=st.lists(st.tuples(st.integers(0, MAX_SHARDS - 1), st.integers(0, MAX_SHARD_SIZE - 1)),
                      min_size=1, max_size=200, unique=True))
def test_keys_are_unique_dot_free_fixed_width_and_sort_like_their_pairs(pairs):
    keys = [sample_key(s, i) for s, i in pairs]
    assert len(set(keys)) == len(keys)
    assert all(len(k) == 11 and k.isdigit() for k in keys)
    assert sorted(keys) == [sample_key(s, i) for s, i in sorted(pairs)]
    assert [(int(k[:6]), int(k[6:])) for k in keys] == pairs


# ---- the plan --------------------------------------------------------------------------------------


@st.composite
def planners(draw):
    mode = draw(st.sampled_from(MODES))
    need = 2 if mode == "interpolate" else 1
    sizes = draw(st.lists(st.integers(need, 6), min_size=1, max_size=6))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    labels = draw(st.permutations(labels.tolist()))
    config = PlanConfig(mode=mode, lam=0.1 if mode == "perturb" else 0.0, balance=draw(st.sampled_from(BALANCES)),
                        seed=draw(st.integers(0, 2**63 - 1)))
    return Planner(np.array(labels), [f"c{i}" for i in range(len(sizes))], config)


ids_strategy = st.lists(st.integers(0, 2**40), min_size=1, max_size=40)


def as_tuple(plan, i):
    return (plan.seeds[i], plan.labels[i], plan.anchor_a[i], plan.anchor_b[i], plan.mix[i])


@SETTINGS
@given(planner=planners(), ids=ids_strategy, data=st.data())
def test_plan_is_a_pure_function_of_each_id(planner, ids, data):
    ids = np.array(ids, dtype=np.int64)
    whole = planner.plan(ids)
    cut = data.draw(st.integers(0, len(ids)))
    parts = [planner.plan(ids[:cut]), planner.plan(ids[cut:])] if 0 < cut < len(ids) else [planner.plan(ids)]
    order = data.draw(st.permutations(range(len(ids))))
    shuffled = planner.plan(ids[list(order)])
    pieces = [(p, i) for p in parts for i in range(len(p.sample_ids))]
    for row, (p, i) in enumerate(pieces):
        assert as_tuple(whole, row) == as_tuple(p, i)
    for row, src in enumerate(order):
        assert as_tuple(shuffled, row) == as_tuple(whole, src)


@SETTINGS
@given(planner=planners(), ids=ids_strategy)
def test_plan_anchors_are_rows_of_the_planned_class(planner, ids):
    plan = planner.plan(np.array(ids, dtype=np.int64))
    n_rows, mode = len(planner.labels), planner.config.mode
    assert ((0 <= plan.anchor_a) & (plan.anchor_a < n_rows) & (0 <= plan.anchor_b) & (plan.anchor_b < n_rows)).all()
    assert (planner.labels[plan.anchor_a] == plan.labels).all()
    assert (planner.labels[plan.anchor_b] == plan.labels).all()
    if mode == "interpolate":
        assert (plan.anchor_a != plan.anchor_b).all() and ((0 <= plan.mix) & (plan.mix <= 1)).all()
    else:
        assert (plan.anchor_a == plan.anchor_b).all() and (plan.mix == 0).all()


@SETTINGS
@given(planner=planners(), start=st.integers(0, 2**40))
def test_class_balance_cycles_through_every_class(planner, start):
    assume(planner.config.balance == "class")  # "bank" follows the bank's distribution instead
    c = len(planner.class_order)
    plan = planner.plan(np.arange(start, start + 3 * c, dtype=np.int64))
    for block in plan.labels.reshape(3, c):
        assert sorted(block.tolist()) == sorted(planner.class_order.tolist())
