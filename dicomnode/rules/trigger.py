"""Firing rules on received studies, and recording each firing as a version of a job.

A rule fires on a study when its statement matches, every series it binds is settled
(:mod:`dicomnode.completion`) and geometrically whole, and the study is ready for it:

* the study has been quiet for the rule's wait (``wait_seconds``, else
  ``completion.quiet_seconds``): ``trigger`` ``complete`` (or ``quiet``);
* or, while the study is still receiving (``early``), when every bound series settled by
  reaching the size its instances state, or when the rule names ``require_series`` and
  all of them are there and settled (mercure's "series received" trigger).

Each firing is a :class:`Job` row, identified by the rule, its input series in channel
order (:func:`inputs_key`) and a ``version``. The instances of the input series at firing
time give the job's ``content_key``: the same rule on the same, unchanged input never fires
twice, whatever triggers it again; when instances arrived or were replaced after a job was
created, the rule fires again as the next version (a job still pending just takes the new
content). Rules with a ``schedule`` do not fire on arrival; the scheduler runs them in
batches.

``when_incomplete`` acts on a study whose ``require_series`` have not all arrived after
``after_seconds`` of quiet: ``run`` fires with what the statement binds, ``discard``
records a discarded job (nothing runs until the study receives more), ``wait`` keeps
waiting.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.states import JobState, JobTrigger
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.tables import Instance, Job, Series, Study
from dicomnode.store.tables import utcnow as _utcnow

from .engine import Match, evaluate, evaluate_series_level
from .indexed import study_series_views
from .loader import IncompleteAction, Rule, RuleSet
from .nodes import Level

__all__ = ["Firing", "RuleTrigger", "content_key", "inputs_key"]

LOG = logging.getLogger(__name__)

#: Triggers that do not wait for the study's quiet time: an operator's word, a schedule,
#: ``when_incomplete``'s ``run`` (see :attr:`dicomnode.states.JobTrigger.forced`).
FORCED_TRIGGERS = frozenset(t for t in JobTrigger if t.forced)


def inputs_key(rule_name: str, series_uids: Sequence[str]) -> str:
    """The identity of a firing: the rule and its input series, in channel order."""
    return hashlib.sha256("\0".join([rule_name, *series_uids]).encode()).hexdigest()


def content_key(session: Session, series_uids: Sequence[str]) -> tuple[str, int]:
    """A digest of the instances of the input series (SOP Instance UID and the time each
    was received, so a replaced instance changes it, an identical re-send does not), and
    their number."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.received_at).join(Series)
        .where(Series.series_instance_uid.in_(list(series_uids)))).all()
    digest = hashlib.sha256()
    for uid, received in sorted((str(u), r.isoformat()) for u, r in rows):
        digest.update(f"{uid}@{received}\0".encode())
    return digest.hexdigest(), len(rows)


@dataclass(frozen=True)
class Firing:
    """The outcome of one rule on one study: a job created, or why not."""

    rule: str
    matched: bool
    job_id: int | None
    reason: str
    existing_job: int | None = None  # the job that already fired on the same input
    version: int | None = None


