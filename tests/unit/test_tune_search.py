"""onnxserve-tune's search on hand-written measurement tables: pruning, the Pareto front, the
highest rate within the p99, replicas, ties within the noise, the honest failure, the budget."""

import dataclasses

import pytest

from server.tune.budget import Budget, coarse_count, plan_for_budget
from server.tune.search import (
    Candidate,
    Measurement,
    Offer,
    break_even,
    capacities,
    capacity,
    choose,
    clearly_fails,
    closest,
    coarse_candidates,
    cost_per_million,
    dominates,
    make_space,
    meets,
    neighbours,
    pareto_front,
    replicas_needed,
    survivors,
)

P99 = 50.0
TOL = 0.15
CPU = 0.0892  # $/h, the default price of a 2-core machine


def point(
    config: str, rate: float, p99: float, noise: float = 0.05, errors: int = 0, price: float = CPU, **more
) -> Measurement:
    """A measurement as the tuner records it; cost is what one replica's price comes to at that rate."""
    return Measurement(
        config,
        rate,
        p50_ms=p99 / 3,
        p99_ms=p99,
        throughput=rate,
        requests=1000,
        errors=errors,
        cost_per_million=cost_per_million(rate, 1, price),
        noise=noise,
        price_per_hour=price,
        **more,
    )


def test_a_clear_failure_is_pruned_and_one_inside_the_noise_is_not():
    assert clearly_fails(point("a", 100, 80), P99, TOL)  # 60% over, noise 5%
    assert not clearly_fails(point("a", 100, 55), P99, TOL)  # 10% over: inside the 15% tolerance
    assert not clearly_fails(point("a", 100, 70, noise=0.5), P99, TOL)  # 40% over, but its windows differed by 50%
    assert clearly_fails(point("a", 100, 10, errors=5), P99, TOL)  # fast, but 0.5% of requests failed
    assert not meets(point("a", 100, 55), P99) and meets(point("a", 100, 50), P99)


def test_pareto_front_keeps_the_points_no_other_beats_beyond_the_noise():
    cheap_slow = dataclasses.replace(point("cheap", 100, 40), cost_per_million=1.0)
    dear_fast = dataclasses.replace(point("dear", 100, 10), cost_per_million=2.0)
    dominated = dataclasses.replace(point("worse", 100, 45), cost_per_million=2.5)
    near_twin = dataclasses.replace(point("twin", 100, 42), cost_per_million=1.05)  # within 15% of cheap_slow on both
    front = pareto_front([cheap_slow, dear_fast, dominated, near_twin], TOL)
    assert [p.config for p in front] == ["cheap", "twin", "dear"]
    assert dominates(dear_fast, dominated, TOL) and not dominates(cheap_slow, near_twin, TOL)


def test_highest_rate_within_the_p99_stops_at_the_first_clear_failure():
    table = [point("a", 100, 20), point("a", 300, 35), point("a", 1000, 400), point("a", 1500, 45)]
    cap = capacity(table, P99, TOL)
    assert (cap.rate, cap.failed_at) == (300, 1000)  # 1500 "met" above a clear failure: noise, not capacity
    lower_bound = capacity([point("b", 100, 20), point("b", 300, 56)], P99, TOL)  # 12% over: not a clear failure
    assert (lower_bound.rate, lower_bound.failed_at) == (100, None)
    assert capacity([point("c", 100, 90)], P99, TOL).rate is None


def test_replicas_price_a_rate_one_server_cannot_carry():
    assert replicas_needed(1000, 300) == 4 and replicas_needed(600, 300) == 2 and replicas_needed(100, 300) == 1
    assert cost_per_million(100, 1, 3.6) == pytest.approx(10.0)  # $3.6/h = $0.001/s; 100/s -> $10 per million
    table = [
        point("small", 100, 10, resources=1),
        point("small", 300, 20, resources=1),
        point("small", 1000, 900, resources=1),
        point("wide", 100, 15, resources=2),
        point("wide", 300, 25, resources=2),
        point("wide", 1000, 45, resources=2),
    ]
    at_1000 = choose(1000, table, P99, TOL)
    assert (at_1000.config, at_1000.replicas) == ("wide", 1)
    assert at_1000.cost_per_million == pytest.approx(cost_per_million(1000, 1, CPU))
    without_wide = choose(1000, [p for p in table if p.config == "small"], P99, TOL)
    assert (without_wide.config, without_wide.replicas) == ("small", 4)  # 300/s each
    assert without_wide.cost_per_million == pytest.approx(4 * at_1000.cost_per_million)
    assert "4 replicas" in without_wide.reason and without_wide.measured is None


def test_configurations_that_cost_the_same_within_the_noise_are_tied_and_the_rule_picks_one():
    table = [
        point("two-instances", 100, 12, resources=2),
        point("one-thread", 100, 30, resources=1),
        point("changed-more", 100, 20, resources=1, changes=3),
    ]
    choice = choose(100, table, P99, TOL)
    assert choice.config == "one-thread"  # same price, same replicas: fewer cores busy, then fewer changes
    assert set(choice.tied_with) == {"two-instances", "changed-more"} and "tied" in choice.reason
    assert choose(100, [table[0]], P99, TOL).tied_with == ()


def test_a_winner_meeting_the_p99_only_inside_its_noise_loses_the_tie():
    marginal = point("marginal", 100, 48, noise=0.3, resources=1)  # 48 ms +- 30% may well be 62 ms
    robust = point("robust", 100, 20, noise=0.05, resources=2)
    assert choose(100, [marginal, robust], P99, TOL).config == "robust"


