"""``/metrics``: the node's figures in the Prometheus text format.

Everything but the refused associations is read from the index at scrape time, with
aggregate queries (COUNT, SUM, GROUP BY): the figures survive restarts and are the same
whichever process serves them. Refused associations leave no row in the index; they are
counted in the process that runs the SCP (:class:`RefusalCounter`) and start again from
zero when it restarts, as a Prometheus counter may.

Metrics (labels are fixed words, states and configured peer names: never patient
identity, UIDs, AE titles or addresses):

* ``dicomnode_instances_received_total``: C-STOREs that were stored, identical re-sends
  included (the sum of ``Instance.times_received``);
* ``dicomnode_received_bytes_total``: their bytes (each stored file's size times the times
  it was received);
* ``dicomnode_instances_stored``, ``dicomnode_stored_bytes``: instances in the store now;
* ``dicomnode_associations_refused_total{reason}``: one of
  :data:`dicomnode.net.access.REFUSAL_KINDS`;
* ``dicomnode_studies{state}``, ``dicomnode_jobs{state}``, ``dicomnode_outbox_items{state}``:
  rows per state (every state is listed, zero included);
* ``dicomnode_studies_by_status{status}``: studies per operator's status (receiving,
  waiting for series, ready, processing, results sent, failed; see
  :mod:`dicomnode.store.studystatus`), every status listed;
* ``dicomnode_inference_seconds``: histogram of the ``inference`` step of done jobs;
* ``dicomnode_outbox_backlog_items{destination}``: pending and sending items per peer;
* ``dicomnode_outbox_failed_items{destination}``: items given up per peer (a resend makes
  one pending again, so this is a gauge);
* ``dicomnode_free_disk_bytes``, ``dicomnode_disk_size_bytes``: the storage file system.

The two ``_total`` counters of received instances are sums over the index: a retention
run that deletes instances lowers them, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import case, func, select

from dicomnode.net.access import REFUSAL_KINDS, REFUSED_OTHER
from dicomnode.states import StudyStatus
from dicomnode.store.db import Index
from dicomnode.store.queries import count_by_state
from dicomnode.store.studystatus import study_status
from dicomnode.store.tables import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Study,
    StudyState,
)

__all__ = [
    "CONTENT_TYPE",
    "INFERENCE_BUCKETS",
    "IndexCollector",
    "RefusalCounter",
    "metrics_text",
]

#: The content type of what :func:`metrics_text` returns (the classic text format 0.0.4,
#: which ``generate_latest`` writes and every Prometheus reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the ``dicomnode_inference_seconds`` buckets.
INFERENCE_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class RefusalCounter:
    """Refused associations per reason, counted in this process (thread-safe).

    Give :meth:`increment` to the SCP as its ``on_refused`` hook. Reasons outside
    ``REFUSAL_KINDS`` are counted as ``other``, so the label set stays small and fixed.
    """

    def __init__(self) -> None:
        self._counts = dict.fromkeys(REFUSAL_KINDS, 0)
        self._lock = threading.Lock()

    def increment(self, reason: str) -> None:
        """Count one refused association."""
        key = reason if reason in self._counts else REFUSED_OTHER
        with self._lock:
            self._counts[key] += 1

    def counts(self) -> dict[str, int]:
        """A copy of the counts, every known reason included (zero or more)."""
        with self._lock:
            return dict(self._counts)


def _usable_path(path: Path) -> Path:
    """``path`` or its nearest existing parent (the store may not exist yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


class IndexCollector:
    """A prometheus_client collector over the index, queried on each ``collect()``."""

    def __init__(self, index: Index, *, refused: RefusalCounter, storage_path: Path) -> None:
        self.index = index
        self.refused = refused
        self.storage_path = Path(storage_path)

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the index

    def collect(self) -> Iterator[Metric]:
        yield from self._received()
        yield self._refusals()
        yield self._states("dicomnode_studies", "Studies in the index per state.",
                           Study.state, StudyState)
        yield self._states("dicomnode_studies_by_status",
                           "Studies per operator's status (dicomnode.store.studystatus).",
                           study_status(), StudyStatus, label="status")
        yield self._states("dicomnode_jobs", "Jobs per state.", Job.state, JobState)
        yield self._inference()
        yield from self._outbox()
        yield from self._disk()

    def _received(self) -> Iterator[Metric]:
        with self.index.session() as session:
            received, received_bytes, stored, stored_bytes = session.execute(select(
                func.coalesce(func.sum(Instance.times_received), 0),
                func.coalesce(func.sum(Instance.file_size * Instance.times_received), 0),
                func.count(Instance.id),
                func.coalesce(func.sum(Instance.file_size), 0),
            )).one()
        yield CounterMetricFamily(
            "dicomnode_instances_received",
            "C-STOREs stored, identical re-sends included (sum of times received over the "
            "index).", value=int(received))
        yield CounterMetricFamily(
            "dicomnode_received_bytes",
            "Bytes received in stored C-STOREs (file size times times received).",
            value=int(received_bytes))
        yield GaugeMetricFamily("dicomnode_instances_stored", "Instances in the store.",
                                value=int(stored))
        yield GaugeMetricFamily("dicomnode_stored_bytes", "Bytes of the instances in the store.",
                                value=int(stored_bytes))

    def _refusals(self) -> Metric:
        family = CounterMetricFamily(
            "dicomnode_associations_refused",
            "Associations refused since this process started, per reason.", labels=["reason"])
        for reason, n in sorted(self.refused.counts().items()):
            family.add_metric([reason], n)
        return family

    def _states(self, name: str, documentation: str, column: Any,
                states: Iterable[Any], *, label: str = "state") -> Metric:
        family = GaugeMetricFamily(name, documentation, labels=[label])
        for state, n in count_by_state(self.index, column, states).items():
            family.add_metric([state], n)
        return family

    def _inference(self) -> Metric:
        seconds = Job.timings["inference"].as_float()
        columns = [func.count(seconds), func.coalesce(func.sum(seconds), 0.0)]
        columns += [func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0)
                    for bound in INFERENCE_BUCKETS]
        with self.index.session() as session:
            row = session.execute(
                select(*columns).where(Job.state == JobState.DONE)).one()
        count, total, cumulative = int(row[0]), float(row[1]), [int(n) for n in row[2:]]
        buckets = [(_bound(b), float(n)) for b, n in zip(INFERENCE_BUCKETS, cumulative,
                                                            strict=True)]
        buckets.append(("+Inf", float(count)))
        return HistogramMetricFamily(
            "dicomnode_inference_seconds",
            "Seconds of the inference step of done jobs (their last run).",
            buckets=buckets, sum_value=total)

    def _outbox(self) -> Iterator[Metric]:
        yield self._states("dicomnode_outbox_items", "Outbox items per state.",
                           OutboxItem.state, OutboxState)
        backlog: dict[str, int] = {}
        failed: dict[str, int] = {}
        with self.index.session() as session:
            rows = session.execute(
                select(OutboxItem.destination, OutboxItem.state, func.count())
                .where(OutboxItem.state.in_(
                    (OutboxState.PENDING, OutboxState.SENDING, OutboxState.FAILED)))
                .group_by(OutboxItem.destination, OutboxItem.state))
            for destination, state, n in rows:
                target = failed if state is OutboxState.FAILED else backlog
                target[destination] = target.get(destination, 0) + int(n)
        family = GaugeMetricFamily(
            "dicomnode_outbox_backlog_items",
            "Outbox items pending or being sent, per destination peer.",
            labels=["destination"])
        for destination, n in sorted(backlog.items()):
            family.add_metric([destination], n)
        yield family
        family = GaugeMetricFamily(
            "dicomnode_outbox_failed_items",
            "Outbox items given up (refused for good or out of attempts), per destination "
            "peer.", labels=["destination"])
        for destination, n in sorted(failed.items()):
            family.add_metric([destination], n)
        yield family

    def _disk(self) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(_usable_path(self.storage_path))
        except OSError:
            return
        yield GaugeMetricFamily("dicomnode_free_disk_bytes",
                                "Free bytes on the storage file system.", value=usage.free)
        yield GaugeMetricFamily("dicomnode_disk_size_bytes",
                                "Size in bytes of the storage file system.", value=usage.total)


def _bound(bound: float) -> str:
    return repr(float(bound))


def metrics_text(index: Index, *, refused: RefusalCounter,
                 storage_path: Path) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` answer, read from the index now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IndexCollector(index, refused=refused, storage_path=storage_path))
    return generate_latest(registry), CONTENT_TYPE
