"""The tune's settings and its search over configurations (Tuner): coarse sweep, refinement,
rate probes, the winner at each rate. run.py drives one tune from the server's start to the
written report; cli.py builds the settings from the command line."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from server.tools.launcher import Launched
from server.tune.budget import Budget, coarse_count, plan_for_budget
from server.tune.candidates import as_json, changed_fields, check, to_proto
from server.tune.measure import Target, measure
from server.tune.report import Outcome, progress_line
from server.tune.search import (
    PROBE_STEP,
    TIE_BREAK_RULE,
    Candidate,
    Measurement,
    Offer,
    Space,
    break_even,
    capacities,
    choose,
    clearly_fails,
    closest,
    coarse_candidates,
    meets,
    neighbours,
    pareto_front,
    survivors,
    tie_break,
)
from server.tune.target import LoadRefused, instances_in_force, load, served_config, threads_in_force


@dataclass(frozen=True)
class TuneSettings:
    """Everything a tune is told, checked (cli.py). The fields are in the command line's order and
    carry its flags' names: the report repeats them as its "arguments"."""

    model_repository: Path
    model: str
    p99_ms: float
    rate: float | None  # the traffic the written config is chosen for; None: the highest of `rates`
    rates: tuple[float, ...]  # sorted, `rate` among them
    device_price: tuple[str, ...]  # DEVICE=DOLLARS_PER_HOUR, as the server's flag
    budget_minutes: float
    out: Path | None
    write_config: bool
    url: str | None  # a running server on loopback; None: the tool starts its own
    metrics_url: str | None  # with `url`: its /metrics
    max_request_rows: int
    shape: tuple[str, ...]  # as given; `dims` is what the requests are built from
    seed: int
    dims: dict[str, list[int]]


@dataclass(frozen=True)
class Baseline:
    """The model's own configuration, where the search starts and what every candidate changes,
    and the space the search walks."""

    proto: object  # its config.pbtxt as a ModelConfig message
    own: Candidate
    space: Space


@dataclass(frozen=True)
class Server:
    """The server under load: where it answers, and whether the tool started it."""

    channel: grpc.aio.Channel
    url: str
    metrics_url: str
    launched: Launched | None


REPLICAS_NOTE = (
    "one server's cost at a given traffic is its devices' price divided by the rate, whatever the configuration: "
    "configurations differ in money through the highest rate each sustains within the p99 (hence the replicas a "
    "traffic needs: replicas = ceil(rate / sustained rate), cost = replicas x price / rate), through energy on GPUs, "
    "and through the price of the device they need"
)


