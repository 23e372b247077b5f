-- The index as the release before schema migrations made it on SQLite (its create_all:
-- dicomnode/store/tables.py at bf7b26d^), schema only: the tests add rows.
CREATE TABLE patient (
	id INTEGER NOT NULL,
	patient_id VARCHAR(64) NOT NULL,
	issuer_of_patient_id VARCHAR(64) NOT NULL,
	patient_name VARCHAR(324),
	patient_birth_date VARCHAR(8),
	patient_sex VARCHAR(16),
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ux_patient_key ON patient (patient_id, issuer_of_patient_id);
CREATE TABLE outbox_item (
	id INTEGER NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	file_path TEXT NOT NULL,
	destination VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME NOT NULL,
	last_status INTEGER,
	last_error TEXT,
	created_at DATETIME NOT NULL,
	sent_at DATETIME,
	job_pk INTEGER,
	PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ux_outbox_item_instance_destination ON outbox_item (sop_instance_uid, destination);
CREATE INDEX ix_outbox_item_due ON outbox_item (state, next_attempt_at);
CREATE INDEX ix_outbox_item_job_pk ON outbox_item (job_pk);
CREATE TABLE pseudonym_study (
	id INTEGER NOT NULL,
	pseudonymous_study_uid VARCHAR(64) NOT NULL,
	original_study_uid VARCHAR(64) NOT NULL,
	pseudonymous_patient_id VARCHAR(64) NOT NULL,
	patient_study JSON NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (pseudonymous_study_uid)
);
CREATE INDEX ix_pseudonym_study_original_study_uid ON pseudonym_study (original_study_uid);
CREATE TABLE rule_schedule (
	rule_name VARCHAR(64) NOT NULL,
	last_run_at DATETIME NOT NULL,
	PRIMARY KEY (rule_name)
);
CREATE TABLE study (
	id INTEGER NOT NULL,
	study_instance_uid VARCHAR(64) NOT NULL,
	patient_pk INTEGER NOT NULL,
	study_date VARCHAR(8),
	study_time VARCHAR(16),
	accession_number VARCHAR(16),
	study_id VARCHAR(16),
	study_description VARCHAR(64),
	state VARCHAR(16) NOT NULL,
	first_received_at DATETIME NOT NULL,
	last_received_at DATETIME NOT NULL,
	completed_at DATETIME,
	reopened_count INTEGER NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (study_instance_uid),
	FOREIGN KEY(patient_pk) REFERENCES patient (id)
);
CREATE INDEX ix_study_state ON study (state);
CREATE TABLE pseudonym_uid (
	id INTEGER NOT NULL,
	pseudonymous_uid VARCHAR(64) NOT NULL,
	original_uid VARCHAR(64) NOT NULL,
	study_pk INTEGER NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(study_pk) REFERENCES pseudonym_study (id)
);
CREATE UNIQUE INDEX ux_pseudonym_uid_study ON pseudonym_uid (pseudonymous_uid, study_pk);
CREATE INDEX ix_pseudonym_uid_study_pk ON pseudonym_uid (study_pk);
CREATE TABLE series (
	id INTEGER NOT NULL,
	series_instance_uid VARCHAR(64) NOT NULL,
	study_pk INTEGER NOT NULL,
	modality VARCHAR(16),
	series_description VARCHAR(64),
	series_number INTEGER,
	body_part_examined VARCHAR(16),
	frame_of_reference_uid VARCHAR(64),
	last_received_at DATETIME NOT NULL,
	geometry_dirty BOOLEAN NOT NULL,
	geometry_whole BOOLEAN,
	geometry_reason TEXT,
	geometry_frames INTEGER,
	slice_spacing FLOAT,
	orientation VARCHAR(16),
	PRIMARY KEY (id),
	UNIQUE (series_instance_uid),
	FOREIGN KEY(study_pk) REFERENCES study (id)
);
CREATE INDEX ix_series_study_pk ON series (study_pk);
CREATE INDEX ix_series_geometry_dirty ON series (geometry_dirty);
CREATE TABLE job (
	id INTEGER NOT NULL,
	rule_name VARCHAR(64) NOT NULL,
	model VARCHAR(64) NOT NULL,
	study_pk INTEGER NOT NULL,
	inputs_key VARCHAR(64) NOT NULL,
	bindings JSON NOT NULL,
	alternatives JSON,
	"trigger" VARCHAR(16) NOT NULL,
	state VARCHAR(16) NOT NULL,
	created_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	attempts INTEGER NOT NULL,
	error TEXT,
	timings JSON,
	results JSON,
	PRIMARY KEY (id),
	FOREIGN KEY(study_pk) REFERENCES study (id)
);
CREATE INDEX ix_job_study_pk ON job (study_pk);
CREATE UNIQUE INDEX ux_job_rule_inputs ON job (rule_name, inputs_key);
CREATE INDEX ix_job_state ON job (state);
CREATE TABLE instance (
	id INTEGER NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	series_pk INTEGER NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	transfer_syntax_uid VARCHAR(64) NOT NULL,
	instance_number INTEGER,
	image_type JSON,
	rows INTEGER,
	columns INTEGER,
	pixel_spacing JSON,
	slice_thickness FLOAT,
	image_position_patient JSON,
	image_orientation_patient JSON,
	frame_of_reference_uid VARCHAR(64),
	number_of_frames INTEGER NOT NULL,
	frame_positions JSON,
	calling_ae_title VARCHAR(16) NOT NULL,
	received_at DATETIME NOT NULL,
	file_path TEXT NOT NULL,
	file_size BIGINT NOT NULL,
	times_received INTEGER NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (sop_instance_uid),
	FOREIGN KEY(series_pk) REFERENCES series (id)
);
CREATE INDEX ix_instance_series_pk ON instance (series_pk);
