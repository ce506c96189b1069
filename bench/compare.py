"""Two onnxserve checkouts, interleaved on the same points, both on default settings:

    git worktree add /tmp/before <commit>
    python -m bench.compare /tmp/before                 # that checkout against this one
    python -m bench.compare /tmp/before --rounds 5 --models mlp
    python -m bench.compare . --after-flags "--frontends 2"   # this checkout, with and without a flag

For each model, both servers start side by side (each `python -m server` from its own checkout,
with this environment's packages); then every point is measured on one and then the other, the
order alternating by round, so that the drift of a shared machine weighs on both alike. Prints,
per point, the median inferences/s of each over the rounds and their ratio. The same client
(this checkout's load generator) drives both.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import make_models
from bench.run import WORKLOADS, loadgen, start_onnxserve
from bench.serving import ROOT

# (model, transport, concurrency): the points the layout and the process split must not slow down.
POINTS = (
    ("mlp", "unary", 1),
    ("mlp", "unary", 64),
    ("mlp", "stream", 64),
    ("mlp", "rest-bin", 64),
    ("resnet50", "unary", 16),
    ("resnet50", "stream", 16),
    ("resnet50", "rest-bin", 16),
)


def compare_model(repository: Path, model: str, sides: dict, rounds: int, seconds: float) -> dict:
    """{(transport, concurrency): {label: [inferences/s per round]}}; `sides`: label -> (checkout, flags)."""
    model_path = repository / model / "1" / "model.onnx"
    servers = {
        label: start_onnxserve(repository, model_path, repository, root, flags)
        for label, (root, flags) in sides.items()
    }
    figures: dict = {}
    try:
        for number in range(rounds):
            order = list(servers) if number % 2 == 0 else list(reversed(servers))
            for _, transport, concurrency in (p for p in POINTS if p[0] == model):
                for label in order:
                    report = loadgen(servers[label], WORKLOADS[model], concurrency, seconds, transport=transport)
                    rates = figures.setdefault((transport, concurrency), {}).setdefault(label, [])
                    rates.append(report["inferences_per_second"])
                    errors = f", {report['errors']} errors" if report["errors"] else ""
                    print(f"  {model} {transport} c={concurrency} {label}: {rates[-1]:,.0f}/s{errors}", file=sys.stderr)
                    if report["errors"]:  # a point with errors is no figure: say so, and stop
                        raise RuntimeError(f"{label} answered {model} {transport} c={concurrency} with errors")
    finally:
        for server in servers.values():
            server.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the other checkout (its folder holds server/)")
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet50"], choices=sorted({p[0] for p in POINTS}))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--after-flags", default="", help="flags for this checkout's server only, e.g. '--frontends 2'")
    args = parser.parse_args(argv)
    if not (args.before / "server" / "__main__.py").is_file():
        parser.error(f"{args.before} holds no server/__main__.py: give the folder of a checkout")
    sides = {"before": (args.before.resolve(), ()), "after": (ROOT, tuple(args.after_flags.split()))}
    print("model     call      conc   before inf/s    after inf/s   after/before  (medians of the rounds)")
    with tempfile.TemporaryDirectory(prefix="onnxserve-compare-") as scratch:
        repository = Path(scratch) / "models"
        make_models.write_repository(repository, args.models)
        for model in args.models:
            for (transport, concurrency), rates in compare_model(
                repository, model, sides, args.rounds, args.duration
            ).items():
                before, after = (statistics.median(rates[label]) for label in sides)
                ratio = f"{after / before:.2f}" if before else "-"
                print(f"{model:9} {transport:9} {concurrency:4} {before:14,.0f} {after:14,.0f} {ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
