"""Measuring a process as a user runs it: a call in a fresh Python process, and resident memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path


def in_fresh_process(call: str) -> dict:
    """Evaluate ``call``, an expression giving a dict (``bench`` and ``Path`` are imported), in a new Python process.

    Like a user's own run, it starts with none of this process's memory,
    threads or allocator state. The dict comes back with the process's peak
    resident memory added (``peak_rss_mib``).
    """
    code = (
        "import json, warnings; warnings.simplefilter('ignore'); from pathlib import Path; "
        f"from pipeline.tools import bench, process; r = {call}; r['peak_rss_mib'] = process.peak_rss_mib(); print(json.dumps(r))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{call} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    On Linux this is ``VmHWM``: ``ru_maxrss`` of a process started from a large
    one begins at its parent's size (the forked copy counts until ``exec``).
    """
    peak = status_mib("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def current_rss_mib() -> float:
    """This process's resident memory now in MiB (``VmRSS``); NaN where ``/proc`` is absent."""
    rss = status_mib("VmRSS")
    return float("nan") if rss is None else rss


def status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB, or None without ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
