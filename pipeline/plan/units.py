"""Work units: (dataset, row range) with a global part id.

The units are a pure function of the planned datasets and ``cells_per_unit``,
so every process (any rank, any restart) computes the same ones; a stored plan
keeps its part ids when inputs are appended. Resuming is "plan again, skip
what is done".
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.plan.datasets import DatasetPlan


@dataclass(frozen=True)
class Unit:
    """A block of rows of one dataset, written as one part."""

    part: int
    dataset: int
    start: int
    stop: int

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


def make_units(datasets: list[DatasetPlan], cells_per_unit: int, stored: list[Unit] = ()) -> list[Unit]:
    """Cut every plannable dataset into row ranges of at most ``cells_per_unit`` cells.

    Units already in ``stored`` (an earlier attempt's plan) keep their part ids;
    datasets that had none (new inputs, or ones that failed to open before) get
    new ids after the largest stored one. So part ids never change on resume.
    """
    by_dataset: dict[int, list[Unit]] = {}
    for unit in stored:
        by_dataset.setdefault(unit.dataset, []).append(unit)
    next_part = max((u.part for u in stored), default=-1) + 1
    units: list[Unit] = []
    for ds in datasets:
        if ds.status == "failed":
            continue
        if ds.dataset in by_dataset:
            kept = sorted(by_dataset[ds.dataset], key=lambda u: u.start)
            if kept[-1].stop != ds.n_cells:
                raise ValueError(
                    f"{ds.path}: now has {ds.n_cells} cells, but this atlas planned {kept[-1].stop}; "
                    "the file changed since the first attempt: use a new out_dir"
                )
            units += kept
            continue
        for start in range(0, ds.n_cells, cells_per_unit):
            units.append(Unit(next_part, ds.dataset, start, min(start + cells_per_unit, ds.n_cells)))
            next_part += 1
    return units


def assign_units(units: list[Unit], world_size: int) -> list[list[Unit]]:
    """Split the units, in part order, into one contiguous run per rank with about equal numbers of cells.

    A dataset's units are consecutive parts, so a dataset goes to one rank
    (split only where one rank's run ends and the next begins): each rank opens,
    and builds the neighbour graph of, its own datasets only. A unit goes to
    the rank whose share of the cells its middle cell falls in, so ranks differ
    by at most about one unit's cells.
    """
    ranks: list[list[Unit]] = [[] for _ in range(world_size)]
    total = sum(u.n_cells for u in units)
    before = 0
    for unit in sorted(units, key=lambda u: u.part):
        middle = before + unit.n_cells / 2
        ranks[min(int(middle * world_size / max(total, 1)), world_size - 1)].append(unit)
        before += unit.n_cells
    return ranks
