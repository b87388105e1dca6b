"""libshare in the system log: one identifier, ``libshare`` (``journalctl -t libshare``),
for the hook and the daemon, and priorities that match the message.

The hook sends to the syslog socket ``/dev/log`` (:func:`syslog_handler`); the daemon,
under its systemd unit (``SyslogIdentifier=libshare``), writes to stderr, which systemd
connects to the journal: then each line carries its priority as a ``<N>`` prefix
(:func:`journal_prefix`, systemd's ``SyslogLevelPrefix``), and when stderr is not the
journal (run by hand) the daemon sends to ``/dev/log`` as well. Text is always made
encodable (undecodable bytes of a name become escapes, never a logging traceback) and
one line.

Light on purpose (standard library only): the hook imports it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os

#: the syslog identifier (tag) of everything libshare logs
IDENT = "libshare"
#: the local syslog socket (journald's or a syslog daemon's)
SOCKET = "/dev/log"
#: syslog priority of each logging level (RFC 5424 severities)
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def safe_text(text: str, one_line: bool = True) -> str:
    """Return ``text`` that encodes as UTF-8 (lone surrogates escaped) and, with
    ``one_line``, has its line breaks escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n") if one_line else text


class SafeFormatter(logging.Formatter):
    """A formatter whose text always encodes and, with ``one_line``, has no line
    breaks (:func:`safe_text`)."""

    def __init__(self, fmt: str, one_line: bool = True) -> None:
        super().__init__(fmt)
        self.one_line = one_line

    def format(self, record: logging.LogRecord) -> str:
        return safe_text(super().format(record), self.one_line)


def syslog_handler(level: int = logging.INFO) -> logging.Handler | None:
    """Return a handler sending to SOCKET as IDENT (``libshare[PID]: message``, facility
    user, the record's priority) at ``level`` and above, or None when there is no
    syslog socket."""
    if not os.path.exists(SOCKET):
        return None
    try:
        handler = logging.handlers.SysLogHandler(address=SOCKET)
    except OSError:
        return None
    handler.setFormatter(SafeFormatter(f"{IDENT}[%(process)d]: %(message)s"))
    handler.setLevel(level)
    return handler


def stderr_is_journal(fd: int = 2) -> bool:
    """Return True when ``fd`` is the journal stream systemd gave this service (its
    device and inode are ``$JOURNAL_STREAM``)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def journal_prefix(level: int) -> str:
    """Return the ``<N>`` prefix that gives a line written to the journal stream the
    syslog priority of logging ``level``."""
    return f"<{PRIORITY.get(level, 6)}>"
