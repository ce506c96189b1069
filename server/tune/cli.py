"""onnxserve-tune: the cheapest configuration of one model that meets a p99 latency target at
your traffic, measured on this machine, with the cost read from the server's own ledger.

    onnxserve-tune --model-repository DIR --model NAME --p99-ms 50 --rate 300 [--rates 100,300,1000]
                   [--device-price cpu=0.17] [--budget-minutes 10] [--out report.json] [--write-config]

It starts one onnxserve (explicit model control, loopback ports, REST off), or uses one already
running on loopback (--url), applies each configuration with RepositoryModelLoad and a JSON
`config`, and measures it under open-loop Poisson load. Coarse sweep, refinement around the best,
then rate probes for the leaders, all within --budget-minutes. See README, "What does my model
cost to serve?".
"""

import argparse
import asyncio
import json
import sys
import urllib.parse
from dataclasses import asdict
from pathlib import Path

import grpc

from server.config import DevicePriceSetting
from server.errors import ConfigError
from server.tools.loadgen import LoadError, build_request
from server.tune.candidates import as_json, changed_fields, check, own_candidate, own_config, to_proto, write_config
from server.tune.measure import Target, measure, model_devices, prices, read_metrics
from server.tune.report import Outcome, Sharing, document, machine, now_utc, progress_line, text
from server.tune.budget import Budget, coarse_count, plan_for_budget
from server.tune.search import (
    PROBE_STEP, TIE_BREAK_RULE, Candidate, Measurement, Offer, break_even, capacities, choose, clearly_fails, closest,
    coarse_candidates, make_space, meets, neighbours, pareto_front, survivors, tie_break,
)  # fmt: skip
from server.tune.target import (
    LoadRefused,
    ServerError,
    instances_in_force,
    launch,
    load,
    loopback_address,
    served_config,
    stop,
    threads_in_force,
)
from server.tune.target import metrics_url as metrics_url_of

REPLICAS_NOTE = (
    "one server's cost at a given traffic is its devices' price divided by the rate, whatever the configuration: "
    "configurations differ in money through the highest rate each sustains within the p99 (hence the replicas a "
    "traffic needs: replicas = ceil(rate / sustained rate), cost = replicas x price / rate), through energy on GPUs, "
    "and through the price of the device they need"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="onnxserve-tune", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model-repository", required=True, type=Path, help="the model repository directory")
    parser.add_argument("--model", required=True, help="the model to tune (a directory of the repository)")
    parser.add_argument("--p99-ms", required=True, type=float, help="the latency target: p99 in milliseconds")
    parser.add_argument("--rate", type=float, help="your traffic, requests per second: the config written is its winner")
    parser.add_argument("--rates", default="", help="comma-separated rates to measure as well, e.g. 100,300,1000")
    parser.add_argument("--device-price", action="append", default=[], metavar="DEVICE=DOLLARS_PER_HOUR",
                        help="as the server's flag, repeatable; default: the server's own prices")  # fmt: skip
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="the whole tune stays within this")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--write-config", action="store_true", help="write the winner as config.pbtxt (old one kept as .bak)")
    parser.add_argument("--url", help="tune a running onnxserve (explicit model control mode) at HOST:PORT on loopback")
    parser.add_argument("--metrics-url", help="with --url: its /metrics (default http://HOST:8002/metrics)")
    parser.add_argument("--max-request-rows", type=int, default=1,
                        help="the most rows your clients send in one request: max_batch_size is not tuned below it")  # fmt: skip
    parser.add_argument("--shape", action="append", default=[], help="NAME=D0,D1,... for an input with variable dims")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    args = parser.parse_args(argv)
    try:
        args.rates = sorted({float(r) for r in args.rates.split(",") if r.strip()} | ({args.rate} if args.rate else set()))
    except ValueError:
        parser.error(f"--rates: {args.rates!r} is not a comma-separated list of numbers")
    try:
        args.dims = {name: [int(d) for d in shape.split(",")] for name, shape in (item.split("=", 1) for item in args.shape)}
    except ValueError:
        parser.error(f"--shape: {args.shape} is not NAME=D0,D1,... with integer dims")
    problems = [
        (not args.rates, "--rate or --rates: give at least one rate"),
        (any(r <= 0 for r in args.rates), "--rate/--rates: rates are requests per second, > 0"),
        (args.p99_ms <= 0, "--p99-ms: must be > 0"),
        (args.budget_minutes <= 0, "--budget-minutes: must be > 0"),
        (args.max_request_rows < 1, "--max-request-rows: must be >= 1"),
        (not (args.model_repository / args.model).is_dir(), f"--model: {args.model_repository / args.model} is not a directory"),
        (bool(args.url and args.device_price), "--device-price: a running server (--url) keeps its own prices"),
    ]
    for bad, message in problems:
        if bad:
            parser.error(message)
    try:
        for price in args.device_price:
            DevicePriceSetting.parse(price, "flag", "--device-price")  # the server's own check, before it starts
        if args.url:
            args.url = loopback_address(args.url, "--url")
            args.metrics_url = args.metrics_url or f"http://{args.url.rpartition(':')[0]}:8002/metrics"
            loopback_address(urllib.parse.urlsplit(args.metrics_url).netloc, "--metrics-url")
    except (ConfigError, ServerError) as err:
        parser.error(str(err))
    return args


