"""One base class for every error a user can fix.

An error that names the file, line, field or flag at fault derives from `UserError`; the
`autodeco` entry point catches `UserError` once, prints ``autodeco <command>: error: <message>``
on one line and exits with 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a field, a flag, a model name): one line, exit code 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names the source (file or command line) and field."""


class FileFormatError(UserError, ValueError):
    """A file that is missing or not what it should be (not JSON, not UTF-8); names the file and line."""
