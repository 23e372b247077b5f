"""Human-readable explanations of rule evaluation (``dicomnode rules test``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from dicomnode.store.db import Index
from dicomnode.store.tables import Series, Study

from .loader import Rule
from .trigger import RuleTrigger

__all__ = ["explain_study"]


def explain_study(index: Index, store_root: Path, study_pk: int, rules: Sequence[Rule]) -> str:
    """How each rule evaluates on one study: per clause and series, with the values compared."""
    trigger = RuleTrigger(index, None, store_root)
    lines: list[str] = []
    with index.session() as session:
        study = session.get(Study, study_pk)
        assert study is not None
        series = session.scalars(select(Series).where(Series.study_pk == study_pk)
                                 .order_by(Series.id)).all()
        by_uid = {s.series_instance_uid: s for s in series}
        lines.append(f"study {study.id} {study.study_instance_uid} ({study.state.value}), "
                     f"{len(series)} series")
        for s in series:
            verdict = ("pending" if s.geometry_dirty else
                       "not an image series" if s.geometry_whole is None else
                       "whole" if s.geometry_whole else f"not whole: {s.geometry_reason}")
            lines.append(f"  series {s.id}: {s.modality or '?'} #{s.series_number} "
                         f"{s.series_description or ''!r} ({verdict})")
        for rule in rules:
            for match in trigger.matches(session, rule, study_pk):
                if match.matched:
                    bound = ", ".join(f"{name} = series {by_uid[v.key].id}"
                                      for name, v in match.bindings)
                    lines.append(f"rule {rule.name}: MATCH ({bound}) -> model {rule.model}")
                    for name, others in match.alternatives.items():
                        if others:
                            ids = ", ".join(f"series {by_uid[k].id}" for k in others
                                            if k in by_uid)
                            lines.append(f"  {name} could also have been: {ids}")
                else:
                    lines.append(f"rule {rule.name}: no match")
                lines.extend(f"  {line}" for line in match.explanation)
    return "\n".join(lines)
