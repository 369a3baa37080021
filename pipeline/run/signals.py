"""Stopping a run cleanly: SIGTERM / SIGUSR1 (SLURM's warning before a time limit) and Ctrl-C.

The run stops at the next batch boundary: the unit in progress is abandoned,
done units stay done, and the same command resumes.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised at a batch boundary after SIGTERM / SIGUSR1: the current unit is abandoned, done units stay done."""


_STOP = {"signal": None}


def _request_stop(signum, frame) -> None:
    if signum == signal.SIGINT and _STOP["signal"] is not None:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    if _STOP["signal"] is None and signum == signal.SIGINT:  # SIGTERM/SIGUSR1: one line when stopped (run_predict)
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


def slurm_plugins() -> list:
    """Under SLURM, Lightning's auto-requeue is turned off, so a stopped job is requeued by one mechanism only.

    On SIGTERM / SIGUSR1 scatlas stops at the next batch and exits 75, and the
    sbatch script (slurm/) requeues the job; Lightning would otherwise also save
    a checkpoint and run ``scontrol requeue`` itself. Returns the ``plugins`` of
    the Trainer: ``[]`` outside SLURM. Rank 0 says so once in the log.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    # Lightning's own test (SLURMEnvironment.detect) without its warning about srun: a task started by srun
    if "SLURM_NTASKS" not in os.environ or SLURMEnvironment.job_name() in ("bash", "interactive"):
        return []
    if os.environ.get("SLURM_PROCID", "0") == "0":
        log.info("SLURM job %s: on SIGTERM/SIGUSR1 scatlas stops at the next batch and exits 75, and the sbatch "
                 "script requeues the job (Lightning's auto-requeue is off)", os.environ.get("SLURM_JOB_ID", "?"))  # fmt: skip
    return [SLURMEnvironment(auto_requeue=False)]
