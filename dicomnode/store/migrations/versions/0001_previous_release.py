"""The index of the release before migrations (baseline).

Revision ID: 0001
Revises: (none)

The tables as ``create_all`` made them before job versions and stated series sizes
(revision 0002). An index made before migrations (no ``alembic_version`` table) is upgraded
from here: a table it already has is left as it is, a missing one is created.
Enumerated states are ``VARCHAR(16)`` (SQLAlchemy ``Enum(native_enum=False)``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.schema import SchemaItem

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_STATE = sa.String(length=16)


def _tables() -> list[tuple[str, list[SchemaItem], list[tuple[str, list[str], bool]]]]:
    """(table, columns and constraints, indexes as (name, columns, unique)) in creation order."""
    return [
        ("patient", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("patient_id", sa.String(length=64), nullable=False),
            sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
            sa.Column("patient_name", sa.String(length=324), nullable=True),
            sa.Column("patient_birth_date", sa.String(length=8), nullable=True),
            sa.Column("patient_sex", sa.String(length=16), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        ], [("ux_patient_key", ["patient_id", "issuer_of_patient_id"], True)]),
        ("study", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("patient_pk", sa.Integer(), nullable=False),
            sa.Column("study_date", sa.String(length=8), nullable=True),
            sa.Column("study_time", sa.String(length=16), nullable=True),
            sa.Column("accession_number", sa.String(length=16), nullable=True),
            sa.Column("study_id", sa.String(length=16), nullable=True),
            sa.Column("study_description", sa.String(length=64), nullable=True),
            sa.Column("state", _STATE, nullable=False),
            sa.Column("first_received_at", sa.DateTime(), nullable=False),
            sa.Column("last_received_at", sa.DateTime(), nullable=False),
            sa.Column("completed_at", sa.DateTime(), nullable=True),
            sa.Column("reopened_count", sa.Integer(), nullable=False),
            sa.ForeignKeyConstraint(["patient_pk"], ["patient.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("study_instance_uid"),
        ], [("ix_study_state", ["state"], False)]),
        ("series", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("study_pk", sa.Integer(), nullable=False),
            sa.Column("modality", sa.String(length=16), nullable=True),
            sa.Column("series_description", sa.String(length=64), nullable=True),
            sa.Column("series_number", sa.Integer(), nullable=True),
            sa.Column("body_part_examined", sa.String(length=16), nullable=True),
            sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True),
            sa.Column("last_received_at", sa.DateTime(), nullable=False),
            sa.Column("geometry_dirty", sa.Boolean(), nullable=False),
            sa.Column("geometry_whole", sa.Boolean(), nullable=True),
            sa.Column("geometry_reason", sa.Text(), nullable=True),
            sa.Column("geometry_frames", sa.Integer(), nullable=True),
            sa.Column("slice_spacing", sa.Float(), nullable=True),
            sa.Column("orientation", sa.String(length=16), nullable=True),
            sa.ForeignKeyConstraint(["study_pk"], ["study.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("series_instance_uid"),
        ], [("ix_series_geometry_dirty", ["geometry_dirty"], False),
            ("ix_series_study_pk", ["study_pk"], False)]),
        ("instance", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("series_pk", sa.Integer(), nullable=False),
            sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
            sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
            sa.Column("instance_number", sa.Integer(), nullable=True),
            sa.Column("image_type", sa.JSON(), nullable=True),
            sa.Column("rows", sa.Integer(), nullable=True),
            sa.Column("columns", sa.Integer(), nullable=True),
            sa.Column("pixel_spacing", sa.JSON(), nullable=True),
            sa.Column("slice_thickness", sa.Float(), nullable=True),
            sa.Column("image_position_patient", sa.JSON(), nullable=True),
            sa.Column("image_orientation_patient", sa.JSON(), nullable=True),
            sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True),
            sa.Column("number_of_frames", sa.Integer(), nullable=False),
            sa.Column("frame_positions", sa.JSON(), nullable=True),
            sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
            sa.Column("received_at", sa.DateTime(), nullable=False),
            sa.Column("file_path", sa.Text(), nullable=False),
            sa.Column("file_size", sa.BigInteger(), nullable=False),
            sa.Column("times_received", sa.Integer(), nullable=False),
            sa.ForeignKeyConstraint(["series_pk"], ["series.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("sop_instance_uid"),
        ], [("ix_instance_series_pk", ["series_pk"], False)]),
        ("job", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("rule_name", sa.String(length=64), nullable=False),
            sa.Column("model", sa.String(length=64), nullable=False),
            sa.Column("study_pk", sa.Integer(), nullable=False),
            sa.Column("inputs_key", sa.String(length=64), nullable=False),
            sa.Column("bindings", sa.JSON(), nullable=False),
            sa.Column("alternatives", sa.JSON(), nullable=True),
            sa.Column("trigger", sa.String(length=16), nullable=False),
            sa.Column("state", _STATE, nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("started_at", sa.DateTime(), nullable=True),
            sa.Column("finished_at", sa.DateTime(), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("timings", sa.JSON(), nullable=True),
            sa.Column("results", sa.JSON(), nullable=True),
            sa.ForeignKeyConstraint(["study_pk"], ["study.id"]),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_job_state", ["state"], False),
            ("ix_job_study_pk", ["study_pk"], False),
            ("ux_job_rule_inputs", ["rule_name", "inputs_key"], True)]),
        ("outbox_item", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
            sa.Column("file_path", sa.Text(), nullable=False),
            sa.Column("destination", sa.String(length=64), nullable=False),
            sa.Column("state", _STATE, nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
            sa.Column("last_status", sa.Integer(), nullable=True),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("sent_at", sa.DateTime(), nullable=True),
            sa.Column("job_pk", sa.Integer(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_outbox_item_due", ["state", "next_attempt_at"], False),
            ("ix_outbox_item_job_pk", ["job_pk"], False),
            ("ux_outbox_item_instance_destination", ["sop_instance_uid", "destination"],
             True)]),
        ("pseudonym_study", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("pseudonymous_study_uid", sa.String(length=64), nullable=False),
            sa.Column("original_study_uid", sa.String(length=64), nullable=False),
            sa.Column("pseudonymous_patient_id", sa.String(length=64), nullable=False),
            sa.Column("patient_study", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("pseudonymous_study_uid"),
        ], [("ix_pseudonym_study_original_study_uid", ["original_study_uid"], False)]),
        ("pseudonym_uid", [
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("pseudonymous_uid", sa.String(length=64), nullable=False),
            sa.Column("original_uid", sa.String(length=64), nullable=False),
            sa.Column("study_pk", sa.Integer(), nullable=False),
            sa.ForeignKeyConstraint(["study_pk"], ["pseudonym_study.id"]),
            sa.PrimaryKeyConstraint("id"),
        ], [("ix_pseudonym_uid_study_pk", ["study_pk"], False),
            ("ux_pseudonym_uid_study", ["pseudonymous_uid", "study_pk"], True)]),
        ("rule_schedule", [
            sa.Column("rule_name", sa.String(length=64), nullable=False),
            sa.Column("last_run_at", sa.DateTime(), nullable=False),
            sa.PrimaryKeyConstraint("rule_name"),
        ], []),
    ]


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    for name, items, indexes in _tables():
        if name in present:  # an index made before migrations: kept as it is
            continue
        op.create_table(name, *items)
        for index_name, columns, unique in indexes:
            op.create_index(index_name, name, columns, unique=unique)


def downgrade() -> None:
    for name, _items, _indexes in reversed(_tables()):
        op.drop_table(name)
