"""The benchmarks (see README, Benchmarks). What every one of them prints the same way lives here."""


def print_targets(found: list[tuple[str, str, bool]]) -> None:
    """Each (target, measured, met), one line each, as every benchmark reports its targets."""
    for target, value, met in found:
        print(f"  {'met    ' if met else 'NOT met'}  {target}: {value}")