class Tuner:
    def __init__(self, args, channel, target: Target, own_proto, own: Candidate, space, budget: Budget) -> None:
        self.args, self.channel, self.target, self.budget = args, channel, target, budget
        self.own_proto, self.own, self.space = own_proto, own, space
        self.plan = plan_for_budget(budget.seconds)
        self.outcome = Outcome()
        self.candidates: dict[str, Candidate] = {}
        self.facts: dict[str, dict] = {}
        self.loaded: str | None = None
        self.load_s = 2.0  # until a load is timed: calibration takes about that
        self.seed = args.seed

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
        record = self.outcome.configs.setdefault(label, {"config": json.loads(as_json(proto)), "phase": phase,
                                                         "changed": changed_fields(candidate, self.own), "status": "measured"})  # fmt: skip
        self.candidates[label] = candidate
        problem = check(proto, self.args.model)
        if not problem:
            started = self.budget.spent
            try:
                await load(self.channel, self.args.model, as_json(proto))
            except LoadRefused as err:
                problem = str(err)
            self.loaded, self.load_s = (None, self.load_s) if problem else (label, max(0.1, self.budget.spent - started))
        if problem:
            record.update(status="refused", reason=problem)
            print(f"refused: {label}: {problem}", flush=True)
            return False
        served = await served_config(self.channel, self.args.model)
        self.facts[label] = {"resources": instances_in_force(served) * threads_in_force(served), "changes": len(record["changed"])}
        provider = served.get("parameters", {}).get("execution_provider", {}).get("string_value")
        record.update(threads_in_force=threads_in_force(served), provider=provider)
        return True

    async def point(self, candidate: Candidate, rate: float, phase: str) -> Measurement | None:
        load_s = 0.0 if self.loaded == candidate.label else self.load_s
        if not self.budget.fits(self.plan.estimate_s(rate, load_s)) or not await self.apply(candidate, phase):
            return None
        self.seed += 100
        found = await measure(self.target, candidate.label, rate, self.plan, self.budget, self.facts[candidate.label], self.seed)
        self.points.append(found)
        print(progress_line(found, self.budget.spent, self.budget.seconds), flush=True)
        return found

    async def sweep(self, candidate: Candidate, phase: str) -> None:
        """Every target rate in increasing order; a clear failure ends it (higher rates cannot do better)."""
        for rate in self.args.rates:
            found = await self.point(candidate, rate, phase)
            if found is None:
                if self.outcome.configs.get(candidate.label, {}).get("status") != "refused":
                    self.note(f"{candidate.label}: not measured at {rate:g}/s and above: the budget is spent")
                return
            if clearly_fails(found, self.args.p99_ms, self.plan.tolerance) and rate != self.args.rates[-1]:
                self.outcome.configs[candidate.label]["reason"] = f"fails the p99 at {rate:g}/s beyond the noise: higher rates not tried"
                return

    def best(self) -> Candidate | None:
        choice = choose(self.args.rates[-1], self.points, self.args.p99_ms, self.plan.tolerance)
        found = choice.config if choice else (closest(self.points, self.args.p99_ms) or Measurement("", 0, 0, 0)).config
        return self.candidates.get(found)

    async def coarse(self) -> None:
        tries = coarse_candidates(self.own, self.space)
        count = coarse_count(len(tries), self.args.rates, self.plan, self.load_s, self.budget.remaining)
        if count < len(tries):
            self.note(f"coarse sweep: {count} of {len(tries)} configurations fit the budget; not tried: "
                      + ", ".join(c.label for c in tries[count:]))  # fmt: skip
        for candidate in tries[:count]:
            await self.sweep(candidate, "coarse")

    async def refine(self) -> None:
        """Neighbours of the best (one step along each dimension); a better one becomes the centre.
        Stops while there is still time for one rate probe."""
        centre = self.best()
        queue = neighbours(centre, self.space) if centre else []
        reserve = self.plan.estimate_s(self.args.rates[-1] * PROBE_STEP, self.load_s)
        while queue:
            if not self.budget.fits(reserve + self.plan.estimate_s(self.args.rates[0], self.load_s)):
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
        p99, tolerance = self.args.p99_ms, self.plan.tolerance
        met = [p.rate for p in self.points if meets(p, p99)]
        if met:
            top, step = max(met), PROBE_STEP
            leaders = [p for p in self.points if p.rate == top and p.config in survivors(self.points, top, p99, tolerance)]
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
        p99, tolerance, points = self.args.p99_ms, self.plan.tolerance, self.points
        self.outcome.capacities = capacities(points, p99, tolerance)
        self.outcome.choices = [c for r in self.args.rates if (c := choose(r, points, p99, tolerance))]
        for rate in self.args.rates:
            self.outcome.pareto[rate] = [p.config for p in pareto_front([p for p in points if p.rate == rate], tolerance)]
        self.outcome.break_even = self.devices(priced)
        for device in sorted({d for p in points for d in p.devices if d in priced and priced[d].dollars_per_hour == 0}):
            self.note(f"{device} is priced $0/h ({priced[device].source}): configurations on it look free; "
                      f"give --device-price {device}=DOLLARS_PER_HOUR")  # fmt: skip
        if not self.outcome.choices:
            near = closest(points, p99)
            tried = ", ".join(f"{r:g}" for r in sorted({p.rate for p in points}))
            message = f"no configuration met p99 <= {p99:g} ms at any rate measured ({tried}/s)"
            if near:
                message += f"; the closest: {near.config} at {near.rate:g}/s, p99 {near.p99_ms:.3g} ms, {near.errors} errors"
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
            return {"note": f"not computed: only one device was measured ({', '.join(groups) or 'none'}; {why}"
                            "price and tune on machines with other devices to compare)"}  # fmt: skip
        changes = break_even(list(groups.values()), self.args.rates[-1] * 10)
        note = "; ".join(f"from {rate:g}/s {device} is cheaper" for rate, device in changes)
        return {"note": note, "changes": changes, "offers": [asdict(o) for o in groups.values()]}


