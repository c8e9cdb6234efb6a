"""Log setup: one JSON event per line for the journal, a readable console on a TTY.

Under systemd (`JOURNAL_STREAM` names our stdout) each line gets a `<N>` syslog priority prefix so
`journalctl -u hpodlb -p warning` works; on a terminal, colour unless `NO_COLOR` is set
(no-color.org). The libraries (APScheduler, boto3, botocore, urllib3, paramiko...) log through the
stdlib and are routed through the same renderer at warning and above: their info lines are their
own bookkeeping (APScheduler's two per interval would be 5,760 lines a day at the default).
`-v` turns on hpodlb's debug events and the libraries' info lines, never their debug output:
botocore's holds the signed request (the session token, the access key id), paramiko's the SSH
session. Nothing here may ever log key material or credentials: callers pass fingerprints, never
key bytes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` is the journal socket systemd handed us (JOURNAL_STREAM=dev:inode)."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    try:
        dev, inode = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


def _journal_prefix(_: Any, method: str, event: str | bytes) -> str:
    text = event.decode() if isinstance(event, bytes) else event
    return f"<{_PRIORITY.get(method, 6)}>{text}"


def colour_wanted() -> bool:
    """False when `NO_COLOR` is set to anything but the empty string (no-color.org), on a
    terminal too: an admin who set it may be reading through a screen reader or a pager."""
    return not os.environ.get("NO_COLOR", "")


def setup_logging(
    *, verbose: bool = False, stream: TextIO | None = None, journal: bool | None = None
) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    out = stream or sys.stdout
    handler: logging.Handler = (
        _CurrentStderrHandler() if stream is sys.stderr else logging.StreamHandler(out)
    )
    if journal is None:
        journal = stream_is_journal(out)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    renderer: Any
    final: list[Any]
    if out.isatty() and not journal:
        renderer = structlog.dev.ConsoleRenderer(colors=colour_wanted())
        final = [renderer]
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        final = [structlog.processors.format_exc_info, renderer]
        if journal:
            final.append(_journal_prefix)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler.setFormatter(formatter)
    handler.addFilter(_AsDebug(shown=verbose))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The root's level is every library's (none of them sets its own): never debug.
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("hpodlb").setLevel(logging.DEBUG if verbose else logging.INFO)

    structlog.configure(
        # Dropped before any processor runs when the level is off: a pass makes a debug call per
        # probe, and timestamping each one for nothing costs more than the call.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


class _AsDebug(logging.Filter):
    """paramiko reports one refused connection as a score of error lines (a traceback split up);
    hpodlb already logs one event per node failure with its step, so paramiko's lines are debug
    chatter: shown only with -v, and then at debug level."""

    def __init__(self, *, shown: bool) -> None:
        super().__init__()
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "paramiko" and not record.name.startswith("paramiko."):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.shown


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (pytest's capture swaps it per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


def get_logger(name: str = "hpodlb") -> Any:
    return structlog.get_logger(name)
