"""Exception types shared by every part of libshare and the exit codes they map to.

A ``LibshareError`` carries a one-line reason for the user; the command line prints it
on stderr and exits 1. ``UsageError`` exits 2, like argparse's own usage errors.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class LibshareError(Exception):
    """A refused or failed operation; ``str(err)`` is the one-line reason shown to users."""

    exit_code = EXIT_FAILED


class UsageError(LibshareError):
    """The command line was wrong (bad option value, missing argument)."""

    exit_code = EXIT_USAGE


class RefusedError(LibshareError):
    """The operation is not safe or not possible for this input; nothing was changed."""
