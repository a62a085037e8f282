"""Metrics: the catalog of every instrument the services export, the meter provider, and the /metrics endpoint.

Every instrument is declared once here (`CATALOG`) and created through `counter()`, `histogram()` and
`gauge()`, so the dashboards' test (tests/unit/runtime/test_dashboards.py) can check each PromQL expression
against the names the services really export. Names follow OpenTelemetry (`hapki.clm.issuance`); the
Prometheus exporter turns them into `hapki_clm_issuance_total` (counters get `_total`, a unit `s` gives
`_seconds`, `By` gives `_bytes`; attribute dots become underscores: `pki.profile` -> `pki_profile`).

Each process (`hapki serve cara|clm|watcher`) installs one MeterProvider with a Prometheus reader and serves
/metrics on its configured address (`MetricsConfig.listen`; fixed ports cara 9101, clm 9102, watcher 9103);
with OTEL_EXPORTER_OTLP_ENDPOINT (or ..._METRICS_ENDPOINT) set, metrics are also pushed by OTLP. Runtimes used
in-process (tests) record into whatever provider is installed: none means the API's no-op.

Sampled figures (queue depth, Galera node state) are read by `Sampler` tasks in the runtimes every
`MetricsConfig.sample_seconds`, not in the exporter's callbacks: those run on the scrape's thread and cannot await.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from opentelemetry import metrics
from opentelemetry.sdk.resources import Resource

from hapki.contracts.errors import HapkiError

if TYPE_CHECKING:
    from hapki.runtime.db import Database

__all__ = ["CATALOG", "LATENCY_BUCKETS", "PORTS", "MetricSpec", "Sampler", "State", "counter", "database_sample", "gauge", "histogram",
           "exported_names", "install_provider", "metrics_app"]

log = logging.getLogger("hapki.metrics")

Kind = Literal["counter", "histogram", "gauge"]

# The fixed ports of each service's /metrics (MetricsConfig defaults; the lab's Prometheus and compose scrape them).
PORTS: Mapping[str, int] = {"cara": 9101, "clm": 9102, "watcher": 9103}

# Seconds: issuance is milliseconds when all is well and seconds during a failover or a database stall.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricSpec:
    """One instrument: OpenTelemetry name, kind, unit (UCUM), description and the attributes it carries."""

    name: str
    kind: Kind
    unit: str
    description: str
    attributes: tuple[str, ...] = ()


_SPECS = (
    # CLM: what clients asked for and got (issue and renew), end to end as CLM sees it.
    MetricSpec("hapki.clm.issuance", "counter", "{request}",
               "Issue and renew requests answered by CLM, by profile and outcome (issued, pending, failed, "
               "rejected: refused before the CA; pki.error names the code)",
               ("pki.member", "pki.profile", "pki.outcome", "pki.error")),
    MetricSpec("hapki.clm.issuance.duration", "histogram", "s",
               "Time from CLM receiving an issue or renew request to its reply, by profile and outcome",
               ("pki.member", "pki.profile", "pki.outcome")),
    # CARA: the signer's role, its fencing epoch, role transitions, the work queue.
    MetricSpec("hapki.cara.signer.active", "gauge", "{state}",
               "1 while this member's signer consumes signing requests (active), 0 while passive", ("pki.member",)),
    MetricSpec("hapki.cara.signer.epoch", "gauge", "{epoch}",
               "The CARA epoch this member's signer holds (absent before it was first active)", ("pki.member",)),
    MetricSpec("hapki.cara.signer.signatures", "gauge", "{signature}",
               "Certificates signed through the HSM by each signer process of this member since that process "
               "started (pki.signer 0: the main process; 1..: signer workers, as they last reported, at most 1 s "
               "old); a count, use increase()", ("pki.member", "pki.signer")),
    MetricSpec("hapki.process.starts", "gauge", "{start}",
               "Starts of this service process under its supervisor (`hapki serve --supervise`): 1, plus one per "
               "restart after the process died unasked; 1 without a supervisor", ("pki.service",)),
    MetricSpec("hapki.cara.role.transitions", "counter", "{transition}",
               "Role transitions of this member's signer: active (a failover to or start on it), passive (VIP "
               "lost), fenced (stepped down: another member holds a newer epoch)",
               ("pki.member", "pki.transition")),
    MetricSpec("hapki.signing.queue.pending", "gauge", "{message}",
               "Signing requests in the JetStream work queue not yet delivered to a signer (sampled)",
               ("pki.member",)),
    MetricSpec("hapki.bus.replicas.behind", "gauge", "{replica}",
               "Replicas of the signing stream not current with its leader (sampled): one left behind after a "
               "partition may never catch up until its nats-server restarts", ("pki.member",)),
    MetricSpec("hapki.signing.queue.ack_pending", "gauge", "{message}",
               "Signing requests delivered to a signer and not yet acknowledged (sampled)", ("pki.member",)),
    MetricSpec("hapki.signing.intents.reserved", "gauge", "{intent}",
               "Signing intents reserved in the database and not resolved yet (issued or abandoned), of any "
               "member (sampled): in flight, or a signature whose outcome is not recorded yet", ("pki.member",)),
    MetricSpec("hapki.signing.intents.oldest_reserved_age", "gauge", "s",
               "Age of the oldest signing intent still reserved, 0 when none (sampled): milliseconds in normal "
               "work; minutes mean a signature nobody has accounted for yet", ("pki.member",)),
    # HSM pool, as this process sees it.
    MetricSpec("hapki.hsm.member.up", "gauge", "{state}",
               "1 while this process considers the HSM member usable, 0 while it is marked down", ("hsm.member",)),
    MetricSpec("hapki.hsm.sign.duration", "histogram", "s",
               "Time of one HSM signature (C_Sign, without the wait for the PKCS#11 lock), by member and outcome "
               "(ok; unavailable: no member could sign, hsm.member is none)", ("hsm.member", "pki.outcome")),
    MetricSpec("hapki.hsm.member.failures", "counter", "{failure}",
               "PKCS#11 failures that marked an HSM member down", ("hsm.member",)),
    # Galera nodes, as the service sees each of them.
    MetricSpec("hapki.db.node.up", "gauge", "{state}",
               "1 when the database node answered the last status query, 0 when it did not (sampled)",
               ("pki.member", "db.node")),
    MetricSpec("hapki.db.node.wsrep_local_state", "gauge", "{state}",
               "The node's wsrep_local_state (1 joining, 2 donor, 3 joined, 4 synced; sampled; absent: not Galera)",
               ("pki.member", "db.node")),
    MetricSpec("hapki.db.node.primary", "gauge", "{state}",
               "1 when the node's wsrep_cluster_status is Primary, else 0 (sampled; absent: not Galera)",
               ("pki.member", "db.node")),
    MetricSpec("hapki.db.node.cluster_size", "gauge", "{node}",
               "The node's wsrep_cluster_size (sampled; absent: not Galera)", ("pki.member", "db.node")),
    MetricSpec("hapki.ca.certificate.remaining", "gauge", "s",
               "Seconds until a certificate this member signs under expires: pki.certificate issuing_ca (the one "
               "issued from; `hapki ca rollover` makes a new one) or ocsp_signer, per pki.issuer served (renewed by "
               "the active member 30 days before; absent while it ends with its issuing CA)",
               ("pki.member", "pki.certificate", "pki.issuer")),
    MetricSpec("hapki.db.backup.age", "gauge", "s",
               "Seconds since the newest backup `hapki db backup` recorded was taken (sampled); absent: none yet",
               ("pki.member",)),
    MetricSpec("hapki.ca.arl.remaining", "gauge", "s",
               "Seconds until the root's CRL (the ARL, /crl/root.crl) passes its nextUpdate: `hapki ca arl` signs it "
               "again (valid 365 days); absent: none signed yet", ("pki.member",)),
    # OCSP and CRLs (CARA).
    MetricSpec("hapki.ocsp.responses", "counter", "{response}",
               "OCSP responses by status: good, revoked, unknown, or the error status (malformedRequest, unauthorized, "
               "tryLater, internalError)", ("ocsp.status",)),
    MetricSpec("hapki.ocsp.duration", "histogram", "s",
               "Time to answer one OCSP request, by status", ("ocsp.status",)),
    MetricSpec("hapki.crl.number", "gauge", "{crl}",
               "Number of the newest CRL this member published, by issuer and kind (full, delta)",
               ("pki.member", "pki.issuer", "crl.kind")),
    MetricSpec("hapki.crl.size", "gauge", "By", "DER size of the newest CRL this member published",
               ("pki.member", "pki.issuer", "crl.kind")),
    MetricSpec("hapki.crl.entries", "gauge", "{entry}", "Revoked certificates listed on the newest CRL",
               ("pki.member", "pki.issuer", "crl.kind")),
    MetricSpec("hapki.crl.generation.duration", "histogram", "s",
               "Time to build, sign and store one CRL (the fenced transaction included)",
               ("pki.member", "pki.issuer", "crl.kind")),
    # The watcher: this member's role as the kernel and the local service show it.
    MetricSpec("hapki.ha.role_changes", "counter", "{change}",
               "Role changes of this member seen by its watcher (active, passive, fault): failovers",
               ("pki.tier", "pki.member", "pki.role")),
    MetricSpec("hapki.ha.active", "gauge", "{state}",
               "1 while this member is the active one of its tier (holds the VIP and is healthy), else 0",
               ("pki.tier", "pki.member")),
    MetricSpec("hapki.ha.epoch", "gauge", "{epoch}", "The epoch this member's service reports", ("pki.tier", "pki.member")),
)

CATALOG: Mapping[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


def _meter(meter: metrics.Meter | None) -> metrics.Meter:
    # The API's global meter is a proxy until a provider is installed, then forwards to it: instruments created at
    # import or construction time still record once `install_provider` ran.
    return meter or metrics.get_meter("hapki")


def _spec(name: str, kind: Kind) -> MetricSpec:
    spec = CATALOG.get(name)
    if spec is None or spec.kind != kind:
        raise KeyError(f"{name} is not a {kind} in hapki.runtime.metrics.CATALOG")
    return spec


def counter(name: str, meter: metrics.Meter | None = None) -> metrics.Counter:
    """The counter `name` of the catalog."""
    spec = _spec(name, "counter")
    return _meter(meter).create_counter(spec.name, unit=spec.unit, description=spec.description)


def histogram(name: str, meter: metrics.Meter | None = None) -> metrics.Histogram:
    """The histogram `name` of the catalog (seconds, LATENCY_BUCKETS)."""
    spec = _spec(name, "histogram")
    return _meter(meter).create_histogram(spec.name, unit=spec.unit, description=spec.description,
                                          explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS))


def gauge(name: str, callback: Callable[[], Iterable[tuple[float, Mapping[str, str]]]],
          meter: metrics.Meter | None = None) -> None:
    """The observable gauge `name`: `callback` returns (value, attributes) pairs at each collection.

    Callbacks run on the exporter's thread (a scrape): they may only read state the owner keeps current.
    """
    spec = _spec(name, "gauge")

    def observe(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(value, dict(attributes)) for value, attributes in callback()]

    _meter(meter).create_observable_gauge(spec.name, callbacks=[observe], unit=spec.unit, description=spec.description)


class State:
    """The current values of one observable gauge, kept by their owners and read at each collection.

    One State per gauge name and process (`State.of`): the SDK keeps the first callback of an instrument name, so
    several owners (two runtimes in one test process) share it, each under its own attributes. A value is a
    number (`set`, for sampled figures) or a function read at collection (`watch`, for live state; None: no
    point). Safe across threads: the exporter collects on the scrape's thread.
    """

    _all: dict[str, State] = {}
    _all_lock = threading.Lock()

    def __init__(self, name: str, meter: metrics.Meter | None = None) -> None:
        self._values: dict[tuple[tuple[str, str], ...], float | Callable[[], float | None]] = {}
        self._lock = threading.Lock()
        gauge(name, self._observe, meter)

    @classmethod
    def of(cls, name: str) -> State:
        """The process's State of gauge `name` (created, with its gauge, on first use)."""
        with cls._all_lock:
            state = cls._all.get(name)
            if state is None:
                state = cls._all[name] = cls(name)
            return state

    def set(self, value: float, attributes: Mapping[str, str]) -> None:
        with self._lock:
            self._values[_key(attributes)] = value

    def watch(self, attributes: Mapping[str, str], source: Callable[[], float | None]) -> None:
        with self._lock:
            self._values[_key(attributes)] = source

    def discard(self, attributes: Mapping[str, str]) -> None:
        with self._lock:
            self._values.pop(_key(attributes), None)

    def _observe(self) -> list[tuple[float, Mapping[str, str]]]:
        with self._lock:
            items = list(self._values.items())
        points = []
        for key, value in items:
            current = value() if callable(value) else value
            if current is not None:
                points.append((float(current), dict(key)))
        return points


