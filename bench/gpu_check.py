"""One command that proves the GPU path on a machine with an NVIDIA GPU, and tests its own plumbing
on the CPU (`--cpu`, which CI runs):

    python -m bench.gpu_check --quick --out gpu-check          # on the GPU machine, under 7.5 minutes
    python -m bench.gpu_check --out gpu-check                  # more: encoder, c=128, onnxserve-tune
    python -m bench.gpu_check --cpu --quick --out /tmp/check   # the plumbing, on any machine

Steps, in order, each with a time limit (seconds), on ResNet-50 (with --cpu: the mlp):
- environment (60): onnxruntime's version and providers, server.tools.gpu_report's report;
- providers (240): starts one onnxserve (gRPC only) with the models, and records the provider and
  the provider options each model really runs with (ModelConfig's parameters);
- io_binding (90): onnxserve's bound run (server/engine/binding.py) equals session.run; device memory
  (NVML) stays flat over hundreds of bound runs;
- serving (150): raw onnxruntime in this process, opened with exactly the server's providers and
  options, against onnxserve through the load generator at concurrency 1 and 16;
- energy (60): NVML's energy counter idle and under load;
- cuda_graphs (90): a batched model served with enable_cuda_graph answers as raw session.run does at
  several batch sizes; in this process, a graph replayed on inputs updated in place stays right;
- cuda_shm (45): the model's input and output in Triton's CUDA shared memory (cudaIpc handles made
  here) through ModelInfer, against the same input in the message (bench/gpu_cuda_shm.py);
- sequence_state (60): eight sequences at once, their state kept on the device between requests
  and gathered there into shared batches, each answer its own running sum (bench/gpu_sequences.py);
- encoder (240, not with --quick): as serving, for the encoder; c=128 is added everywhere;
- frontends (150): the mlp on the GPU behind 1, 2, 4, 8 and 14 front-end processes (as the cores
  allow), several load generators: throughput and the engine's and front ends' CPU per request
  (bench/gpu_frontends.py);
- tensorrt (420): where TensorRT's libraries load, an FP16 engine built into --tensorrt-cache-dir,
  served and measured, reloaded faster on restart, and raw TensorRT FP16 with the same options;
- tune (not with --quick): onnxserve-tune on the mlp for --tune-minutes (tune.json, tune.txt).
A step that cannot run here is skipped with the reason; one that raises or runs out of time is
failed with its error, and the next step runs. Past --deadline-minutes (7 with --quick, else
9.5) the remaining steps are skipped as out of time. gpu-check.json and gpu-check.md (a table) in --out are rewritten at the
start and end of every step, so a run cut off keeps everything before. Progress goes to stderr;
the table is printed at the end. Exit status 1 when a step failed.

On a GPU machine without network, install the bundle first (bench/gpu_bundle.py). Where files
reach it in pieces of at most 64 MiB per command and it keeps them only between commands that
follow closely, send the parts one command each into a folder outside the checkout
(`mkdir -p /tmp/gpu-bundle && cp .gpu-bundle/part-00N /tmp/gpu-bundle/`), the last with the
manifest, and finish in that same command:
    cp .gpu-bundle/manifest.json /tmp/gpu-bundle/ && python3 -m bench.gpu_bundle --install /tmp/gpu-bundle \
      && PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --quick --out gpu-check
The check itself needs no tritonclient, and its servers no REST.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import gpu_cuda_shm, gpu_frontends, gpu_restarts, gpu_sequences, gpu_steps
from bench.gpu_steps import Context, Failed, Plan, Skip
from server.engine.placement import visible_gpus
from server.tools import gpu_report

CUT_EXIT = 3  # --exit-after: the status of a run cut off on purpose


@dataclass(frozen=True)
class Step:
    name: str
    limit: float  # seconds; the deadline may leave less
    run: Callable[[Context], dict]


def steps(plan: Plan) -> list[Step]:
    chosen = [
        Step("environment", 60, gpu_steps.environment),
        Step("providers", 240, gpu_steps.providers),
        Step("io_binding", 90, gpu_steps.io_binding),
        Step("serving", 150, gpu_steps.serving),
        Step("energy", 60, gpu_steps.energy),
        Step("cuda_graphs", 90, gpu_steps.cuda_graphs),
        Step("cuda_shm", 45, gpu_cuda_shm.cuda_shared_memory),
        Step("sequence_state", 60, gpu_sequences.sequence_state),
    ]
    if not plan.quick:
        chosen.append(Step("encoder", 240, gpu_steps.encoder))
    chosen.append(Step("frontends", 150, gpu_frontends.frontends))
    chosen.append(Step("tensorrt", 420, gpu_restarts.tensorrt))
    if not plan.quick and plan.tune_minutes:
        chosen.append(Step("tune", plan.tune_minutes * 60 + 180, gpu_restarts.tune))
    return chosen


class OutOfTime(BaseException):
    """A step's time limit passed. A BaseException, so that no `except Exception` in a step keeps it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM raises OutOfTime wherever the step is, blocking waits included (a server starting, the
    load generator, a sleep). Signals reach the main thread only: elsewhere the step has no limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise OutOfTime(f"still running at its limit of {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sweep(keep: set[int]) -> list[int]:
    """End the child processes a step left behind (a server whose start ran out of time holds the
    GPU through every later step), all but `keep`."""
    ended = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, (state, parent) = int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):  # gone while we looked
            continue
        if int(parent) == os.getpid() and pid not in keep and state != "Z":
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
    for pid in ended:
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    return ended


