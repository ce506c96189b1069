"""Who called and what they spent, on /metrics: requests and rows per tenant (moved by events),
and the tenant-series bound, budgets, refused keys and the usage log's state (read at scrape time).
Tenants' cost and energy come with the models' in CostCollector, from one ledger snapshot."""

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.observe.events import REQUEST_OUTCOMES, RequestFinished

if TYPE_CHECKING:  # read at scrape time, never called back: observers import what they read only to name it
    from server.engine.usage_log import UsageLog
    from server.frontend.identity import Authenticator

TENANT_LABELS = ("tenant", "model", "version")


class TenantRequests:
    """onnxserve_tenant_requests_total and onnxserve_tenant_inferences_total, from RequestFinished."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "onnxserve_tenant_requests",
            "Inference requests per tenant, by outcome",
            (*TENANT_LABELS, "outcome"),
            registry=registry,
        )
        self.inferences = Counter(
            "onnxserve_tenant_inferences", "Rows of each tenant's successful requests", TENANT_LABELS, registry=registry
        )
        self._series: dict[tuple[str, str, str], tuple[dict, object]] = {}

    def handlers(self) -> dict[type, Callable]:
        return {RequestFinished: self._request}

    def _request(self, event: RequestFinished) -> None:
        key = (event.tenant, event.model, event.version)
        series = self._series.get(key)
        if series is None:  # labels() costs microseconds: once per tenant and version
            outcomes = {outcome: self.requests.labels(*key, outcome) for outcome in REQUEST_OUTCOMES}
            series = self._series[key] = (outcomes, self.inferences.labels(*key))
        series[0][event.outcome].inc()
        if event.outcome == "ok":
            series[1].inc(event.rows)


class TenantCollector(Collector):
    def __init__(self, auth: "Authenticator") -> None:
        self._auth = auth

    def collect(self) -> Iterator:
        auth = self._auth
        folded = CounterMetricFamily(
            "onnxserve_tenant_series_folded",
            'Distinct tenants counted as tenant="other" on /metrics (past --max-tenant-series); the usage log keeps their names',
        )
        folded.add_metric((), auth.labels.folded)
        refused = CounterMetricFamily(
            "onnxserve_unauthenticated_requests",
            "Calls refused for want of a valid API key: missing, or invalid (not in --api-keys)",
            labels=("reason",),
        )
        for reason, count in auth.refused.items():
            refused.add_metric((reason,), count)
        budget = GaugeMetricFamily(
            "onnxserve_tenant_budget_dollars_per_hour",
            "Each tenant's hourly budget, from the --api-keys file",
            labels=("tenant",),
        )
        for tenant, dollars in sorted((auth.keys.budgets if auth.keys else {}).items()):
            budget.add_metric((tenant,), dollars)
        yield from (family for family in (folded, refused, budget) if family.samples or family is folded)


class UsageLogCollector(Collector):
    def __init__(self, usage: "UsageLog") -> None:
        self._usage = usage

    def collect(self) -> Iterator:
        usage = self._usage
        depth = GaugeMetricFamily("onnxserve_usage_log_buffer_records", "Usage records waiting for the disk")
        depth.add_metric((), usage.depth)
        capacity = GaugeMetricFamily("onnxserve_usage_log_buffer_capacity_records", "--usage-log-buffer-records")
        capacity.add_metric((), usage.capacity)
        written = CounterMetricFamily("onnxserve_usage_log_records", "Usage records written to the log")
        written.add_metric((), usage.written)
        refused = CounterMetricFamily(
            "onnxserve_usage_log_refused", "Requests refused (UNAVAILABLE) because the usage log's buffer was full"
        )
        refused.add_metric((), usage.refused)
        yield from (depth, capacity, written, refused)


class TenantLimitsCollector(Collector):
    """--tenant-limits at scrape time: what was refused and why, requests in flight, and each tenant's
    spend in the current UTC hour, day and month against its budget (`snapshot`: governor.limits_snapshot)."""

    def __init__(self, snapshot: Callable[[], dict[str, list]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        found = self.snapshot()
        refused = CounterMetricFamily(
            "onnxserve_tenant_refused", "Requests refused over a tenant limit, by reason", labels=("tenant", "reason")
        )
        for (tenant, reason), count in found["refused"]:
            refused.add_metric((tenant, reason), count)
        in_flight = GaugeMetricFamily(
            "onnxserve_tenant_in_flight_requests", "Each tenant's requests in flight", labels=("tenant",)
        )
        for tenant, count in found["in_flight"]:
            in_flight.add_metric((tenant,), count)
        spend = GaugeMetricFamily(
            "onnxserve_tenant_spend_dollars",
            "Each tenant's spend in the current UTC window (hour, day, month), as the usage log bills it",
            labels=("tenant", "window"),
        )
        for (tenant, window), dollars in found["spend"]:
            spend.add_metric((tenant, window), dollars)
        budget = GaugeMetricFamily(
            "onnxserve_tenant_budget_dollars", "Each tenant's budget for the window", labels=("tenant", "window")
        )
        for (tenant, window), dollars in found["budget"]:
            budget.add_metric((tenant, window), dollars)
        yield from (refused, in_flight, spend, budget)