def _key(attributes: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(attributes.items()))


def exported_names() -> set[str]:
    """Every sample name the Prometheus exporter publishes for the catalog (histograms: _bucket, _sum, _count).

    Computed by the real exporter on a private registry: each instrument of CATALOG is created and given one
    value, then collected. The dashboards' test checks PromQL against this set.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("hapki.catalog")
    for spec in CATALOG.values():
        attributes = {key: "x" for key in spec.attributes}
        if spec.kind == "counter":
            counter(spec.name, meter).add(1, attributes)
        elif spec.kind == "histogram":
            histogram(spec.name, meter).record(0.01, attributes)
        else:
            gauge(spec.name, lambda attributes=attributes: [(1.0, attributes)], meter)
    names = {sample.name for family in registry.collect() for sample in family.samples}
    provider.shutdown()
    return names


def install_provider(resource: Resource) -> None:
    """Install the process's MeterProvider: a Prometheus reader (for /metrics), and OTLP when configured."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader

    readers: list[MetricReader] = [PrometheusMetricReader()]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))


def metrics_app() -> web.Application:
    """GET /metrics: the Prometheus text exposition of this process's registry."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    async def scrape(_request: web.Request) -> web.Response:
        # Collection runs the gauges' callbacks; they only read memory, so it is quick enough for the loop.
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


class Sampler:
    """Runs `sample()` every `interval` seconds until cancelled; a failed sample is logged and retried next time."""

    def __init__(self, what: str, sample: Callable[[], Awaitable[None]], interval: float) -> None:
        self._what, self._sample, self._interval = what, sample, interval

    async def run(self) -> None:
        while True:
            try:
                await self._sample()
            except HapkiError as exc:  # the sampled component is down: its figures say so, the log says why
                log.warning("%s sample failed: %s", self._what, exc)
            except Exception:  # a bug here must not end the sampling (nor the service): logged with its traceback
                log.exception("%s sample failed", self._what)
            await asyncio.sleep(self._interval)


def database_sample(db: Database, member: str) -> Callable[[], Awaitable[None]]:
    """A sample of every database node as this service sees it: up, wsrep_local_state, Primary, cluster size."""
    up, state = State.of("hapki.db.node.up"), State.of("hapki.db.node.wsrep_local_state")
    primary, size = State.of("hapki.db.node.primary"), State.of("hapki.db.node.cluster_size")

    async def sample() -> None:
        statuses = await asyncio.gather(*(db.node_status(node) for node in db.nodes), return_exceptions=True)
        for node, status in zip(db.nodes, statuses, strict=True):
            attributes = {"pki.member": member, "db.node": node}
            if isinstance(status, HapkiError):
                up.set(0, attributes)
                for gone in (state, primary, size):
                    gone.discard(attributes)
                continue
            if isinstance(status, BaseException):
                raise status
            up.set(1, attributes)
            if "wsrep_local_state" in status:  # a Galera node (the single-host env's MariaDB is not one)
                state.set(int(status["wsrep_local_state"]), attributes)
                primary.set(int(status.get("wsrep_cluster_status") == "Primary"), attributes)
                size.set(int(status.get("wsrep_cluster_size") or 0), attributes)

    return sample
