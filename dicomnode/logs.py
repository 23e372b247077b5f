"""Logging set-up: one line per event, no patient identity.

pynetdicom's own loggers are kept at WARNING: at INFO and DEBUG they print
request identifiers and dataset contents. pydicom quotes the values it rejects
(``Invalid value for VR DA: '1980-01-02'``, a birth date): :func:`hide_dicom_values`
takes quoted values out of the records of pydicom, pynetdicom and highdicom and
routes their warnings, which carry the same text, into that redacted log.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Final

__all__ = ["ValueRedactor", "hide_dicom_values", "setup_logging"]

#: Loggers of the libraries that read DICOM values and may quote them.
DICOM_LOGGERS: Final[tuple[str, ...]] = ("pydicom", "pynetdicom", "highdicom", "py.warnings")
_QUOTED: Final[re.Pattern[str]] = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"|b'[^'\n]*'")


class ValueRedactor(logging.Filter):
    """Replace every quoted value in a DICOM library's log record by ``<value hidden>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in ("pydicom", "pynetdicom", "highdicom", "py"):
            message = record.getMessage()
            hidden = _QUOTED.sub("<value hidden>", message)
            if hidden != message:
                record.msg, record.args = hidden, None
        return True


_REDACTOR = ValueRedactor()


def hide_dicom_values() -> None:
    """Redact the DICOM libraries' log records (idempotent); their warnings, which repeat
    what pydicom logs, go to the ``py.warnings`` logger, redacted as well."""
    for name in DICOM_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)
    # pydicom's warn_and_log() logs and warns the same text: the warning is not needed
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
    logging.captureWarnings(True)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_REDACTOR)  # child loggers (pynetdicom.assoc...) pass through here
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    hide_dicom_values()