class Journal:
    """The check's findings, rewritten whole to gpu-check.json and gpu-check.md at every change."""

    def __init__(self, out: Path, check: dict, chosen: list[Step]) -> None:
        self.out, self.began = out, time.monotonic()
        self.doc = {
            "check": {**check, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
            "writes": 0,
            "steps": [{"name": step.name, "status": "pending", "limit_seconds": step.limit} for step in chosen],
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    def write(self) -> None:
        self.doc["writes"] += 1
        self.doc["updated"], self.doc["elapsed_seconds"] = (
            time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            round(self.elapsed(), 1),
        )
        for name, text in (
            ("gpu-check.json", json.dumps(self.doc, indent=2, default=str)),
            ("gpu-check.md", markdown(self.doc)),
        ):
            partial = self.out / f".{name}.partial"
            partial.write_text(text)
            os.replace(partial, self.out / name)  # whole or not at all, even if the run is killed meanwhile


def run_step(step: Step, entry: dict, ctx: Context, journal: Journal, deadline: float, hook: str = "") -> None:
    left = deadline - journal.elapsed()
    if left <= 0:
        entry.update(status="skipped", reason=f"out of time: past the deadline ({deadline / 60:g} minutes)")
        return
    limit, run = min(step.limit, left), step.run
    if hook:  # --fail-step: a step that raises, or one that hangs past a limit cut to 2 s
        limit = min(limit, 2.0) if hook == "hang" else limit
        run = (lambda _: time.sleep(3600)) if hook == "hang" else _raises(step.name)
    entry.update(status="running", started_seconds=round(journal.elapsed(), 2), limit_seconds=round(limit, 1))
    journal.write()
    journal.say(f"{step.name} (limit {limit:.0f} s) ...")
    began = time.perf_counter()
    try:
        with time_limit(limit):
            entry.update(status="ok", result=run(ctx))
    except Skip as err:
        entry.update(status="skipped", reason=str(err))
    except Failed as err:
        entry.update(status="failed", error=str(err), result=err.found)
    except OutOfTime as err:
        entry.update(status="failed", error=f"timed out: {err}")
    except Exception as err:  # noqa: BLE001 - recorded, with where it came from; the next step runs
        entry.update(
            status="failed", error=f"{type(err).__name__}: {err}"[-2000:], traceback=traceback.format_exc()[-3000:]
        )
    finally:
        entry.update(seconds=round(time.perf_counter() - began, 2), ended_seconds=round(journal.elapsed(), 2))
        if stray := sweep(ctx.pids()):
            entry["ended_processes"] = stray
        if entry["status"] == "failed" and (said := ctx.log_errors()):
            entry["server_log"] = said
    entry["summary"] = entry.get("error") or (entry.get("result") or {}).get("summary") or entry.get("reason", "")
    journal.say(f"{step.name}: {entry['status']} in {entry['seconds']:.1f} s: {entry['summary'][:300]}")


def _raises(name: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        raise RuntimeError(f"deliberate failure of step {name} (--fail-step)")

    return run


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 400 else text[:397] + "..."


def markdown(doc: dict) -> str:
    check = doc["check"]
    lines = [
        f"# onnxserve GPU check ({check['mode']})",
        "",
        f"{doc.get('updated', '')}; {doc.get('elapsed_seconds', 0):.0f} s; {check['seconds_per_point']:g} s per point",
        "",
        "| step | status | seconds | limit s | found |",
        "|---|---|---|---|---|",
    ]
    for entry in doc["steps"]:
        found = entry.get("summary") or entry.get("error") or entry.get("reason") or ""
        lines.append(
            f"| {entry['name']} | {entry['status']} | {entry.get('seconds', '')} | {entry['limit_seconds']:g} | {_cell(found)} |"
        )
    table = [row for entry in doc["steps"] for row in (entry.get("result") or {}).get("rows", [])]
    if table:
        lines += [
            "",
            "| model | server provider | raw provider | c | onnxserve inf/s | p50 ms | raw inf/s (batch) | raw ms "
            "| / raw | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for row in table:
        lines.append(
            f"| {row['model']} | {row['server_provider']} | {row['raw_provider']} | {row['concurrency']} "
            f"| {row['inferences_per_second']:,.0f} | {row['p50_ms']:.3f} | {row['raw_inferences_per_second']:,.0f} "
            f"({row['raw_batch']}) | {row['raw_ms']:.3f} | {row['ratio']:.2f} | {row['errors']} |"
        )
    split = [row for entry in doc["steps"] for row in (entry.get("result") or {}).get("frontend_rows", [])]
    if split:
        lines += gpu_frontends.markdown_rows(split)
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the plumbing only, on the CPU with the mlp (what CI runs)")
    parser.add_argument(
        "--quick", action="store_true", help="only what must finish on the lent machine (under 7.5 minutes)"
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument(
        "--seconds", type=float, help="seconds per measured point (default 1 with --cpu, 3 with --quick, else 8)"
    )
    parser.add_argument(
        "--deadline-minutes", type=float, help="then skip what is left (default 7 with --quick, else 9.5)"
    )
    parser.add_argument(
        "--tune-minutes", type=float, help="the onnxserve-tune step's budget (default 2; none with --quick or --cpu)"
    )
    parser.add_argument("--fail-step", action="append", default=[], help=argparse.SUPPRESS)  # tests: NAME or NAME=hang
    parser.add_argument("--exit-after", default="", help=argparse.SUPPRESS)  # tests: end the process as a cut-off would
    args = parser.parse_args(argv)
    args.no_gpu = not args.cpu and not visible_gpus()
    args.seconds = args.seconds or (1.0 if args.cpu else 3.0 if args.quick else 8.0)
    args.deadline_minutes = 7.0 if args.quick and args.deadline_minutes is None else args.deadline_minutes
    args.deadline_minutes = 9.5 if args.deadline_minutes is None else args.deadline_minutes
    args.tune_minutes = (0.0 if args.quick or args.cpu else 2.0) if args.tune_minutes is None else args.tune_minutes
    args.hooks = dict((item.split("=", 1) + ["raise"])[:2] for item in args.fail_step)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.no_gpu:
        return _no_gpu(args.out)
    scratch = Path(tempfile.mkdtemp(prefix="onnxserve-gpu-check-"))
    try:
        return check(args, sys.argv[1:] if argv is None else argv, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check(args: argparse.Namespace, argv: list[str], scratch: Path) -> int:
    plan = Plan(args.cpu, args.quick, args.seconds, scratch, args.out, args.tune_minutes)
    chosen = steps(plan)
    names = {step.name for step in chosen}
    wrong = [n for n in [*args.hooks, args.exit_after] if n and n not in names] + [
        m for m in args.hooks.values() if m not in ("raise", "hang")
    ]
    if wrong:
        raise SystemExit(f"--fail-step/--exit-after: no such step or mode: {wrong}")
    mode = " ".join(["--cpu"] * args.cpu + ["--quick"] * args.quick) or "GPU"
    journal = Journal(
        args.out,
        {
            "mode": mode,
            "argv": argv,
            "seconds_per_point": args.seconds,
            "deadline_minutes": args.deadline_minutes,
            "hooks": args.hooks,
        },
        chosen,
    )
    ctx = Context(plan, journal.say)
    journal.write()
    try:
        for step, entry in zip(chosen, journal.doc["steps"]):
            run_step(step, entry, ctx, journal, args.deadline_minutes * 60, args.hooks.get(step.name, ""))
            journal.write()
            if step.name == args.exit_after:
                ctx.stop()
                shutil.rmtree(scratch, ignore_errors=True)
                os._exit(CUT_EXIT)  # no final write, no table: as a run killed at this point ends
    finally:
        ctx.stop()
        sweep(set())
    print(markdown(journal.doc))
    failed = [e["name"] for e in journal.doc["steps"] if e["status"] == "failed" and e["name"] not in args.hooks]
    journal.say(
        f"done: {len(failed)} step(s) failed{': ' + ', '.join(failed) if failed else ''}"
        f"{' (not counting --fail-step)' if args.hooks else ''}; {args.out / 'gpu-check.md'}"
    )
    return 1 if failed else 0


def _no_gpu(out: Path) -> int:
    """Even where NVML sees no GPU, the run leaves its reason and the environment behind, not nothing."""
    reason = "no NVIDIA GPU is visible (NVML): run on the GPU machine, or pass --cpu to test the plumbing"
    found = {"error": reason, "environment": gpu_report.report(None)}
    (out / "gpu-check.json").write_text(json.dumps(found, indent=2, default=str))
    (out / "gpu-check.md").write_text(f"# onnxserve GPU check\n\nNOT RUN: {reason}\n")
    print(f"gpu_check: {reason}; the environment is in {out / 'gpu-check.json'}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
