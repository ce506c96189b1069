"""One tune, from the server it measures to the written report: start or reach the server, read
its prices, build the Tuner, search, reload what the server served before, choose, report, and
write the winner's config.pbtxt when asked."""

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import grpc

from server.tools.loadgen import build_request
from server.tools.metrics_reader import read_samples
from server.tune.budget import Budget
from server.tune.candidates import changed_fields, own_candidate, own_config, to_proto, write_config
from server.tune.measure import Target, model_devices, prices
from server.tune.report import Sharing, document, machine, now_utc, text
from server.tune.search import make_space
from server.tune.target import launch, load, served_config, stop
from server.tune.target import metrics_url as metrics_url_of
from server.tune.tuner import REPLICAS_NOTE, Baseline, Server, Tuner, TuneSettings


async def tune(settings: TuneSettings) -> int:
    """The whole tune; the exit status: 0 with a winner at the traffic's rate, 1 without."""
    budget = Budget(settings.budget_minutes * 60)
    launched = None if settings.url else launch(settings.model_repository, settings.model, settings.device_price)
    url, metrics_url = (
        (settings.url, settings.metrics_url)
        if settings.url
        else (f"127.0.0.1:{launched.grpc_port}", metrics_url_of(launched))
    )
    sharing = Sharing(server_is_child=launched is not None)
    channel = grpc.aio.insecure_channel(url)
    try:
        return await _tune(settings, Server(channel, url, metrics_url, launched), budget, sharing)
    finally:
        await channel.close()
        if launched is not None:
            stop(launched)


async def _tune(settings: TuneSettings, server: Server, budget: Budget, sharing: Sharing) -> int:
    started = now_utc()
    if settings.url:  # a running server may not serve the model yet; this loads it from its files
        await load(server.channel, settings.model, None)
    tuner, priced, prices_note, here = await _prepare(settings, server, budget)
    await tuner.coarse()
    await tuner.refine()
    await tuner.probe()
    tuner.conclude(priced)
    shared = sharing.result()
    tuner.note(shared["note"])
    if settings.url:  # leave the running server as it was found: the repository's own configuration
        await load(server.channel, settings.model, None)
        tuner.note(f"'{settings.model}' reloaded from its repository files on the server at {server.url}")
    header = {
        "tool": "onnxserve-tune",
        "schema": 1,
        "date": started,
        "machine": here,
        "tuned_on": f"tuned on {here['label']}, {started}" + ("; shared machine" if shared.get("shared") else ""),
        "model": settings.model,
        "p99_ms": settings.p99_ms,
        "rates": settings.rates,
        "rate": settings.rate or settings.rates[-1],
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "prices": [asdict(p) for p in priced.values()],
        "prices_note": prices_note,
        "server": {"started_by_tool": server.launched is not None, "url": server.url},
        "sharing": shared,
        "plan": asdict(tuner.plan),
        "budget": {"seconds": budget.seconds, "spent_s": round(budget.spent, 1)},
    }
    return _report(settings, tuner, header)


async def _prepare(settings: TuneSettings, server: Server, budget: Budget) -> tuple[Tuner, dict, str, dict]:
    """The Tuner over the model's own configuration and the space around it, the prices as the
    server reads them (and their note), and this machine; prints the tune's first line."""
    served = await served_config(server.channel, settings.model)
    samples = await asyncio.to_thread(read_samples, server.metrics_url)
    priced = prices(samples)
    gpu = any(device.startswith("cuda") for device in priced)
    own_proto = own_config(settings.model_repository / settings.model)
    own = own_candidate(own_proto, int(served.get("max_batch_size", 0)), gpu)
    here = machine()
    space = make_space(own, own.max_batch_size > 0, here["cores"], gpu, settings.max_request_rows)
    payload = await asyncio.to_thread(build_request, server.url, settings.model, 1, settings.dims)
    target = Target(server.channel, server.metrics_url, settings.model, payload)
    tuner = Tuner(settings, target, Baseline(own_proto, own, space), budget)
    devices = model_devices(samples, settings.model)
    prices_note = ", ".join(
        f"{d} ${p.dollars_per_hour:g}/h ({p.source})" for d, p in sorted(priced.items()) if d in devices or not devices
    )
    print(
        f"tuning '{settings.model}' for p99 <= {settings.p99_ms:g} ms at {', '.join(f'{r:g}' for r in settings.rates)}/s on {here['label']}; "
        f"prices {prices_note}; budget {budget.seconds:.0f} s",
        flush=True,
    )
    if not gpu:
        tuner.note("no GPU: CUDA and TensorRT not tried")
    if settings.url:
        tuner.note("idle cost is charged to this model as if it were alone on its devices")
    tuner.note(REPLICAS_NOTE)
    return tuner, priced, prices_note, here


def _report(settings: TuneSettings, tuner: Tuner, header: dict) -> int:
    """The winner at the traffic's rate, written when asked; the report printed and saved."""
    winner = next((c for c in tuner.outcome.choices if c.rate == header["rate"]), None)
    if winner and 0 < (lowered := tuner.candidates[winner.config].max_batch_size) < tuner.own.max_batch_size:
        tuner.note(
            f"the winner lowers max_batch_size from {tuner.own.max_batch_size} to {lowered}: a request of more than "
            f"{lowered} row(s) is then refused; give --max-request-rows N if clients send up to N rows at once"
        )
    if settings.write_config:
        tuner.outcome.written = _write(settings, tuner, winner, header)
    print("\n" + text(tuner.outcome, settings.p99_ms, header), flush=True)
    if settings.out:
        settings.out.write_text(json.dumps(document(tuner.outcome, header), indent=1, default=str) + "\n")
        print(f"report: {settings.out}")
    return 0 if winner else 1


def _write(settings: TuneSettings, tuner: Tuner, winner, header: dict) -> dict:
    model_dir = settings.model_repository / settings.model
    if winner is None:
        return {"message": "config.pbtxt not written: no configuration meets the target", "path": None}
    candidate = tuner.candidates[winner.config]
    if not changed_fields(candidate, tuner.own):
        return {"message": "config.pbtxt not written: the model's own configuration is the cheapest", "path": None}
    lines = [
        f"tuned by onnxserve-tune on {header['machine']['label']} at {header['date']}",
        f"for p99 <= {settings.p99_ms:g} ms at {winner.rate:g}/s ({winner.replicas} replica(s), "
        f"${winner.cost_per_million:.4g} per 1M inferences); rates measured: {', '.join(f'{r:g}' for r in settings.rates)}/s",
        f"configuration: {winner.config}"
        + ("; measured on a shared machine" if header["sharing"].get("shared") else ""),
    ]
    if 0 < candidate.max_batch_size < tuner.own.max_batch_size:
        lines.append(
            f"max_batch_size {candidate.max_batch_size} (was {tuner.own.max_batch_size}): requests of more rows are refused"
        )
    written = write_config(model_dir, to_proto(tuner.own_proto, tuner.own, candidate), lines)
    kept = f" (the old one kept as {written.backup.name})" if written.backup else ""
    print(f"wrote {written.path}{kept}", flush=True)
    return {
        "message": f"wrote {written.path}{kept}",
        "path": str(written.path),
        "backup": str(written.backup) if written.backup else None,
    }
