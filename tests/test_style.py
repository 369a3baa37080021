"""The code's shape, checked by the tools every Python engineer knows (configured in pyproject.toml).

- ``lint-imports``: imports point one way down the data walk, no circle (imports inside functions
  count), the product never imports ``pipeline.tools``, ``models`` never imports ``pipeline``;
- ``ruff check`` and ``ruff format --check``: one style.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["lint-imports", "--no-cache"], ["ruff", "check", "."], ["ruff", "format", "--check", "."]],
    ids=["lint-imports", "ruff-check", "ruff-format"],
)
def test_tool_passes(command):
    tool = BIN / command[0]
    assert tool.exists(), f"{tool} is missing: install the test extra (pip install -e '.[test]')"
    result = subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_part_file_names_are_spelled_in_one_module():
    """The atlas layout (part files, markers, neighbour files) is spelled by pipeline/atlas/layout.py alone."""
    spelled = ["predict_part_", "_embs.npz", "_cells.parquet", ".done.json", "units.parquet", "dataset_{"]
    found = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        text = path.read_text()
        for needle in spelled:
            if needle in text:
                found.setdefault(needle, set()).add(path.relative_to(ROOT).as_posix())
    assert found and all(files == {"pipeline/atlas/layout.py"} for files in found.values()), found