class RuleTrigger:
    """Evaluates the enabled, unscheduled rules on a study and records firings."""

    def __init__(self, index: Index, rules: RuleSet | None, store_root: Path, *,
                 quiet_seconds: float = 0.0) -> None:
        self.index = index
        self.rules = rules
        self.store_root = store_root
        self.quiet_seconds = quiet_seconds  # the wait of rules without ``wait_seconds``

    def matches(self, session: Session, rule: Rule, study_pk: int) -> list[Match]:
        views = study_series_views(session, study_pk, self.store_root)
        if rule.statement.select is Level.SERIES:
            return evaluate_series_level(rule.statement, views)
        return [evaluate(rule.statement, views)]

    def _chosen(self, rules: Sequence[Rule] | None) -> list[Rule]:
        if rules is not None:
            return list(rules)
        if self.rules is not None:
            return [r for r in self.rules.enabled if r.schedule is None]
        return []

    def on_study(self, study_pk: int, *, trigger: JobTrigger | str,
                 rules: Sequence[Rule] | None = None, quiet_for: float = 0.0) -> list[Firing]:
        """Evaluate rules on a study (all enabled unscheduled ones by default). ``trigger``
        says why: ``complete`` (the study has been quiet for ``completion.quiet_seconds``),
        ``settled``, ``quiet`` (it has been quiet for ``quiet_for`` seconds, a rule's wait)
        fire only the rules the study is ready for; ``manual``, ``schedule`` do not wait.

        Raises:
            ValueError: ``trigger`` is not a :class:`dicomnode.states.JobTrigger` value.
        """
        trigger = JobTrigger(trigger)
        if trigger is JobTrigger.COMPLETE:
            quiet_for = max(quiet_for, self.quiet_seconds)
        firings: list[Firing] = []
        with self.index.session() as session:
            received = session.scalars(select(Study.last_received_at)
                                       .where(Study.id == study_pk)).one()
            quiet_for = max(quiet_for, (_utcnow() - received).total_seconds())
            for rule in self._chosen(rules):
                early = not trigger.forced and quiet_for < self.wait(rule)
                for match in self.matches(session, rule, study_pk):
                    firings.append(self._fire(session, rule, study_pk, match,
                                              JobTrigger.EARLY if early else trigger, early))
            audit.record_firings(session, study_pk, trigger.value, firings)
            session.commit()
        self._log(study_pk, trigger, firings, quiet_misses=trigger is JobTrigger.SETTLED)
        return firings

    def wait(self, rule: Rule) -> float:
        """How long a study must be quiet before ``rule`` fires without other reason (s)."""
        return self.quiet_seconds if rule.wait_seconds is None else rule.wait_seconds

    def on_incomplete(self, study_pk: int, rules: Sequence[Rule]) -> list[Firing]:
        """Act on a study that has been quiet for the rules' ``when_incomplete`` time."""
        firings: list[Firing] = []
        with self.index.session() as session:
            for rule in rules:
                if rule.when_incomplete is None:
                    continue
                matches = self.matches(session, rule, study_pk)
                firings.extend(self._incomplete(session, rule, study_pk, m) for m in matches)
            audit.record_firings(session, study_pk, JobTrigger.INCOMPLETE.value, firings)
            session.commit()
        self._log(study_pk, JobTrigger.INCOMPLETE, firings, quiet_misses=False)
        return firings

    @staticmethod
    def _log(study_pk: int, trigger: JobTrigger, firings: list[Firing], *,
             quiet_misses: bool) -> None:
        for f in firings:
            if f.job_id is not None:
                LOG.info("rule %s fired on study %d (%s): job %d version %s", f.rule, study_pk,
                         trigger.value, f.job_id, f.version)
            elif f.matched and not quiet_misses and f.existing_job is None:
                LOG.info("rule %s matched study %d but did not fire: %s", f.rule, study_pk,
                         f.reason)

    # -- one rule, one match ------------------------------------------------------------

    def _missing_required(self, session: Session, rule: Rule, study_pk: int,
                          match: Match) -> list[str]:
        """The ``require_series`` entries not there yet (bound names are checked with the
        bound series; other entries need a settled series whose description has them)."""
        bound = {name for name, _ in match.bindings} if match.matched else set()
        texts = [r for r in rule.require_series if r not in rule.input_names]
        missing = [r for r in rule.require_series if r in rule.input_names and r not in bound]
        if texts:
            descriptions = [(d or "").casefold() for d in session.scalars(
                select(Series.series_description).where(
                    Series.study_pk == study_pk, Series.geometry_dirty.is_(False))).all()]
            missing += [t for t in texts
                        if not any(t.casefold() in d for d in descriptions)]
        return missing

    def _fire(self, session: Session, rule: Rule, study_pk: int, match: Match,
              trigger: JobTrigger, early: bool, *, force_incomplete: bool = False) -> Firing:
        if not match.matched:
            return Firing(rule.name, False, None, "no match")
        uids = [view.key for _, view in match.bindings]
        rows = {s.series_instance_uid: s for s in session.scalars(
            select(Series).where(Series.series_instance_uid.in_(uids))).all()}
        bound = [rows[uid] for uid in uids]
        for name, series in zip(rule.input_names, bound, strict=False):
            if series.geometry_dirty:
                return Firing(rule.name, True, None, f"series {name} is still arriving")
            if series.geometry_whole is False:
                return Firing(rule.name, True, None,
                              f"series {name} (series {series.id}) is not whole: "
                              f"{series.geometry_reason}")
        missing = [] if force_incomplete else self._missing_required(
            session, rule, study_pk, match)
        if missing:
            return Firing(rule.name, True, None,
                          f"waiting for required series {', '.join(missing)}")
        ready = not early or bool(rule.require_series) or all(s.settled_by_size for s in bound)
        if not ready:
            return Firing(rule.name, True, None, "waiting for the study's quiet time")
        return self._record(session, rule, study_pk, match, uids, trigger)

    def _record(self, session: Session, rule: Rule, study_pk: int, match: Match,
                uids: list[str], trigger: JobTrigger) -> Firing:
        key = inputs_key(rule.name, uids)
        content, count = content_key(session, uids)
        latest = session.scalars(
            select(Job).where(Job.rule_name == rule.name, Job.inputs_key == key)
            .order_by(Job.version.desc())).first()
        if latest is not None and latest.content_key in (content, None) \
                and latest.state is not JobState.DISCARDED:
            return Firing(rule.name, True, None,
                          f"already fired as job {latest.id} (version {latest.version})",
                          existing_job=latest.id, version=latest.version)
        if latest is not None and latest.state is JobState.PENDING:
            # not started yet: it runs on the new content, as the same version
            latest.changes = _changes(latest, count, latest.changes)
            latest.content_key, latest.instance_count = content, count
            session.commit()
            return Firing(rule.name, True, None,
                          f"job {latest.id} (version {latest.version}) takes the new instances",
                          existing_job=latest.id, version=latest.version)
        version = 1 if latest is None else latest.version + 1
        job = Job(rule_name=rule.name, model=rule.model, study_pk=study_pk, inputs_key=key,
                  bindings=[[n, v.key] for n, v in match.bindings],
                  alternatives=dict(match.alternatives) or None,
                  trigger=trigger, version=version, content_key=content,
                  instance_count=count,
                  changes=None if latest is None else _changes(latest, count, None),
                  outputs=None if rule.outputs is None else list(rule.outputs),
                  send_to=list(rule.send_to), priority=rule.priority.rank)
        session.add(job)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            return Firing(rule.name, True, None, "already fired")
        return Firing(rule.name, True, job.id, "fired", version=version)

    def _incomplete(self, session: Session, rule: Rule, study_pk: int, match: Match) -> Firing:
        assert rule.when_incomplete is not None
        missing = self._missing_required(session, rule, study_pk, match)
        if not missing:  # nothing is missing: the normal path decides
            return self._fire(session, rule, study_pk, match, JobTrigger.QUIET, False)
        action = rule.when_incomplete.action
        what = f"required series {', '.join(missing)} did not arrive"
        if action is IncompleteAction.WAIT:
            return Firing(rule.name, match.matched, None, f"{what}; waiting")
        if action is IncompleteAction.RUN and match.matched:
            LOG.warning("rule %s runs on study %d without its required series %s", rule.name,
                        study_pk, ", ".join(missing))
            return self._fire(session, rule, study_pk, match, JobTrigger.INCOMPLETE, False,
                              force_incomplete=True)
        return self._discard(session, rule, study_pk, what)

    def _discard(self, session: Session, rule: Rule, study_pk: int, reason: str) -> Firing:
        """Record that the rule gave up on the study as it is now (a discarded job)."""
        received = session.scalars(select(Study.last_received_at)
                                   .where(Study.id == study_pk)).one()
        key = inputs_key(rule.name, [f"discarded:{study_pk}:{received.isoformat()}"])
        existing = session.scalars(select(Job.id).where(Job.rule_name == rule.name,
                                                        Job.inputs_key == key)).first()
        if existing is not None:
            return Firing(rule.name, False, None, reason, existing_job=existing)
        job = Job(rule_name=rule.name, model=rule.model, study_pk=study_pk, inputs_key=key,
                  bindings=[], trigger=JobTrigger.INCOMPLETE, state=JobState.DISCARDED,
                  error=f"discarded: {reason}", finished_at=_utcnow(),
                  send_to=list(rule.send_to), priority=rule.priority.rank)
        session.add(job)
        session.commit()
        LOG.warning("rule %s discarded study %d: %s", rule.name, study_pk, reason)
        return Firing(rule.name, False, None, f"discarded: {reason}", existing_job=job.id)


def _changes(previous: Job, count: int, before: str | None) -> str:
    """What changed in the input since ``previous`` (for ``dicomnode jobs``)."""
    old = previous.instance_count
    if old is None:
        return before or "input changed"
    delta = count - old
    text = (f"{delta:+d} instance(s), {count} now" if delta else
            f"instances replaced, {count} now")
    return f"{text} (since version {previous.version})"
