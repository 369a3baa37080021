"""Optional dependencies (``pip install -e '.[extra]'``), imported with an error that names the extra to install."""

from __future__ import annotations

import importlib


def import_extra(module: str, extra: str, needed_for: str):
    """Import ``module``, or raise a one-line ModuleNotFoundError naming the extra that installs it.

    Parameters
    ----------
    module : str
        The module, e.g. ``tiledbsoma``.
    extra : str
        The extra of ``pyproject.toml`` that installs it, e.g. ``soma``.
    needed_for : str
        What needs it, for the message (``scatlas export --to soma``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"{needed_for} needs {module}, which is not installed: pip install -e '.[{extra}]' "
            f"(or pip install 'scprint-atlas[{extra}]')",
            name=module,
        ) from err
