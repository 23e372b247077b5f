"""The outbox: durable send-back of result objects to configured peers.

Every result object to be sent is one :class:`~dicomnode.store.tables.OutboxItem`
per destination (a peer name from the configuration) in the index, so what is
still to be sent survives restarts and crashes. Items move through these states::

    pending --claim--> sending --Success or warning------------------> sent
                          |----refused for good (final status)-------> failed
                          |----transient failure, attempts left------> pending (back-off)
                          '----transient failure, max_attempts reached> failed

    held --a user approves the job's results--> pending
        '--a user rejects them----------------> rejected (never sent)

* **Review** (``review: required`` rules, :mod:`dicomnode.jobs.review`): a job's items are
  queued ``held``: never due, never retried, not re-sendable, until a console user approves
  the job's results (:meth:`Outbox.release_held`: pending, due now) or rejects them
  (:meth:`Outbox.reject_held`: ``rejected``, for good).
* **Delivery** (:meth:`Outbox.deliver_due`, :meth:`Outbox.start_due`): the due items
  (pending, ``next_attempt_at`` reached) are grouped per destination and each
  destination is served by its own thread, over one association per round (more only
  past 128 presentation contexts), so a destination that is down or slow never delays
  the others. Presentation contexts and the C-STORE itself are those of
  :func:`dicomnode.send.scu.send_files`; a peer with ``dicomweb.url`` gets its items by
  STOW-RS instead (:func:`dicomnode.send.stow.stow_files`, the same results, the same
  transient and final failures, see there). Each item's file crosses the boundary
  (:class:`dicomnode.boundary.PeerBoundary`) at delivery: pseudonymized for a research
  peer, re-identified for a clinical one, or refused (``failed``), whoever queued it.
  Each response is committed as soon as it arrives, before the next C-STORE.
* **Claims**: a delivery first claims its items (state ``sending``, ``owner`` the node's
  ``node.id``, ``next_attempt_at`` holding the end of the claim's lease), so two
  deliveries (two nodes sharing the index, the node and ``dicomnode outbox send``) never
  send the same item at once; on PostgreSQL the due items are selected
  ``FOR UPDATE SKIP LOCKED``. While the round runs the lease is renewed every
  ``node.heartbeat_seconds`` (``heartbeat_at``); a claim whose owner is gone (killed, its
  machine lost) lapses after ``node.lease_seconds`` and the item is due again for any
  node, and a node starting again takes back its own claims at once
  (:meth:`Outbox.recover`); a live peer's claims are never taken. Only the owner records
  an outcome. An item is only ever marked ``sent`` on a Success (0x0000) or warning
  (0xBxxx) status, never lost.
* **Files**: an item's ``file_path`` is relative to ``storage.path`` (the storage root
  that all nodes sharing the index mount) when the file is under it, else absolute.
* **Transient failures**: the association cannot be established (peer down, rejected,
  aborted, ACSE timeout), it is lost or times out while sending, or the peer answers
  0xA7xx (out of resources) or 0xFE00 (cancel). The item is tried again after
  ``min(retry_initial_seconds * 2 ** (attempts - 1), retry_max_seconds)``; after
  ``max_attempts`` attempts it is ``failed``.
* **Final failures** (``failed`` at once, never retried): any other failure status
  (e.g. 0xA9xx data set does not match SOP class, 0xCxxx cannot understand, 0x0122
  SOP class not supported, 0x0211 unrecognized operation), a SOP class or transfer
  syntax the peer does not accept, a file that is missing or not DICOM, a destination
  no longer configured. ``dicomnode outbox resend ID`` makes such an item pending again.

Log lines name items by their index key, SOP classes by name and destinations by
peer name: never patient data.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.uid import UID
from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.boundary import BoundaryError, PeerBoundary, PeerCopy
from dicomnode.config import Config, OutboxConfig, PeerConfig
from dicomnode.deid import DeidKeyError
from dicomnode.dicom.status import Status
from dicomnode.send.scu import SendError, SendResult, send_files
from dicomnode.send.stow import stow_files
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.leases import Heartbeat, lease_end
from dicomnode.store.pseudonyms import PseudonymMap
from dicomnode.store.queries import count_by_state, iso_utc
from dicomnode.store.tables import OutboxItem, OutboxState, utcnow

__all__ = [
    "OUTBOX_SCHEMA_VERSION",
    "DeliveryReport",
    "DestinationReport",
    "Outbox",
    "OutboxError",
    "outbox_report",
    "relative_outbox_paths",
    "retry_delay",
]

LOG = logging.getLogger(__name__)

OUTBOX_SCHEMA_VERSION = 1

_DUE_STATES = (OutboxState.PENDING, OutboxState.SENDING)


def _due(now: dt.datetime) -> tuple[Any, ...]:
    """The conditions of an item due at ``now``: pending, or sending with its lease ended."""
    return (OutboxItem.state.in_(_DUE_STATES), OutboxItem.next_attempt_at <= now)


def _destination(peer: PeerConfig) -> bool:
    """Whether results can be sent to ``peer``: by C-STORE (host and port) or STOW-RS."""
    return bool((peer.host and peer.port) or peer.stow_url)


class OutboxError(ValueError):
    """An item cannot be queued or re-sent: unknown destination, unreadable file, no such item."""


def retry_delay(attempts: int, settings: OutboxConfig) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 for the first).

    ``min(retry_initial_seconds * 2 ** (attempts - 1), retry_max_seconds)``.
    """
    exponent = min(max(attempts - 1, 0), 62)  # 2**62 * anything positive exceeds any maximum
    return float(min(settings.retry_initial_seconds * 2**exponent, settings.retry_max_seconds))


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


