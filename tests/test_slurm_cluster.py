"""The sbatch scripts under a real SLURM: a single-node cluster on this machine (slurm/local_cluster.sh).

The scripts are submitted unedited, with the CPU commands of the README (its sbatch options and
variable names, our values), ``MODEL=tiny`` and the shipped datasets:

- ``predict.sbatch`` to completion, then ``scatlas validate``;
- ``predict.sbatch`` requeued twice mid-run (``scontrol requeue``): it resumes each time and ends
  complete, every (dataset, row) exactly once, and its log has no traceback;
- ``predict_array.sbatch`` over a three-line catalog: three complete shards;
- two tasks on one node: two ranks.

.ci/run installs slurm-wlm and munge and starts the cluster. Elsewhere the tests start it themselves
when they can (root, the packages installed) and are skipped with the reason when they cannot; with
CI=true they fail instead of being skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata
import pandas as pd
import pytest
from conftest import BMMC, CD4T, HEART, SPLEEN, readme_submissions

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
LOCAL_CLUSTER = SLURM / "local_cluster.sh"
VENV = Path(sys.executable).parent.parent
SCATLAS = VENV / "bin" / "scatlas"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# the README's commands name these; the tests give their own values, and MODEL=tiny
OUR_VALUES = {"INPUT", "CATALOG", "OUT_DIR", "CHECKPOINT", "VENV"}


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI runs the SLURM tests, but {reason}", pytrace=False)
    pytest.skip(reason)


def _base_env() -> dict[str, str]:
    """This environment without the SLURM_* of an enclosing job."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