def test_a_dearer_device_is_not_a_tie_and_break_even_says_where_it_pays():
    table = [point("cpu", 100, 30, price=0.1), point("gpu", 100, 5, price=2.0)]
    assert choose(100, table, P99, TOL).config == "cpu" and choose(100, table, P99, TOL).tied_with == ()
    offers = [Offer("cpu", 0.1, 100, "cpu"), Offer("cuda:0", 2.0, 5000, "gpu")]
    # The CPU needs ceil(rate/100) servers at $0.1/h: above 2,000/s, 21 of them cost more than one GPU.
    assert break_even(offers, 10000) == [(0.0, "cpu"), (2000.0, "cuda:0")]
    assert break_even(offers[:1], 10000) == []


def test_when_nothing_meets_the_p99_there_is_no_winner_and_the_closest_is_named():
    table = [point("a", 100, 90), point("b", 100, 70), point("b", 300, 60), point("c", 100, 65, errors=50)]
    assert choose(100, table, P99, TOL) is None and choose(300, table, P99, TOL) is None
    assert closest(table, P99).config == "b" and closest(table, P99).rate == 100  # c is faster but fails requests
    assert closest(table + [point("d", 300, 55)], P99).config == "b"  # judged at the lowest rate, where all were tried
    assert closest([], P99) is None


def test_survivors_are_the_undominated_configurations_that_met_the_rate():
    table = [point("fast", 300, 10), point("slow", 300, 40), point("failed", 300, 90), point("fast", 100, 5)]
    assert survivors(table, 300, P99, TOL) == {"fast"}  # slow is as dear and 4x slower


def test_budget_accounting_and_the_plan_it_sizes():
    now = [100.0]
    budget = Budget(60, clock=lambda: now[0])
    now[0] += 45
    assert budget.spent == 45 and budget.remaining == 15
    assert budget.fits(15) and not budget.fits(15.5)
    short, long = plan_for_budget(60), plan_for_budget(600)
    assert (
        short.window_s(50) == short.max_window_s < long.window_s(50)
    )  # 2,000 requests at 50/s: longer than either allows
    assert long.window_s(10_000) == long.min_window_s  # 0.2 s would do; never shorter than the minimum
    assert short.estimate_s(50, 3.0) == pytest.approx(3.0 + short.warmup_s + 3 * short.window_s(50) + short.overhead_s)
    per_config = short.estimate_s(50, 3.0) + short.estimate_s(200, 0.0)
    assert coarse_count(7, [50, 200], short, 3.0, per_config * 10) == 6  # 60% of ten configurations' time
    assert coarse_count(7, [50, 200], short, 3.0, 1.0) == 2  # never fewer than two: a comparison
    assert coarse_count(1, [50, 200], short, 3.0, 1.0) == 1


def test_candidates_respect_the_cores_and_step_one_value_at_a_time():
    own = Candidate(max_batch_size=16, queue_delay_us=100_000)
    space = make_space(own, batchable=True, cores=2, gpu=False)
    assert 16 in space.max_batch_sizes and 100_000 in space.queue_delays_us  # the model's own values are kept
    coarse = coarse_candidates(own, space)
    assert coarse[0] == own and len(set(coarse)) == len(coarse)
    assert all(c.instances * max(1, c.threads) <= 2 and c.accelerator == "" for c in coarse)
    assert all(c.queue_delay_us == 0 for c in coarse if c.max_batch_size <= 1)  # nothing to wait for
    steps = neighbours(Candidate(max_batch_size=8, queue_delay_us=500, threads=1), space)
    assert Candidate(max_batch_size=1, threads=1) in steps  # b1: its delay normalised away
    assert Candidate(max_batch_size=16, queue_delay_us=500, threads=1) in steps
    assert Candidate(max_batch_size=8, queue_delay_us=2000, threads=1) in steps
    assert Candidate(max_batch_size=8, queue_delay_us=500, instances=2, threads=1) in steps
    centre = Candidate(max_batch_size=8, queue_delay_us=500, threads=1)
    moved = [[f for f in Candidate.__dataclass_fields__ if getattr(c, f) != getattr(centre, f)] for c in steps]
    assert all(len(fields) == 1 or fields == ["max_batch_size", "queue_delay_us"] for fields in moved)
    two_rows = make_space(own, batchable=True, cores=2, gpu=False, request_rows=2)  # clients send up to 2 rows
    assert 1 not in two_rows.max_batch_sizes and all(c.max_batch_size >= 2 for c in coarse_candidates(own, two_rows))
    assert Candidate(max_batch_size=1) not in neighbours(Candidate(max_batch_size=8), two_rows)
    assert Candidate(max_batch_size=1) not in neighbours(Candidate(max_batch_size=1), space)  # a delay step on b1 is b1
    gpu = make_space(Candidate(kind="gpu", max_batch_size=32), batchable=True, cores=16, gpu=True)
    assert any(
        c.accelerator == "tensorrt_fp16" for c in coarse_candidates(Candidate(kind="gpu", max_batch_size=32), gpu)
    )
    assert capacities([], P99, TOL) == {}


def test_server_side_quantiles_interpolate_within_buckets_as_prometheus_does():
    from server.tune.measure import bucket_quantile

    buckets = [(0.001, 50.0), (0.0025, 90.0), (0.005, 100.0), (float("inf"), 100.0)]
    assert bucket_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert bucket_quantile(buckets, 0.99) == pytest.approx(0.0025 + 0.0025 * 9 / 10)
    assert bucket_quantile([(0.001, 0.0), (float("inf"), 0.0)], 0.99) is None  # nothing answered: no figure
