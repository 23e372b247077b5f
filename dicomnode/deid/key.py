"""Load the pseudonymization secret from a key file or an environment variable.

The key never comes from the configuration file (which is readable by more people and
often committed): the configuration may name a key *file*; the key itself lives there or in
the environment. No message raised here contains the key or any part of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from dicomnode.deid.uids import MIN_KEY_BYTES

__all__ = ["DEFAULT_KEY_ENV_VAR", "DeidKeyError", "load_key"]

DEFAULT_KEY_ENV_VAR: Final[str] = "DICOMNODE_DEID_KEY"
_TRAILING_WHITESPACE: Final[bytes] = b" \t\r\n"


class DeidKeyError(Exception):
    """The pseudonymization key is missing, unreadable or too short."""


def load_key(key_file: Path | None, env_var: str = DEFAULT_KEY_ENV_VAR) -> bytes:
    """Return the secret key: the bytes of ``key_file`` if given, else ``$env_var``.

    Trailing spaces, tabs and newlines are stripped from either source (editors and
    ``echo`` add them); everything else is used as is, so a text passphrase or raw random
    bytes both work. The key must be at least 16 bytes long after stripping.
    """
    if not env_var:
        raise DeidKeyError("the key environment variable name must not be empty")
    if key_file is not None:
        path = Path(key_file)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DeidKeyError(f"pseudonymization key file {path} does not exist") from None
        except IsADirectoryError:
            raise DeidKeyError(f"pseudonymization key file {path} is a directory") from None
        except OSError as exc:
            raise DeidKeyError(
                f"pseudonymization key file {path} cannot be read: {exc.strerror}"
            ) from None
        source = f"key file {path}"
    else:
        value = os.environ.get(env_var)
        if value is None or not value.strip():
            raise DeidKeyError(
                f"no pseudonymization key: set the environment variable {env_var} or "
                "configure a key file"
            )
        raw = value.encode("utf-8")
        source = f"environment variable {env_var}"
    key = raw.rstrip(_TRAILING_WHITESPACE)
    if len(key) < MIN_KEY_BYTES:
        raise DeidKeyError(
            f"the pseudonymization key from {source} is {len(key)} bytes; at least "
            f"{MIN_KEY_BYTES} are required"
        )
    return key