@pytest.fixture(scope="module")
def cluster():
    """The environment of a client of the running single-node SLURM; started here if need be, and then stopped."""
    missing = [tool for tool in ("sbatch", "scontrol", "slurmd", "slurmctld", "munged") if shutil.which(tool) is None]
    if missing:
        _unavailable(
            f"no SLURM here ({', '.join(missing)} not found): apt-get install -y slurm-wlm munge (.ci/run does)"
        )
    env = _base_env()
    env["SLURM_CONF"] = subprocess.run(
        [str(LOCAL_CLUSTER), "conf"], capture_output=True, text=True, check=True
    ).stdout.strip()
    started = False
    if subprocess.run([str(LOCAL_CLUSTER), "status"], env=env, capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            _unavailable("the local SLURM is not running and starting it needs root: sudo slurm/local_cluster.sh start")
        proc = subprocess.run([str(LOCAL_CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            _unavailable(f"slurm/local_cluster.sh start failed: {proc.stderr.strip().splitlines()[-1:]}")
        started = True
    yield env
    if started:
        subprocess.run([str(LOCAL_CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def _readme_command(script: str, tasks_per_node: str | None = None) -> dict:
    """The README's CPU submission of ``script`` (with ``--ntasks-per-node=<tasks_per_node>`` if given)."""
    found = [c for c in readme_submissions() if c["script"] == script and c["variables"].get("TRAINER") == "cpu"
             and (tasks_per_node is None or f"--ntasks-per-node={tasks_per_node}" in c["options"])]  # fmt: skip
    assert len(found) == 1, f"the README shows no single CPU submission of {script}: {found}"
    return found[0]


def submit(env: dict, cwd: Path, command: dict, values: dict[str, str], args: tuple[str, ...] = ()) -> str:
    """Submit a README command as it is, with our values for its paths; returns the job id."""
    variables = dict(command["variables"])
    assert set(values) - {"MODEL"} <= OUR_VALUES and set(values) & set(variables) == set(values) - {"MODEL"}
    variables.update(values)
    argv = ["sbatch", "--parsable", *command["options"], str(SLURM / command["script"]), *command["args"], *args]
    proc = subprocess.run(argv, cwd=cwd, env={**env, **variables}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def jobs(env: dict, job: str) -> list[dict[str, str]]:
    """``scontrol show job`` of a job (every task of an array), one dict per job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in proc.stdout.splitlines() if line]


def wait(env: dict, job: str, until, timeout: float = 150, log: Path | None = None) -> list[dict[str, str]]:
    """Poll the job until ``until(records)``; a requeued job is let go at once instead of after SLURM's 2-minute hold.

    On timeout the assertion names each record's state, restarts, exit code and reason, and ends with the tail
    of the job's ``log`` when given."""
    deadline = time.time() + timeout
    held_since: dict[tuple[str, str], float] = {}
    while True:
        records = jobs(env, job)
        if until(records):
            return records
        for r in records:
            if r["JobState"] == "PENDING" and r.get("Reason") == "BeginTime":
                # not in the second of the requeue: slurmd refuses a job credential made in the second it revoked
                # the last one ("Job credential revoked"), and the job fails with exit code 1 instead of starting
                since = held_since.setdefault((r["JobId"], r.get("Restarts", "")), time.time())
                if time.time() - since >= 2:
                    subprocess.run(["scontrol", "update", f"JobId={r['JobId']}", "StartTime=now"], env=env,
                                   capture_output=True, timeout=30)  # fmt: skip
        if time.time() > deadline:
            states = [(r["JobState"], r.get("Restarts"), r.get("ExitCode"), r.get("Reason")) for r in records]
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(
                f"job {job} still (state, restarts, exit code, reason) {states} after {timeout} s\n{tail}"
            )
        time.sleep(0.3)


def ended(records) -> bool:
    return all(r["JobState"] in TERMINAL for r in records)


def done_parts(atlas: Path) -> int:
    return len(list((atlas / "manifest" / "run_0").glob("part_*.done.json")))


def assert_complete(atlas: Path, sources: list[Path]) -> None:
    """scatlas validate passes, and the part files hold every (dataset, row) of the sources exactly once."""
    proc = subprocess.run([str(SCATLAS), "validate", str(atlas)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = pd.concat([pd.read_parquet(p) for p in sorted(atlas.glob("step_*_cells.parquet"))], ignore_index=True)
    dropped = pd.concat([pd.read_parquet(p) for p in sorted(atlas.glob("step_*_dropped.parquet"))], ignore_index=True)
    both = pd.concat([cells[["dataset", "row"]], dropped[["dataset", "row"]]], ignore_index=True)
    assert not both.duplicated().any(), both[both.duplicated()].head()
    datasets = pd.read_parquet(atlas / "datasets.parquet")
    assert [Path(p).resolve() for p in datasets.path] == [s.resolve() for s in sources]
    for dataset, source in enumerate(sources):
        n_obs = anndata.read_h5ad(source, backed="r").n_obs
        assert sorted(both.row[both.dataset == dataset]) == list(range(n_obs)), source
    assert len(cells) > 0.9 * len(both)


def read_log(path: Path) -> str:
    text = path.read_text(errors="replace")
    assert "Traceback" not in text and "Error executing job" not in text, text[-4000:]
    assert "SLURM auto-requeueing enabled" not in text  # Lightning's requeue is off: the script's is the only one
    return text


def link(target: Path, path: Path) -> Path:
    """``path`` (created) pointing at the dataset ``target``: a path with the characters we want."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def predict_job(cluster: dict, tmp_path: Path, n_tasks: str, inputs: str, atlas: Path) -> tuple[str, str]:
    """Submit the README's predict.sbatch command with ``n_tasks`` tasks, wait for its end, check that it
    completed; return the job id and its log."""
    job = submit(cluster, tmp_path, _readme_command("predict.sbatch", n_tasks),
                 {"INPUT": inputs, "OUT_DIR": str(atlas), "CHECKPOINT": "", "VENV": str(VENV), "MODEL": "tiny"})  # fmt: skip
    log_path = tmp_path / f"scatlas-predict-{job}.log"
    (record,) = wait(cluster, job, ended, log=log_path)
    log = read_log(log_path)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-4000:]
    return job, log


def test_predict_on_cpu_completes_and_validates(cluster, tmp_path):
    spleen = link(SPLEEN, tmp_path / "data,1" / "spleen.h5ad")  # a comma in a list entry
    sources = [spleen, HEART]
    atlas = tmp_path / "atlas"
    job, log = predict_job(cluster, tmp_path, "1", f"['{spleen}',{HEART}]", atlas)
    assert f"job {job}: atlas complete" in log and "trainer=cpu" in log
    trainer = json.loads((atlas / "atlas.json").read_text())["config"]["trainer"]
    assert (trainer["accelerator"], trainer["precision"]) == ("cpu", "32-true")  # the CPU route runs in fp32
    assert_complete(atlas, sources)


def test_requeued_job_resumes_each_time_and_ends_complete(cluster, tmp_path):
    inputs = tmp_path / "in,put"  # a glob in a folder with a comma
    sources = [link(s, inputs / f"{k}_{s.name}") for k, s in enumerate([SPLEEN, HEART, BMMC, CD4T])]  # 1,760 cells
    atlas = tmp_path / "atlas"
    job = submit(cluster, tmp_path, _readme_command("predict.sbatch", "1"),
                 {"INPUT": f"{inputs}/*.h5ad", "OUT_DIR": str(atlas), "CHECKPOINT": "", "VENV": str(VENV),
                  "MODEL": "tiny"}, args=("data.cells_per_unit=100", "data.batch_size=25"))  # 20 units  # fmt: skip
    log_path = tmp_path / f"scatlas-predict-{job}.log"
    for restart in (1, 2):
        n_done = done_parts(atlas) if atlas.exists() else 0
        wait(
            cluster,
            job,
            lambda r, n_done=n_done: ended(r) or (atlas.exists() and done_parts(atlas) >= n_done + 2),
            timeout=120,
            log=log_path,
        )
        assert jobs(cluster, job)[0]["JobState"] == "RUNNING", "the job ended before it could be requeued"
        subprocess.run(["scontrol", "requeue", job], env=cluster, check=True, capture_output=True, timeout=30)

        def requeued(records, restart=restart):
            if records[0]["JobState"] == "FAILED" and records[0]["Restarts"] == str(restart - 1):
                # on a loaded machine the batch script can end (exit 75) before slurmctld takes the requeue, and
                # the job is recorded as failed: requeue the ended job, as an operator would; the atlas resumes
                subprocess.run(["scontrol", "requeue", job], env=cluster, capture_output=True, timeout=30)
            return records[0]["Restarts"] == str(restart) and records[0]["JobState"] == "RUNNING"

        wait(cluster, job, requeued, log=log_path)
    (record,) = wait(cluster, job, ended, log=log_path)
    log = read_log(log_path)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0" and record["Restarts"] == "2", log[-4000:]
    assert [f"restart {k}," in log for k in (0, 1, 2)] == [True] * 3
    assert log.count("rank 0 stopped by SIGTERM at a batch boundary") == 2, log[-4000:]
    assert log.count("Lightning's auto-requeue is off") == 3  # said once by each attempt
    assert "Received SIGTERM" not in log and "killed by signal" not in log
    attempts = json.loads((atlas / "atlas.json").read_text())["runs"][0]["attempts"]
    assert len(attempts) == 3 and "finished" in attempts[-1]
    assert_complete(atlas, sources)


def test_array_over_a_three_line_catalog(cluster, tmp_path):
    sources = [SPLEEN, HEART, link(BMMC, tmp_path / "a, b" / "bmmc.h5ad")]
    catalog = tmp_path / "catalog.txt"
    catalog.write_text("# three datasets, one per array task\n" + "".join(f"{s}\n" for s in sources))
    out = tmp_path / "atlas"
    job = submit(cluster, tmp_path, _readme_command("predict_array.sbatch"),
                 {"CATALOG": str(catalog), "OUT_DIR": str(out), "CHECKPOINT": "", "VENV": str(VENV), "MODEL": "tiny"})  # fmt: skip
    records = wait(cluster, job, lambda r: len(r) == 3 and ended(r), timeout=180)
    logs = {task: read_log(tmp_path / f"scatlas-array-{job}_{task}.log") for task in range(3)}
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2"]
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in records), logs
    assert (out / "array_tasks.txt").read_text().strip() == "3"
    for task, source in enumerate(sources):
        assert f"shard complete: {out}/shard_{task}" in logs[task]
        assert_complete(out / f"shard_{task}", [source])


def test_two_tasks_per_node_are_two_ranks(cluster, tmp_path):
    sources = [SPLEEN, HEART]
    atlas = tmp_path / "atlas"
    _, log = predict_job(cluster, tmp_path, "2", f"[{SPLEEN},{HEART}]", atlas)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert json.loads((atlas / "atlas.json").read_text())["runs"][0]["attempts"][-1]["world_size"] == 2
    ranks = {json.loads(p.read_text())["rank"] for p in (atlas / "manifest" / "run_0").glob("part_*.done.json")}
    assert ranks == {0, 1}  # each rank embedded its unit
    assert_complete(atlas, sources)
