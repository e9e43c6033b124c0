"""The one family of user-facing errors.

Every error a user can fix (a missing file, a bad flag value, a malformed dataset, a checkpoint that does not fit)
derives from :class:`SegCLIPError`; the scripts turn it into one line on stderr and exit code 2. Anything else is a
bug and keeps its traceback.
"""


class SegCLIPError(Exception):
    """Base of every error whose message tells the user what is wrong and how to fix it."""


class UsageError(SegCLIPError, ValueError):
    """A flag, a flag value, a settings file or an input path given on the command line is wrong."""


class MissingFileError(SegCLIPError, FileNotFoundError):
    """A file the user named (or that a cache should hold) does not exist; the message says where it was looked for."""
