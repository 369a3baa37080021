"""slurm/gpu_check.sh and slurm/gpu_wheels.sh, checked without a GPU (their syntax and shellcheck: test_slurm): the
wheels the check carries cover what the project needs at run time, its tests exist, and without a GPU it stops
at once with one line and exit code 2. (The whole check, run as a CPU dry run, is in the README's Performance
section: GPU_CHECK_ALLOW_CPU=1.)"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "slurm" / "gpu_check.sh"
WHEELS = ROOT / "slurm" / "gpu_wheels.sh"
WHEEL_LIST = ROOT / "slurm" / "gpu_wheels.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def script_names(variable: str) -> set[str]:
    """The package names of ``VARIABLE="a b c"`` in gpu_check.sh."""
    (value,) = re.findall(rf'^{variable}="([^"]*)"$', CHECK.read_text(), flags=re.M)
    return {canonicalize_name(n) for n in value.split()}


def pinned() -> dict[str, str]:
    """name -> version of every wheel slurm/gpu_wheels.sh downloads."""
    pins = {}
    for line in WHEEL_LIST.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert canonicalize_name(name) not in pins, f"{name} twice: two versions stop the whole install"
            pins[canonicalize_name(name)] = version
    return pins


def needs(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def requires(name: str) -> list[Requirement]:
    """What an installed distribution needs at run time (no extras), as this Python evaluates the markers."""
    return [r for r in map(Requirement, importlib.metadata.requires(name) or []) if needs(r)]


def test_the_wheels_cover_every_runtime_dependency_the_machine_lacks():
    """Each of pyproject's dependencies is on the GPU machine, or carried in a version its range takes, or one
    that the predict path never imports; so are the build requirement (the editable install) and pytest."""
    device, skipped, pins = script_names("DEVICE_HAS"), script_names("NOT_ON_PREDICT_PATH"), pinned()
    project = [Requirement(s) for s in PYPROJECT["project"]["dependencies"]]
    build = [Requirement(s) for s in PYPROJECT["build-system"]["requires"]]
    tests = [r for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"]["test"]) if r.name == "pytest"]
    assert {canonicalize_name(r.name) for r in project} >= device | skipped, "a name in gpu_check.sh is no dependency"
    for requirement in [*project, *build, *tests]:
        name = canonicalize_name(requirement.name)
        if name in device or name in skipped:
            continue
        assert name in pins, f"{requirement} is neither on the GPU machine nor in {WHEEL_LIST.name}"
        assert requirement.specifier.contains(pins[name]), f"{WHEEL_LIST.name} has {name}=={pins[name]}: {requirement}"


def test_what_the_carried_wheels_need_is_carried_too_or_comes_with_the_machines_packages():
    """The closure, read from the metadata of the same versions installed here: a wheel's own needs are carried
    in a version they take, or come with a package the machine holds (packaging, PyYAML, python-dateutil...)."""
    pins = pinned()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    same = {n for n, v in pins.items() if installed.get(n) == v}  # others: their metadata is not here
    if not {"hydra-core", "omegaconf", "anndata", "zarr", "numcodecs"} <= same:
        pytest.skip(f"this environment holds other versions than {WHEEL_LIST.name}")
    with_machine, todo = set(), list(script_names("DEVICE_HAS"))
    while todo:  # what the machine's packages bring along
        name = todo.pop()
        if name not in with_machine and name in installed:
            with_machine.add(name)
            todo += [canonicalize_name(r.name) for r in requires(name)]
    for name in sorted(same):
        for requirement in requires(name):
            dep = canonicalize_name(requirement.name)
            if dep in pins:
                assert requirement.specifier.contains(pins[dep], prereleases=True), (name, str(requirement))
            else:
                assert dep in with_machine, f"{name} {pins[name]} needs {requirement}: carry it in {WHEEL_LIST.name}"


def test_what_is_not_carried_is_never_imported_by_the_product():
    modules = {"scanpy": "scanpy", "tables": "tables", "hydra-submitit-launcher": "hydra_plugins"}
    skipped = script_names("NOT_ON_PREDICT_PATH")
    assert skipped <= set(modules), "name the module of each package left out"
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("models/**/*.py"), *ROOT.glob("configs/**/*.py")]:
        text = path.read_text()
        for name in skipped:
            pattern = rf"^\s*(import|from)\s+{modules[name]}\b"
            assert not re.search(pattern, text, flags=re.M), f"{path} imports {modules[name]}, which the check lacks"


def test_the_checks_tests_exist():
    (block,) = re.findall(r"^TESTS=\(\n(.*?)^\)", CHECK.read_text(), flags=re.M | re.S)
    ids = block.split()
    assert len(ids) >= 5
    for node in ids:
        file, name = node.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M), node


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_without_a_gpu_the_check_stops_with_one_line_and_exit_code_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith("gpu_check: no CUDA device: torch ") and "GPU_CHECK_ALLOW_CPU=1" in line
    assert not (tmp_path / "bench.json").exists()