async def tune(args) -> int:
    budget = Budget(args.budget_minutes * 60)
    launched = None if args.url else launch(args.model_repository, args.model, args.device_price)
    url, metrics_url = (args.url, args.metrics_url) if args.url else (f"127.0.0.1:{launched.grpc_port}", metrics_url_of(launched))
    sharing = Sharing(server_is_child=launched is not None)
    channel = grpc.aio.insecure_channel(url)
    try:
        return await _tune(args, channel, url, metrics_url, budget, sharing, launched)
    finally:
        await channel.close()
        if launched is not None:
            stop(launched)


async def _tune(args, channel, url: str, metrics_url: str, budget: Budget, sharing: Sharing, launched) -> int:
    started = now_utc()
    if args.url:  # a running server may not serve the model yet; this loads it from its files
        await load(channel, args.model, None)
    served = await served_config(channel, args.model)
    snapshot = await asyncio.to_thread(read_metrics, metrics_url)
    priced, gpu = prices(snapshot), any(d.startswith("cuda") for d in prices(snapshot))
    own_proto = own_config(args.model_repository / args.model)
    own = own_candidate(own_proto, int(served.get("max_batch_size", 0)), gpu)
    here = machine()
    space = make_space(own, own.max_batch_size > 0, here["cores"], gpu, args.max_request_rows)
    payload = await asyncio.to_thread(build_request, url, args.model, 1, args.dims)
    tuner = Tuner(args, channel, Target(channel, metrics_url, args.model, payload), own_proto, own, space, budget)
    devices = model_devices(snapshot, args.model)
    prices_note = ", ".join(f"{d} ${p.dollars_per_hour:g}/h ({p.source})" for d, p in sorted(priced.items()) if d in devices or not devices)
    print(f"tuning '{args.model}' for p99 <= {args.p99_ms:g} ms at {', '.join(f'{r:g}' for r in args.rates)}/s on {here['label']}; "
          f"prices {prices_note}; budget {budget.seconds:.0f} s", flush=True)  # fmt: skip
    if not gpu:
        tuner.note("no GPU: CUDA and TensorRT not tried")
    if args.url:
        tuner.note("idle cost is charged to this model as if it were alone on its devices")
    tuner.note(REPLICAS_NOTE)
    await tuner.coarse()
    await tuner.refine()
    await tuner.probe()
    tuner.conclude(priced)
    shared = sharing.result()
    tuner.note(shared["note"])
    if args.url:  # leave the running server as it was found: the repository's own configuration
        await load(channel, args.model, None)
        tuner.note(f"'{args.model}' reloaded from its repository files on the server at {url}")
    header = {
        "tool": "onnxserve-tune", "schema": 1, "date": started, "machine": here,
        "tuned_on": f"tuned on {here['label']}, {started}" + ("; shared machine" if shared.get("shared") else ""),
        "model": args.model, "p99_ms": args.p99_ms, "rates": args.rates, "rate": args.rate or args.rates[-1],
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prices": [asdict(p) for p in priced.values()], "prices_note": prices_note,
        "server": {"started_by_tool": launched is not None, "url": url}, "sharing": shared,
        "plan": asdict(tuner.plan), "budget": {"seconds": budget.seconds, "spent_s": round(budget.spent, 1)},
    }  # fmt: skip
    winner = next((c for c in tuner.outcome.choices if c.rate == header["rate"]), None)
    if winner and 0 < (lowered := tuner.candidates[winner.config].max_batch_size) < own.max_batch_size:
        tuner.note(f"the winner lowers max_batch_size from {own.max_batch_size} to {lowered}: a request of more than "
                   f"{lowered} row(s) is then refused; give --max-request-rows N if clients send up to N rows at once")  # fmt: skip
    if args.write_config:
        tuner.outcome.written = _write(args, tuner, winner, header)
    print("\n" + text(tuner.outcome, args.p99_ms, header), flush=True)
    if args.out:
        args.out.write_text(json.dumps(document(tuner.outcome, header), indent=1, default=str) + "\n")
        print(f"report: {args.out}")
    return 0 if winner else 1


