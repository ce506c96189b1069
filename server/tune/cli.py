"""onnxserve-tune: the cheapest configuration of one model that meets a p99 latency target at
your traffic, measured on this machine, with the cost read from the server's own ledger.

    onnxserve-tune --model-repository DIR --model NAME --p99-ms 50 --rate 300 [--rates 100,300,1000]
                   [--device-price cpu=0.17] [--budget-minutes 10] [--out report.json] [--write-config]

It starts one onnxserve (explicit model control, loopback ports, REST off), or uses one already
running on loopback (--url), applies each configuration with RepositoryModelLoad and a JSON
`config`, and measures it under open-loop Poisson load. Coarse sweep, refinement around the best,
then rate probes for the leaders, all within --budget-minutes. See README, "What does my model
cost to serve?".

This module is the command line: it checks the flags and builds the settings; run.py runs the
tune, tuner.py searches.
"""

import argparse
import asyncio
import sys
import urllib.parse
from pathlib import Path

import grpc

from server.config import DevicePriceSetting
from server.errors import ConfigError
from server.tools.loadgen import LoadError
from server.tune.run import tune
from server.tune.target import ServerError, loopback_address
from server.tune.tuner import TuneSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxserve-tune", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--model-repository", required=True, type=Path, help="the model repository directory")
    parser.add_argument("--model", required=True, help="the model to tune (a directory of the repository)")
    parser.add_argument("--p99-ms", required=True, type=float, help="the latency target: p99 in milliseconds")
    parser.add_argument(
        "--rate", type=float, help="your traffic, requests per second: the config written is its winner"
    )
    parser.add_argument("--rates", default="", help="comma-separated rates to measure as well, e.g. 100,300,1000")
    parser.add_argument(
        "--device-price",
        action="append",
        default=[],
        metavar="DEVICE=DOLLARS_PER_HOUR",
        help="as the server's flag, repeatable; default: the server's own prices",
    )
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="the whole tune stays within this")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--write-config", action="store_true", help="write the winner as config.pbtxt (old one kept as .bak)"
    )
    parser.add_argument("--url", help="tune a running onnxserve (explicit model control mode) at HOST:PORT on loopback")
    parser.add_argument("--metrics-url", help="with --url: its /metrics (default http://HOST:8002/metrics)")
    parser.add_argument(
        "--max-request-rows",
        type=int,
        default=1,
        help="the most rows your clients send in one request: max_batch_size is not tuned below it",
    )
    parser.add_argument("--shape", action="append", default=[], help="NAME=D0,D1,... for an input with variable dims")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    return parser


def parse_settings(argv: list[str]) -> TuneSettings:
    """The settings from the command line; a bad one exits with usage and its flag's name, before a
    server is started or touched."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return settings_from(args)
    except (ConfigError, ServerError) as err:
        parser.error(str(err))


def _rates_and_dims(args: argparse.Namespace) -> tuple[tuple[float, ...], dict[str, list[int]]]:
    try:
        rates = tuple(
            sorted({float(r) for r in args.rates.split(",") if r.strip()} | ({args.rate} if args.rate else set()))
        )
    except ValueError:
        raise ConfigError(f"--rates: {args.rates!r} is not a comma-separated list of numbers") from None
    try:
        dims = {name: [int(d) for d in shape.split(",")] for name, shape in (item.split("=", 1) for item in args.shape)}
    except ValueError:
        raise ConfigError(f"--shape: {args.shape} is not NAME=D0,D1,... with integer dims") from None
    return rates, dims


def settings_from(args: argparse.Namespace) -> TuneSettings:
    """TuneSettings from the parsed arguments; ConfigError or ServerError names the flag at fault."""
    rates, dims = _rates_and_dims(args)
    problems = [
        (not rates, "--rate or --rates: give at least one rate"),
        (any(r <= 0 for r in rates), "--rate/--rates: rates are requests per second, > 0"),
        (args.p99_ms <= 0, "--p99-ms: must be > 0"),
        (args.budget_minutes <= 0, "--budget-minutes: must be > 0"),
        (args.max_request_rows < 1, "--max-request-rows: must be >= 1"),
        (
            not (args.model_repository / args.model).is_dir(),
            f"--model: {args.model_repository / args.model} is not a directory",
        ),
        (bool(args.url and args.device_price), "--device-price: a running server (--url) keeps its own prices"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)
    for price in args.device_price:
        DevicePriceSetting.parse(price, "flag", "--device-price")  # the server's own check, before it starts
    url, metrics_url = args.url, args.metrics_url
    if url:
        url = loopback_address(url, "--url")
        metrics_url = metrics_url or f"http://{url.rpartition(':')[0]}:8002/metrics"
        loopback_address(urllib.parse.urlsplit(metrics_url).netloc, "--metrics-url")
    return TuneSettings(
        model_repository=args.model_repository,
        model=args.model,
        p99_ms=args.p99_ms,
        rate=args.rate,
        rates=rates,
        device_price=tuple(args.device_price),
        budget_minutes=args.budget_minutes,
        out=args.out,
        write_config=args.write_config,
        url=url,
        metrics_url=metrics_url,
        max_request_rows=args.max_request_rows,
        shape=tuple(args.shape),
        seed=args.seed,
        dims=dims,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(tune(settings))
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
