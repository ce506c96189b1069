"""The one reader of a /metrics page, shared by onnxserve-tune, the load generator, the tests and the
benchmarks: fetched over plain HTTP, parsed once by prometheus_client's own parser, then asked by
sample name and labels. Standard library and prometheus_client only, so that bench/serving.py runs
where the test tools are not installed."""

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# A sample's name and its labels, sorted: the same series has the same key on every page.
Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Samples:
    """Every sample of one /metrics page, by Key. A query's labels select the series that carry
    them; the series may carry more (a request counter's `protocol`, a histogram bucket's `le`)."""

    values: dict[Key, float]

    def series(self, name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
        """(labels, value) of each series of `name` that carries `labels`, in the page's order."""
        wanted = set(labels.items())
        for (found, pairs), value in self.values.items():
            if found == name and wanted <= set(pairs):
                yield dict(pairs), value

    def get(self, name: str, **labels: str) -> float:
        """One sample's value, or the sum over the series that add labels not named (a request
        counter's `protocol`); 0 when no series matches yet."""
        exact = self.values.get((name, tuple(sorted(labels.items()))))
        return self.total(name, **labels) if exact is None else exact

    def total(self, name: str, **labels: str) -> float:
        """Sum over the series of `name` that carry `labels`; 0 when there are none."""
        return sum(value for _, value in self.series(name, **labels))

    def change_since(self, earlier: "Samples", name: str, **labels: str) -> float:
        """What `total` moved by from the earlier page to this one: a counter's increase."""
        return self.total(name, **labels) - earlier.total(name, **labels)

    def label_values(self, name: str, label: str, **labels: str) -> set[str]:
        """The values `label` takes on the series of `name` that carry `labels`."""
        return {found[label] for found, _ in self.series(name, **labels) if label in found}

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


def parse_samples(text: str) -> Samples:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Samples(parsed)


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def read_samples(url: str) -> Samples:
    return parse_samples(fetch_text(url))
