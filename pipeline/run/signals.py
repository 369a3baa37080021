"""Stopping a run cleanly: SIGTERM / SIGUSR1 (SLURM's warning before a time limit) and Ctrl-C.

The run stops at the next batch boundary: the unit in progress is abandoned,
done units stay done, and the same command resumes.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised at a batch boundary after SIGTERM / SIGUSR1: the current unit is abandoned, done units stay done."""


_STOP = {"signal": None}


def _request_stop(signum, frame) -> None:
    if signum == signal.SIGINT and _STOP["signal"] is not None:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    if _STOP["signal"] is None:
        log.warning("received signal %d: stopping at the next batch (done units are kept; run the same "
                    "command again to resume)", signum)  # fmt: skip
    _STOP["signal"] = signum


def install_stop_handlers() -> None:
    """SIGTERM / SIGUSR1 (SLURM's warning before a time limit or pre-emption) and Ctrl-C ask the run to stop.

    The run stops at the next batch boundary: the current unit is abandoned,
    done units stay done. Installed before Lightning's own handlers, so
    Lightning keeps ours and does not save a training checkpoint on SIGUSR1.
    """
    _STOP["signal"] = None
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, _request_stop)


def stop_requested() -> int | None:
    """The signal that asked the run to stop, or None."""
    return _STOP["signal"]