@dataclass
class DestinationReport:
    """What one delivery round did for one destination."""

    destination: str
    sent: int = 0
    failed: int = 0
    retrying: int = 0
    released: int = 0  # claimed, then handed back unsent because the outbox is stopping
    error: str | None = None  # why the association could not be established, if it could not
    seconds: float = 0.0


@dataclass
class DeliveryReport:
    """What one delivery round did, per destination (only destinations with due items)."""

    destinations: dict[str, DestinationReport] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return sum(d.sent for d in self.destinations.values())

    @property
    def failed(self) -> int:
        return sum(d.failed for d in self.destinations.values())

    @property
    def retrying(self) -> int:
        return sum(d.retrying for d in self.destinations.values())


@dataclass(frozen=True)
class _Claim:
    """An item claimed for this round, as read from the index."""

    id: int
    path: str
    sop_class_uid: str
    attempts: int


def _read_header(path: Path) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) of a DICOM file, read without its pixel data."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception as exc:  # missing, unreadable, not DICOM, truncated
        raise OutboxError(f"{path}: cannot be queued: {type(exc).__name__}: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or
                    (meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_instance:
        raise OutboxError(f"{path}: cannot be queued: no SOPClassUID or SOPInstanceUID")
    return sop_class, sop_instance


class Outbox:
    """The outbox of one node: queue result objects, deliver them, re-send them.

    Thread-safe; deliveries to different destinations run concurrently, each
    destination is delivered by at most one thread of this object at a time.
    """

    def __init__(self, index: Index, peers: Mapping[str, PeerConfig], *, ae_title: str,
                 settings: OutboxConfig | None = None,
                 boundary: PeerBoundary | None = None, owner: str = "local",
                 root: Path | None = None, lease_seconds: float | None = None,
                 heartbeat_seconds: float | None = None) -> None:
        """``boundary`` makes each file fit for its destination at delivery (default: one
        without a key or a folder for copies, which refuses what would need either).

        ``owner`` names this node in its claims (``node.id``); ``root`` is the storage
        root files under which are recorded relative to it; ``lease_seconds`` is the
        length of a claim, renewed every ``heartbeat_seconds`` while a round runs (None:
        a claim long enough for every C-STORE of the round to time out, not renewed).

        Raises:
            ValueError: ``heartbeat_seconds`` without ``lease_seconds``, or not below it.
        """
        if heartbeat_seconds is not None and (lease_seconds is None
                                              or heartbeat_seconds >= lease_seconds):
            raise ValueError("heartbeat_seconds needs a longer lease_seconds")
        self.owner = owner
        self.root = None if root is None else root.resolve()
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._claimed: dict[str, set[int]] = {}  # per destination, while its round runs
        self._heartbeat: Heartbeat | None = None
        self.index = index
        self.peers = dict(peers)
        self.boundary = boundary or PeerBoundary(peers, PseudonymMap(index), out_dir=None)
        self.ae_title = ae_title
        self.settings = settings or OutboxConfig()
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()

    @classmethod
    def from_config(cls, config: Config, index: Index) -> Outbox:
        """The outbox of a configured node: its peers, its AE title and ``outbox`` settings."""
        return cls(index, config.peers, ae_title=config.node.ae_title, settings=config.outbox,
                   boundary=PeerBoundary.from_config(config, PseudonymMap(index)),
                   owner=config.node.node_id, root=config.storage.path,
                   lease_seconds=config.node.lease_seconds,
                   heartbeat_seconds=config.node.heartbeat_seconds)

    def stored_path(self, path: Path) -> str:
        """How a file's path is recorded: relative to the storage root when under it."""
        resolved = path.resolve()
        if self.root is not None and resolved.is_relative_to(self.root):
            return resolved.relative_to(self.root).as_posix()
        return str(resolved)

    def file_of(self, stored: str) -> Path:
        """The file a recorded path names on this node."""
        path = Path(stored)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    @property
    def destinations(self) -> list[str]:
        """The peers items can be sent to: those with a host and a port (C-STORE), or a
        DICOMweb URL (STOW-RS)."""
        return sorted(n for n, p in self.peers.items() if _destination(p))

    def _check_destination(self, name: str) -> PeerConfig:
        peer = self.peers.get(name)
        if peer is None or not _destination(peer):
            known = ", ".join(self.destinations) or "none configured"
            what = ("is not a configured peer" if peer is None
                    else "has no host and port, nor dicomweb.url")
            raise OutboxError(f"destination {name!r} {what}; peers with host and port or "
                              f"dicomweb.url: {known}")
        return peer

    # ---------------------------------------------------------------- queueing

    def enqueue(self, paths: Iterable[Path | str], destinations: Iterable[str], *,
                job_pk: int | None = None, held: bool = False) -> list[int]:
        """Queue each file for each destination; returns the item ids, in that order.

        Idempotent: an instance already queued for a destination (in any state) keeps
        its item, whose id is returned; ``resend`` sends it again. ``held``: new items wait
        for a user's review (state ``held``) instead of being due now.

        Raises:
            OutboxError: a destination is not a peer with host and port, or a file
                cannot be read as DICOM; nothing is queued then.
        """
        names = list(dict.fromkeys(destinations))
        if not names:
            raise OutboxError("no destination given")
        for name in names:
            self._check_destination(name)
        files = [(self.stored_path(Path(p)), *_read_header(Path(p))) for p in paths]
        for attempt in range(2):
            try:
                return self._insert(files, names, job_pk, held)
            except IntegrityError:  # the same instance queued at the same time elsewhere
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _insert(self, files: list[tuple[str, str, str]], names: list[str],
                job_pk: int | None, held: bool = False) -> list[int]:
        ids: list[int] = []
        added = 0
        now = utcnow()
        with self.index.session() as session:
            for path, sop_class, sop_instance in files:
                for name in names:
                    found = session.scalar(select(OutboxItem.id).where(
                        OutboxItem.sop_instance_uid == sop_instance,
                        OutboxItem.destination == name))
                    if found is not None:
                        ids.append(found)
                        continue
                    item = OutboxItem(sop_instance_uid=sop_instance, sop_class_uid=sop_class,
                                      file_path=path, destination=name,
                                      state=OutboxState.HELD if held
                                      else OutboxState.PENDING, attempts=0,
                                      next_attempt_at=now, created_at=now, job_pk=job_pk)
                    session.add(item)
                    session.flush()
                    ids.append(item.id)
                    added += 1
            session.commit()
        if added:
            LOG.info("outbox: queued %d item(s) for %s%s", added, ", ".join(names),
                     " (held for review)" if held else "")
        return ids

    def resend(self, item_id: int) -> OutboxState:
        """Make an item pending again, due now, with a fresh budget of attempts.

        Returns the state the item had. Raises OutboxError when there is no such item,
        when it is being sent right now, or when its destination is not configured.
        """
        now = utcnow()
        with self.index.session() as session:
            item = session.get(OutboxItem, item_id)
            if item is None:
                raise OutboxError(f"no outbox item {item_id}")
            if item.state is OutboxState.SENDING and item.next_attempt_at > now:
                raise OutboxError(f"outbox item {item_id} is being sent right now")
            if item.state is OutboxState.HELD:
                raise OutboxError(f"outbox item {item_id} awaits the review of job "
                                  f"{item.job_pk}'s results: approve them in the console")
            if item.state is OutboxState.REJECTED:
                raise OutboxError(f"outbox item {item_id}: job {item.job_pk}'s results were "
                                  "rejected in review; they are never sent")
            self._check_destination(item.destination)
            was = item.state
            item.state = OutboxState.PENDING
            item.attempts = 0
            item.next_attempt_at = now
            item.sent_at = None
            session.commit()
        LOG.info("outbox item %d -> %s: pending again (was %s)", item_id, item.destination,
                 was.value)
        return was

    def cancel_jobs(self, job_ids: Iterable[int], *, reason: str) -> int:
        """Cancel the items of these jobs that are not sent and not being sent (pending or
        failed), e.g. the results of a job's version that a newer one superseded; returns
        how many. ``resend`` can still send a cancelled item."""
        with self.index.session() as session:
            result = cast(CursorResult[Any], session.execute(
                update(OutboxItem).where(
                    OutboxItem.job_pk.in_(list(job_ids)),
                    OutboxItem.state.in_((OutboxState.PENDING, OutboxState.FAILED,
                                          OutboxState.HELD)))
                .values(state=OutboxState.CANCELLED, last_error=reason[:200])
                .execution_options(synchronize_session=False)))
            session.commit()
        return int(result.rowcount or 0)

    def release_held(self, job_ids: Iterable[int], *, session: Session | None = None) -> int:
        """A user approved these jobs' results: their held items are pending, due now;
        returns how many. With ``session`` the change is made in the caller's transaction
        (not committed here)."""
        return self._decide_held(job_ids, OutboxState.PENDING, None, session)

    def reject_held(self, job_ids: Iterable[int], *, reason: str,
                    session: Session | None = None) -> int:
        """A user rejected these jobs' results: their held items are ``rejected`` and never
        sent; returns how many. ``session``: as :meth:`release_held`."""
        return self._decide_held(job_ids, OutboxState.REJECTED, reason[:200], session)

    def _decide_held(self, job_ids: Iterable[int], state: OutboxState, error: str | None,
                     session: Session | None) -> int:
        statement = (update(OutboxItem).where(OutboxItem.job_pk.in_(list(job_ids)),
                                              OutboxItem.state == OutboxState.HELD)
                     .values(state=state, next_attempt_at=utcnow(), last_error=error)
                     .execution_options(synchronize_session=False))
        if session is not None:
            result = cast(CursorResult[Any], session.execute(statement))
        else:
            with self.index.session() as own:
                result = cast(CursorResult[Any], own.execute(statement))
                own.commit()
        count = int(result.rowcount or 0)
        LOG.info("outbox: %d held item(s) now %s", count, state.value)
        return count

    def recover(self) -> int:
        """At node start-up: return to ``pending``, due now, the items this node
        (``owner``) left ``sending`` and those whose claim lapsed (their node is gone).
        Items another live node is sending (its lease renewed) are left to it.

        Delivery is at-least-once: of the items a dead process left ``sending``, those
        it never sent go now for the first time, and at most the one whose C-STORE was
        answered just before the crash (the response arrived, its commit did not) reaches
        its destination again, under the same SOP Instance UID.
        """
        now = utcnow()
        with self.index.session() as session:
            result = cast(CursorResult[Any], session.execute(
                update(OutboxItem).where(
                    OutboxItem.state == OutboxState.SENDING,
                    or_(OutboxItem.owner == self.owner, OutboxItem.owner.is_(None),
                        OutboxItem.next_attempt_at <= now))
                .values(state=OutboxState.PENDING, next_attempt_at=now, owner=None)
                .execution_options(synchronize_session=False)))
            session.commit()
        count = int(result.rowcount or 0)
        if count:
            LOG.info("outbox: %d item(s) interrupted while being sent are pending again; the "
                     "one in flight at the interruption may reach its destination twice "
                     "(same SOP Instance UID)", count)
        return count

    def renew(self) -> int:
        """Extend the claims of the items this outbox is sending (the heartbeat); returns
        how many it still holds."""
        with self._lock:
            ids = [i for claimed in self._claimed.values() for i in claimed]
        if not ids or self.lease_seconds is None:
            return 0
        now = utcnow()
        with self.index.session() as session:
            result = cast(CursorResult[Any], session.execute(
                update(OutboxItem).where(OutboxItem.id.in_(ids),
                                         OutboxItem.state == OutboxState.SENDING,
                                         OutboxItem.owner == self.owner)
                .values(next_attempt_at=lease_end(self.lease_seconds, now), heartbeat_at=now)
                .execution_options(synchronize_session=False)))
            session.commit()
        return int(result.rowcount or 0)

    # ---------------------------------------------------------------- delivery

    def due(self, now: dt.datetime | None = None) -> dict[str, int]:
        """How many items are due per destination at ``now`` (default: the current time)."""
        now = now or utcnow()
        with self.index.session() as session:
            rows = session.execute(
                select(OutboxItem.destination, func.count(OutboxItem.id))
                .where(*_due(now))
                .group_by(OutboxItem.destination)).all()
        return {name: int(count) for name, count in rows}

    def deliver_due(self, now: dt.datetime | None = None) -> DeliveryReport:
        """Deliver every due item, one thread per destination, and wait for all of them.

        ``now`` (naive UTC, default: the current time) decides which items are due and,
        moved on by the time the round takes, dates the outcomes (``sent_at``,
        ``next_attempt_at``). A destination already being delivered by another thread of
        this outbox is left to that thread.
        """
        now = now or utcnow()
        started = self._start(now)
        report = DeliveryReport()
        for name, (thread, box) in started.items():
            thread.join()
            report.destinations[name] = box[0] if box else DestinationReport(
                name, error="delivery thread ended without a report")
        return report

    def start_due(self, now: dt.datetime | None = None) -> list[str]:
        """Start delivering every due item in the background (the node's scheduled job).

        Destinations still busy with an earlier round are skipped; returns the names
        of the destinations a delivery was started for.
        """
        return sorted(self._start(now or utcnow()))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop delivering: items not yet sent are handed back; wait up to ``timeout`` s.

        The item being sent when this is called finishes (its response is recorded).
        """
        self._stopping.set()
        with self._lock:
            heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                LOG.warning("outbox: delivery to %s still running at stop; its items are "
                            "returned to pending at the next start", thread.name[7:])

    def _start(self, now: dt.datetime) -> dict[str, tuple[threading.Thread,
                                                            list[DestinationReport]]]:
        if self._stopping.is_set():
            return {}
        started: dict[str, tuple[threading.Thread, list[DestinationReport]]] = {}
        for name in sorted(self.due(now)):
            if name not in self.destinations:
                self._fail_unconfigured(name, now)
                continue
            with self._lock:
                if name in self._busy:
                    continue
                self._busy.add(name)
                if self._heartbeat is None and self.heartbeat_seconds is not None:
                    self._heartbeat = Heartbeat(self.heartbeat_seconds, self.renew,
                                                name="outbox-heartbeat").start()
                box: list[DestinationReport] = []
                thread = threading.Thread(target=self._run, args=(name, now, box),
                                          name=f"outbox-{name}", daemon=True)
                self._threads.add(thread)
            thread.start()
            started[name] = (thread, box)
        return started

    def _run(self, name: str, now: dt.datetime, box: list[DestinationReport]) -> None:
        try:
            box.append(self._deliver(name, now))
        except Exception:
            LOG.exception("outbox: delivery to %s failed", name)
        finally:
            with self._lock:
                self._busy.discard(name)
                self._threads.discard(threading.current_thread())
                # a round that ended abnormally renews nothing: its claims lapse
                self._claimed.pop(name, None)

    def _fail_unconfigured(self, name: str, now: dt.datetime) -> None:
        message = (f"destination {name!r} is not configured (peers.{name} with host and port, "
                   "or dicomweb.url); "
                   "configure it and resend the item")
        with self.index.session() as session:
            ids = session.scalars(select(OutboxItem.id).where(
                OutboxItem.destination == name, *_due(now))).all()
            session.execute(
                update(OutboxItem).where(OutboxItem.id.in_(ids))
                .values(state=OutboxState.FAILED, last_status=None, last_error=message)
                .execution_options(synchronize_session=False))
            session.commit()
        for item_id in ids:
            LOG.error("outbox item %d -> %s: failed: destination not configured", item_id, name)

    def _claim(self, name: str, now: dt.datetime) -> list[_Claim]:
        """Claim the due items of one destination (state ``sending`` until a lease ends)."""
        with self.index.session() as session:
            query = (select(OutboxItem.id, OutboxItem.state, OutboxItem.next_attempt_at,
                            OutboxItem.file_path, OutboxItem.sop_class_uid,
                            OutboxItem.attempts)
                     .where(OutboxItem.destination == name, *_due(now))
                     .order_by(OutboxItem.id))
            if not self.index.is_sqlite:  # rows another node is claiming are skipped
                query = query.with_for_update(skip_locked=True, of=OutboxItem)
            rows = session.execute(query).all()
            if not rows:
                session.commit()
                return []
            if self.lease_seconds is not None:  # renewed by the heartbeat
                lease = dt.timedelta(seconds=self.lease_seconds)
            else:  # long enough for the association and every C-STORE to time out once
                lease = dt.timedelta(seconds=self.settings.timeout_seconds * (2 + 2 * len(rows)))
            claimed: list[_Claim] = []
            for item_id, state, next_at, path, sop_class, attempts in rows:
                result = cast(CursorResult[Any], session.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id == item_id, OutboxItem.state == state,
                           OutboxItem.next_attempt_at == next_at)
                    .values(state=OutboxState.SENDING, next_attempt_at=now + lease,
                            owner=self.owner, heartbeat_at=now)
                    .execution_options(synchronize_session=False)))
                if result.rowcount == 1:  # not claimed meanwhile by another process
                    claimed.append(_Claim(item_id, str(self.file_of(path)), sop_class,
                                          attempts))
            session.commit()
        with self._lock:
            self._claimed.setdefault(name, set()).update(c.id for c in claimed)
        return claimed

    def _deliver(self, name: str, now: dt.datetime) -> DestinationReport:
        started = time.monotonic()
        report = DestinationReport(name)

        def clock() -> dt.datetime:  # ``now`` moved on by the time this round has taken
            return now + dt.timedelta(seconds=time.monotonic() - started)

        claims = self._claim(name, now)
        if not claims:
            return report
        peer = self.peers[name]
        waiting: dict[str, list[_Claim]] = {}
        copies: dict[str, PeerCopy] = {}
        for claim in claims:
            problem = None
            if not Path(claim.path).is_file():
                problem = "file missing: the result object was removed"
            elif claim.path not in copies:
                try:  # whoever queued it, the file crosses the boundary here
                    copies[claim.path] = self.boundary.copy(Path(claim.path), name)
                except (BoundaryError, DeidKeyError) as exc:
                    problem = f"refused at the boundary: {exc}"
                except Exception as exc:  # unreadable: the message could quote values
                    problem = f"not a readable DICOM file ({type(exc).__name__})"
            if problem is None:
                waiting.setdefault(claim.path, []).append(claim)
            else:
                self._record(claim, name, report, SendResult(Path(claim.path), None, problem),
                             clock())

        def on_result(result: SendResult) -> None:
            for claim in waiting.pop(str(result.path), []):
                self._record(claim, name, report, result, clock())

        def record_unsent(message: str, *, transient: bool) -> None:
            """The items the send reported nothing for: not sent, for ``message``."""
            for claim in [c for group in waiting.values() for c in group]:
                self._record(claim, name, report, SendResult(
                    Path(claim.path), None, message, transient=transient), clock())

        try:
            if waiting:  # by the peer's kind: STOW-RS to a DICOMweb URL, else C-STORE
                send = stow_files if peer.stow_url else partial(send_files, self.ae_title)
                send(peer, name, [copies[p] for p in waiting],
                     timeout=self.settings.timeout_seconds, on_result=on_result,
                     cancel=self._stopping)
        except SendError as exc:
            report.error = str(exc)
            record_unsent(str(exc), transient=exc.transient)
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}"
            LOG.exception("outbox: delivery to %s failed", name)
            record_unsent(report.error, transient=True)
        else:
            record_unsent("no result reported", transient=True)
        finally:
            for copy in copies.values():  # made for this round; a retry makes them again
                if copy.path != copy.source:
                    copy.path.unlink(missing_ok=True)
        report.seconds = time.monotonic() - started
        return report

    def _record(self, claim: _Claim, name: str, report: DestinationReport,
                result: SendResult, at: dt.datetime) -> None:
        """Commit one item's outcome and log it in one line."""
        what = f"outbox item {claim.id} ({_sop_class_name(claim.sop_class_uid)}) -> {name}"
        attempts = claim.attempts + 1
        values: dict[str, Any] = {"last_status": result.status, "attempts": attempts}
        if result.ok:
            success = result.status == Status.SUCCESS
            values.update(state=OutboxState.SENT, sent_at=at,
                          last_error=None if success else result.message)
            report.sent += 1
            note = "" if success else f" with warning {result.message}"
            LOG.info("%s: sent%s (attempt %d)", what, note, attempts)
        elif result.cancelled:
            values = {"state": OutboxState.PENDING, "next_attempt_at": at}
            report.released += 1
            LOG.info("%s: not sent, stopping; pending again", what)
        elif result.transient and attempts < self.settings.max_attempts:
            delay = retry_delay(attempts, self.settings)
            values.update(state=OutboxState.PENDING, last_error=result.message,
                          next_attempt_at=at + dt.timedelta(seconds=delay))
            report.retrying += 1
            LOG.warning("%s: not sent (attempt %d of %d): %s; next attempt in %g s", what,
                        attempts, self.settings.max_attempts, result.message, delay)
        else:
            message = result.message
            if result.transient:
                message = f"gave up after {attempts} attempts: {message}"
            values.update(state=OutboxState.FAILED, last_error=message)
            report.failed += 1
            LOG.error("%s: failed, not retried: %s", what, message)
        values["owner"] = None
        with self.index.session() as session:
            done = cast(CursorResult[Any], session.execute(
                update(OutboxItem).where(OutboxItem.id == claim.id,
                                         OutboxItem.state == OutboxState.SENDING,
                                         OutboxItem.owner == self.owner)
                .values(**values).execution_options(synchronize_session=False)))
            if done.rowcount == 1:
                audit.item_outcome(session, claim.id, values["state"], result.status)
            session.commit()
        with self._lock:
            self._claimed.get(name, set()).discard(claim.id)
        if done.rowcount != 1:
            LOG.warning("%s: this node's claim lapsed and another node took the item over; "
                        "this outcome is not recorded", what)


# -------------------------------------------------------------------- reporting


def _item(item: OutboxItem, root: Path | None) -> dict[str, Any]:
    path = Path(item.file_path)
    return {
        "id": item.id,
        "state": item.state.value,
        "destination": item.destination,
        "sop_class_uid": item.sop_class_uid,
        "sop_class_name": _sop_class_name(item.sop_class_uid),
        "sop_instance_uid": item.sop_instance_uid,
        "file_path": str(path if path.is_absolute() or root is None else root / path),
        "job_id": item.job_pk,
        "attempts": item.attempts,
        "next_attempt_at": (iso_utc(item.next_attempt_at)
                            if item.state is OutboxState.PENDING else None),
        "last_status": item.last_status,
        "last_error": item.last_error,
        "created_at": iso_utc(item.created_at),
        "sent_at": iso_utc(item.sent_at),
        "owner": item.owner if item.state is OutboxState.SENDING else None,
    }


def outbox_report(index: Index, *, state: OutboxState | str | None = None,
                  destination: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """The outbox as a JSON-ready dict (stable keys, see docs/outbox-json.md).

    ``counts`` covers every item; ``items`` only those of ``state`` and
    ``destination`` when given, ordered by id. ``file_path`` is absolute: a path recorded
    relative to the storage root is joined to ``root`` (``storage.path``).
    """
    counts = count_by_state(index, OutboxItem.state, OutboxState)
    with index.session() as session:
        query = select(OutboxItem).order_by(OutboxItem.id)
        if state is not None:
            query = query.where(OutboxItem.state == OutboxState(state))
        if destination is not None:
            query = query.where(OutboxItem.destination == destination)
        items = [_item(item, root) for item in session.scalars(query)]
    return {"schema": OUTBOX_SCHEMA_VERSION, "counts": counts, "items": items}


def relative_outbox_paths(index: Index, root: Path) -> int:
    """Record relative to ``root`` the absolute outbox paths under it (as earlier releases
    recorded them), so that every node mounting the storage root finds the files; returns
    how many. Idempotent."""
    root = root.resolve()
    changed = 0
    with index.session() as session:
        rows = session.execute(select(OutboxItem.id, OutboxItem.file_path)).all()
        for item_id, stored in rows:
            path = Path(stored)
            if path.is_absolute() and path.is_relative_to(root):
                session.execute(update(OutboxItem).where(OutboxItem.id == item_id)
                                .values(file_path=path.relative_to(root).as_posix())
                                .execution_options(synchronize_session=False))
                changed += 1
        session.commit()
    if changed:
        LOG.info("outbox: %d file path(s) now recorded relative to the storage root", changed)
    return changed
