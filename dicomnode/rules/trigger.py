"""Firing rules on received studies, and recording each firing as a job.

Rules are evaluated when a study completes, and also as soon as a series of a
study that is still receiving settles (its geometry verdict is computed): a
rule then fires early when every series it binds is present and whole, so it
need not wait for the study's quiet time. A rule fires only when each bound
image series is geometrically whole. Each firing becomes a :class:`Job` row,
unique per (rule, input series in order): the same rule on the same input
series never fires twice, whatever triggers it again. Rules with a
``schedule`` do not fire on arrival; the scheduler runs them in batches.
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

from dicomnode.store.db import Index
from dicomnode.store.tables import Job, Series

from .engine import Match, evaluate, evaluate_series_level
from .indexed import study_series_views
from .loader import Rule, RuleSet
from .nodes import Level

__all__ = ["Firing", "RuleTrigger", "inputs_key"]

LOG = logging.getLogger(__name__)


def inputs_key(rule_name: str, series_uids: Sequence[str]) -> str:
    """The identity of a firing: the rule and its input series, in channel order."""
    return hashlib.sha256("\0".join([rule_name, *series_uids]).encode()).hexdigest()


@dataclass(frozen=True)
class Firing:
    """The outcome of one rule on one study: a job created, or why not."""

    rule: str
    matched: bool
    job_id: int | None
    reason: str
    existing_job: int | None = None  # the job that already fired on the same inputs


class RuleTrigger:
    """Evaluates the enabled, unscheduled rules on a study and records firings."""

    def __init__(self, index: Index, rules: RuleSet | None, store_root: Path) -> None:
        self.index = index
        self.rules = rules
        self.store_root = store_root

    def matches(self, session: Session, rule: Rule, study_pk: int) -> list[Match]:
        views = study_series_views(session, study_pk, self.store_root)
        if rule.statement.select is Level.SERIES:
            return evaluate_series_level(rule.statement, views)
        return [evaluate(rule.statement, views)]

    def on_study(self, study_pk: int, *, trigger: str, early: bool = False,
                 rules: Sequence[Rule] | None = None) -> list[Firing]:
        """Evaluate rules on a study; ``early`` for a study that is still receiving."""
        if rules is not None:
            chosen = list(rules)
        elif self.rules is not None:
            chosen = [r for r in self.rules.enabled if r.schedule is None]
        else:
            chosen = []
        firings: list[Firing] = []
        with self.index.session() as session:
            for rule in chosen:
                for match in self.matches(session, rule, study_pk):
                    firings.append(self._fire(session, rule, study_pk, match, trigger, early))
        for f in firings:
            if f.job_id is not None:
                LOG.info("rule %s fired on study %d (%s): job %d", f.rule, study_pk, trigger,
                         f.job_id)
            elif f.matched and not early:
                LOG.info("rule %s matched study %d but did not fire: %s", f.rule, study_pk,
                         f.reason)
        return firings

    def _fire(self, session: Session, rule: Rule, study_pk: int, match: Match, trigger: str,
              early: bool) -> Firing:
        if not match.matched:
            return Firing(rule.name, False, None, "no match")
        uids = [view.key for _, view in match.bindings]
        rows = {s.series_instance_uid: s for s in session.scalars(
            select(Series).where(Series.series_instance_uid.in_(uids))).all()}
        for name, uid in zip(rule.input_names, uids, strict=False):
            series = rows[uid]
            if series.geometry_dirty:
                return Firing(rule.name, True, None, f"series {name} is still arriving")
            if series.geometry_whole is False:
                return Firing(rule.name, True, None,
                              f"series {name} (series {series.id}) is not whole: "
                              f"{series.geometry_reason}")
        key = inputs_key(rule.name, uids)
        existing = session.scalars(select(Job.id).where(Job.rule_name == rule.name,
                                                        Job.inputs_key == key)).first()
        if existing is not None:
            return Firing(rule.name, True, None, f"already fired as job {existing}",
                          existing_job=existing)
        job = Job(rule_name=rule.name, model=rule.model, study_pk=study_pk, inputs_key=key,
                  bindings=[[n, v.key] for n, v in match.bindings],
                  alternatives=dict(match.alternatives) or None,
                  trigger="early" if early else trigger)
        session.add(job)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            return Firing(rule.name, True, None, "already fired")
        return Firing(rule.name, True, job.id, "fired")