def _write(args, tuner: Tuner, winner, header: dict) -> dict:
    model_dir = args.model_repository / args.model
    if winner is None:
        return {"message": "config.pbtxt not written: no configuration meets the target", "path": None}
    candidate = tuner.candidates[winner.config]
    if not changed_fields(candidate, tuner.own):
        return {"message": "config.pbtxt not written: the model's own configuration is the cheapest", "path": None}
    lines = [
        f"tuned by onnxserve-tune on {header['machine']['label']} at {header['date']}",
        f"for p99 <= {args.p99_ms:g} ms at {winner.rate:g}/s ({winner.replicas} replica(s), "
        f"${winner.cost_per_million:.4g} per 1M inferences); rates measured: {', '.join(f'{r:g}' for r in args.rates)}/s",
        f"configuration: {winner.config}" + ("; measured on a shared machine" if header["sharing"].get("shared") else ""),
    ]
    if 0 < candidate.max_batch_size < tuner.own.max_batch_size:
        lines.append(f"max_batch_size {candidate.max_batch_size} (was {tuner.own.max_batch_size}): requests of more rows are refused")
    written = write_config(model_dir, to_proto(tuner.own_proto, tuner.own, candidate), lines)
    kept = f" (the old one kept as {written.backup.name})" if written.backup else ""
    print(f"wrote {written.path}{kept}", flush=True)
    return {"message": f"wrote {written.path}{kept}", "path": str(written.path), "backup": str(written.backup) if written.backup else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(tune(args))
    except (ServerError, ConfigError, LoadError) as err:
        print(f"onnxserve-tune: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # /metrics unreachable, a file that cannot be written
        print(f"onnxserve-tune: {err}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as err:  # the server went away in the middle
        print(f"onnxserve-tune: the server stopped answering ({err.code().name}): {err.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