class Tuner:
    """The search for one model: coarse sweep, refinement, rate probes, then the conclusions."""

    def __init__(self, settings: TuneSettings, target: Target, baseline: Baseline, budget: Budget) -> None:
        self.settings, self.target, self.budget = settings, target, budget
        self.channel = target.channel
        self.own_proto, self.own, self.space = baseline.proto, baseline.own, baseline.space
        self.plan = plan_for_budget(budget.seconds)
        self.outcome = Outcome()
        self.candidates: dict[str, Candidate] = {}
        self.facts: dict[str, dict] = {}
        self.loaded: str | None = None
        self.load_s = 2.0  # until a load is timed: calibration takes about that
        self.seed = settings.seed

    @property
    def points(self) -> list[Measurement]:
        return self.outcome.measurements

    def note(self, message: str) -> None:
        self.outcome.notes.append(message)
        print(f"note: {message}", flush=True)

    async def apply(self, candidate: Candidate, phase: str) -> bool:
        """Load the configuration unless it serves already; False (recorded) when it is refused."""
        label = candidate.label
        if self.loaded == label:
            return True
        proto = to_proto(self.own_proto, self.own, candidate)
        record = self.outcome.configs.setdefault(
            label,
            {
                "config": json.loads(as_json(proto)),
                "phase": phase,
                "changed": changed_fields(candidate, self.own),
                "status": "measured",
            },
        )
        self.candidates[label] = candidate
        problem = check(proto, self.settings.model)
        if not problem:
            started = self.budget.spent
            try:
                await load(self.channel, self.settings.model, as_json(proto))
            except LoadRefused as err:
                problem = str(err)
            self.loaded, self.load_s = (
                (None, self.load_s) if problem else (label, max(0.1, self.budget.spent - started))
            )
        if problem:
            record.update(status="refused", reason=problem)
            print(f"refused: {label}: {problem}", flush=True)
            return False
        served = await served_config(self.channel, self.settings.model)
        self.facts[label] = {
            "resources": instances_in_force(served) * threads_in_force(served),
            "changes": len(record["changed"]),
        }
        provider = served.get("parameters", {}).get("execution_provider", {}).get("string_value")
        record.update(threads_in_force=threads_in_force(served), provider=provider)
        return True

    async def point(self, candidate: Candidate, rate: float, phase: str) -> Measurement | None:
        load_s = 0.0 if self.loaded == candidate.label else self.load_s
        if not self.budget.fits(self.plan.estimate_s(rate, load_s)) or not await self.apply(candidate, phase):
            return None
        self.seed += 100
        found = await measure(
            self.target, candidate.label, rate, self.plan, self.budget, self.facts[candidate.label], self.seed
        )
        self.points.append(found)
        print(progress_line(found, self.budget.spent, self.budget.seconds), flush=True)
        return found

    async def sweep(self, candidate: Candidate, phase: str) -> None:
        """Every target rate in increasing order; a clear failure ends it (higher rates cannot do better)."""
        for rate in self.settings.rates:
            found = await self.point(candidate, rate, phase)
            if found is None:
                if self.outcome.configs.get(candidate.label, {}).get("status") != "refused":
                    self.note(f"{candidate.label}: not measured at {rate:g}/s and above: the budget is spent")
                return
            if clearly_fails(found, self.settings.p99_ms, self.plan.tolerance) and rate != self.settings.rates[-1]:
                self.outcome.configs[candidate.label]["reason"] = (
                    f"fails the p99 at {rate:g}/s beyond the noise: higher rates not tried"
                )
                return

    def best(self) -> Candidate | None:
        choice = choose(self.settings.rates[-1], self.points, self.settings.p99_ms, self.plan.tolerance)
        found = (
            choice.config if choice else (closest(self.points, self.settings.p99_ms) or Measurement("", 0, 0, 0)).config
        )
        return self.candidates.get(found)

    async def coarse(self) -> None:
        tries = coarse_candidates(self.own, self.space)
        count = coarse_count(len(tries), self.settings.rates, self.plan, self.load_s, self.budget.remaining)
        if count < len(tries):
            self.note(
                f"coarse sweep: {count} of {len(tries)} configurations fit the budget; not tried: "
                + ", ".join(c.label for c in tries[count:])
            )
        for candidate in tries[:count]:
            await self.sweep(candidate, "coarse")

    async def refine(self) -> None:
        """Neighbours of the best (one step along each dimension); a better one becomes the centre.
        Stops while there is still time for one rate probe."""
        centre = self.best()
        queue = neighbours(centre, self.space) if centre else []
        reserve = self.plan.estimate_s(self.settings.rates[-1] * PROBE_STEP, self.load_s)
        while queue:
            if not self.budget.fits(reserve + self.plan.estimate_s(self.settings.rates[0], self.load_s)):
                untried = [c.label for c in queue if c.label not in self.outcome.configs]
                self.note(f"refinement stopped, budget spent; not tried: {', '.join(untried)}")
                return
            candidate = queue.pop(0)
            if candidate.label in self.outcome.configs:
                continue
            await self.sweep(candidate, "refine")
            if (new := self.best()) is not None and new != centre:
                centre = new
                queue = [c for c in neighbours(centre, self.space) if c.label not in self.outcome.configs] + queue

    async def probe(self) -> None:
        """The highest rate within the p99 for the leaders: x1.5 steps up from the highest rate any
        configuration met, short of a rate it is known to fail. When nothing met the target even at
        the lowest rate, the closest is tried at lower rates (what replicas could then serve)."""
        p99, tolerance = self.settings.p99_ms, self.plan.tolerance
        met = [p.rate for p in self.points if meets(p, p99)]
        if met:
            top, step = max(met), PROBE_STEP
            leaders = [
                p for p in self.points if p.rate == top and p.config in survivors(self.points, top, p99, tolerance)
            ]
            leaders.sort(key=lambda p: tie_break(p, p99, tolerance))
        elif near := closest(self.points, p99):
            leaders, step = [near], 1 / (2 * PROBE_STEP)
        else:
            return
        for leader in leaders[:2]:
            known_fail = capacities(self.points, p99, tolerance)[leader.config].failed_at
            rate = leader.rate
            while True:
                rate = round(rate * step, 3)
                if step > 1 and known_fail and rate >= known_fail:
                    break
                found = await self.point(self.candidates[leader.config], rate, "probe")
                if found is None:
                    self.note(f"{leader.config}: rate probe stopped before {rate:g}/s: the budget is spent")
                    return
                if (step > 1) != meets(found, p99) or rate < 0.5:
                    break

    def conclude(self, priced: dict) -> None:
        p99, tolerance, points = self.settings.p99_ms, self.plan.tolerance, self.points
        self.outcome.capacities = capacities(points, p99, tolerance)
        self.outcome.choices = [c for r in self.settings.rates if (c := choose(r, points, p99, tolerance))]
        for rate in self.settings.rates:
            self.outcome.pareto[rate] = [
                p.config for p in pareto_front([p for p in points if p.rate == rate], tolerance)
            ]
        self.outcome.break_even = self.devices(priced)
        for device in sorted({d for p in points for d in p.devices if d in priced and priced[d].dollars_per_hour == 0}):
            self.note(
                f"{device} is priced $0/h ({priced[device].source}): configurations on it look free; "
                f"give --device-price {device}=DOLLARS_PER_HOUR"
            )
        if not self.outcome.choices:
            near = closest(points, p99)
            tried = ", ".join(f"{r:g}" for r in sorted({p.rate for p in points}))
            message = f"no configuration met p99 <= {p99:g} ms at any rate measured ({tried}/s)"
            if near:
                message += (
                    f"; the closest: {near.config} at {near.rate:g}/s, p99 {near.p99_ms:.3g} ms, {near.errors} errors"
                )
            self.outcome.failure = {"message": message, "closest": asdict(near) if near else None}
            print(f"NO CONFIGURATION MEETS THE TARGET: {message}", flush=True)
        if any(c.tied_with for c in self.outcome.choices):
            self.note(f"ties within the noise are {TIE_BREAK_RULE}")

    def devices(self, priced: dict) -> dict:
        groups: dict[str, Offer] = {}
        for label, cap in self.outcome.capacities.items():
            if cap and cap.rate:
                anchor = next(p for p in self.points if p.config == label and p.rate == cap.rate)
                device = "+".join(anchor.devices)
                if device not in groups or cap.rate > groups[device].sustained:
                    groups[device] = Offer(device, anchor.price_per_hour, cap.rate, label)
        if len(groups) < 2:
            why = "no GPU here, " if not any(d.startswith("cuda") for d in priced) else ""
            return {
                "note": f"not computed: only one device was measured ({', '.join(groups) or 'none'}; {why}"
                "price and tune on machines with other devices to compare)"
            }
        changes = break_even(list(groups.values()), self.settings.rates[-1] * 10)
        note = "; ".join(f"from {rate:g}/s {device} is cheaper" for rate, device in changes)
        return {"note": note, "changes": changes, "offers": [asdict(o) for o in groups.values()]}
