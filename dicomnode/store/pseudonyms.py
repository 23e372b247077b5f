"""The pseudonym map in the index: pseudonymous study and UIDs -> original identity.

Pseudonymization is deterministic (a keyed hash), so recording the same instance twice
changes nothing. The map is what re-identification reads to give a result made from
pseudonymized inputs its original patient, study and references back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select

from dicomnode.deid.record import PseudonymizationRecord
from dicomnode.store.db import Index
from dicomnode.store.tables import PseudonymStudy, PseudonymUID

__all__ = ["PseudonymMap", "StudyIdentity"]

_QUERY_CHUNK = 500  # UIDs per IN (...) query, far below SQLite's parameter limit


@dataclass(frozen=True, repr=False)
class StudyIdentity:
    """What re-identification of one pseudonymous study needs (holds identity: never log).

    ``uid_map`` maps pseudonymous UIDs to original ones; ``patient_study`` holds the
    original patient and study attributes.
    """

    original_study_uid: str
    uid_map: dict[str, str]
    patient_study: dict[str, Any]

    def __repr__(self) -> str:
        return f"StudyIdentity(uids={len(self.uid_map)}, <identity hidden>)"


class PseudonymMap:
    """Record and look up pseudonyms in the index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def record(self, records: Iterable[PseudonymizationRecord]) -> int:
        """Store what ``records`` replaced; returns how many new UIDs were stored.

        The first record of a study stores its patient and study attributes; UIDs
        already known are left as they are.
        """
        by_study: dict[str, tuple[PseudonymizationRecord, dict[str, str]]] = {}
        for rec in records:
            _first, pairs = by_study.setdefault(rec.study_instance_uid[1], (rec, {}))
            pairs.update({pseudo: original for original, pseudo in rec.uid_map.items()})
        added = 0
        with self.index.session() as session, session.begin():
            for pseudo_study, (rec, pairs) in by_study.items():
                study = session.scalars(select(PseudonymStudy).where(
                    PseudonymStudy.pseudonymous_study_uid == pseudo_study)).first()
                if study is None:
                    study = PseudonymStudy(
                        pseudonymous_study_uid=pseudo_study,
                        original_study_uid=rec.study_instance_uid[0],
                        pseudonymous_patient_id=rec.pseudonymous_patient_id,
                        patient_study=dict(rec.patient_study))
                    session.add(study)
                    session.flush()
                wanted = list(pairs)
                known: set[str] = set()
                for start in range(0, len(wanted), _QUERY_CHUNK):
                    known.update(session.scalars(select(PseudonymUID.pseudonymous_uid).where(
                        PseudonymUID.study_pk == study.id,
                        PseudonymUID.pseudonymous_uid.in_(wanted[start:start + _QUERY_CHUNK]))))
                new = [{"pseudonymous_uid": pseudo, "original_uid": original,
                        "study_pk": study.id}
                       for pseudo, original in pairs.items() if pseudo not in known]
                if new:
                    session.execute(insert(PseudonymUID), new)
                added += len(new)
        return added

    def is_pseudonymous_study(self, study_uid: str) -> bool:
        """Whether ``study_uid`` is a pseudonym this node made."""
        with self.index.session() as session:
            found = session.scalars(select(PseudonymStudy.id).where(
                PseudonymStudy.pseudonymous_study_uid == study_uid)).first()
        return found is not None

    def study(self, pseudonymous_study_uid: str) -> StudyIdentity | None:
        """The identity behind a pseudonymous study, or None when the map has none."""
        with self.index.session() as session:
            study = session.scalars(select(PseudonymStudy).where(
                PseudonymStudy.pseudonymous_study_uid == pseudonymous_study_uid)).first()
            if study is None:
                return None
            rows = session.execute(select(PseudonymUID.pseudonymous_uid,
                                          PseudonymUID.original_uid)
                                   .where(PseudonymUID.study_pk == study.id)).all()
            return StudyIdentity(study.original_study_uid, {p: o for p, o in rows},
                                 dict(study.patient_study))
