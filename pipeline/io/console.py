"""Progress of a pass over many parts, on stderr: a bar on a terminal (or in a notebook), nothing in a log file."""

from __future__ import annotations

from collections.abc import Iterable


def track_on_terminal(items: Iterable, total: int, description: str, enabled: bool = True) -> Iterable:
    """``items``, with a transient progress bar on stderr when it is a terminal or a notebook and ``enabled``.

    A log file (stderr not a terminal) gets nothing: a redrawn bar would be one
    long line per step there.
    """
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    if not enabled or not (console.is_terminal or console.is_jupyter):
        return items
    return track(items, description=description, total=total, transient=True, console=console)
