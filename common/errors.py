"""The one family of user-facing errors.

Every error a user can fix (a missing file, a bad flag value, a malformed dataset, a checkpoint that does not fit)
derives from :class:`SegCLIPError`; the scripts turn it into one line on stderr and exit code 2. Anything else is a
bug and keeps its traceback.
"""
import re


class SegCLIPError(Exception):
    """Base of every error whose message tells the user what is wrong and how to fix it."""


class UsageError(SegCLIPError, ValueError):
    """A flag, a flag value, a settings file or an input path given on the command line is wrong."""


class MissingFileError(SegCLIPError, FileNotFoundError):
    """A file the user named (or that a cache should hold) does not exist; the message says where it was looked for."""


# Advice that a library prints for its own users but that must never reach ours (it turns a safety check off).
_UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False", "weights_only` to `False")


def brief(e: BaseException, limit: int = 200) -> str:
    """``'TypeName: message'`` of an exception from a library, short enough to quote inside one of our messages.

    Whole sentences only: as many as fit in ``limit`` characters, and always the first even when it is longer, so
    a message is never cut mid-sentence. Sentences advising to turn off ``weights_only`` are left out. An empty
    message gives the type name alone."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    sentences = [s for s in re.split(r"(?<=[.;!?])\s+", text) if s and not any(a in s for a in _UNSAFE_ADVICE)]
    kept, size = [], 0
    for s in sentences:
        if kept and size + 1 + len(s) > limit:
            break
        kept.append(s)
        size += len(s) + 1
    name = type(e).__name__
    return f"{name}: {' '.join(kept)}" if kept else name
