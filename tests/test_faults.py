"""Faults around a run, on the shipped data: a damaged part, an input rewritten in place, a full disk, an out_dir
that is a file, two runs into one out_dir."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import SPLEEN, predict_args, run

from pipeline.atlas import load_state, read_part, validate
from pipeline.atlas.layout import lock_path
from pipeline.io.files import hold_lock


def error_lines(stderr):
    """The lines of ``stderr`` the command wrote itself (not Lightning's warnings or progress)."""
    return [line for line in stderr.splitlines() if line.startswith("scatlas")]


def test_a_damaged_part_is_embedded_again_and_never_breaks_the_summary(tmp_path):
    out = tmp_path / "atlas"
    args = predict_args(out, [SPLEEN])  # the demo model: its summary adds the held-out accuracy
    assert run(args).returncode == 0
    state = load_state(out)
    first, second = (state.done[p] for p in sorted(state.done)[1:3])
    original = read_part(out, first)["embs"]
    rotten = out / f"{first['stem']}_embs.npz"  # bit rot: 64 bytes overwritten, same size
    data = bytearray(rotten.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    rotten.write_bytes(bytes(data))
    short = out / f"{second['stem']}_top3.npz"  # a bad copy: the file is cut short
    short.write_bytes(short.read_bytes()[:100])

    again = run(args)  # the summary reads no part: the same command completes, and redoes the short part
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr and "held-out cells" in again.stdout
    assert f"part {second['part']} is damaged ({short.name} has 100 bytes" in again.stdout
    assert validate(out) == [f"part {first['part']}: files changed since written (checksum mismatch): "
                             f"['{rotten.name}']"]  # fmt: skip

    check = run([sys.executable, "-m", "pipeline", "validate", str(out)])
    assert check.returncode == 1 and rotten.name in check.stdout
    repair = next(line for line in check.stdout.splitlines() if line.startswith("repair: "))
    assert (
        repair.startswith(f"repair: scatlas validate {out} --repair && scatlas predict ") and f"out_dir={out}" in repair
    )
    fixed = run([sys.executable, "-m", "pipeline", "validate", str(out), "--repair"])
    assert f"1 damaged parts ({first['part']}) are pending again" in fixed.stdout
    assert run(args).returncode == 0
    assert validate(out) == []
    np.testing.assert_allclose(read_part(out, load_state(out).done[first["part"]])["embs"], original, atol=1e-5)


def test_an_input_rewritten_in_place_is_refused_until_embedded_again(tmp_path):
    path = tmp_path / "in.h5ad"
    adata = anndata.read_h5ad(SPLEEN)
    adata.X = adata.X.astype(np.float32)
    adata.write_h5ad(path)
    out = tmp_path / "atlas"
    args = predict_args(out, [path], ["data.cells_per_unit=1000", "model.checkpoint=null"])
    assert run(args).returncode == 0
    before = {p: r["files"] for p, r in load_state(out).done.items()}

    later = time.time() + 60  # only the modification time changes: the counts' fingerprint is the same
    os.utime(path, (later, later))
    touched = run(args)
    assert touched.returncode == 0 and "is complete, nothing to do" in touched.stdout

    size = path.stat().st_size
    adata.X = adata.X * 2  # a re-export with every count doubled: same cells, genes and size
    adata.write_h5ad(path)
    assert path.stat().st_size == size
    refused = run(args)
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        f"scatlas predict: error: {path}: changed since {out} embedded it (its counts differ); embed the changed "
        "datasets again with data.reembed_changed=true, or use a new out_dir"
    ]
    assert "cells to embed" not in refused.stdout  # refused before any work
    assert {p: r["files"] for p, r in load_state(out).done.items()} == before

    again = run([*args, "data.reembed_changed=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert validate(out) == []
    cells = pd.concat(read_part(out, r)["cells"] for r in load_state(out).done.values())
    assert len(cells) == adata.n_obs  # 340 cells, once each
    counts = np.asarray(adata.X.sum(1)).ravel()
    np.testing.assert_allclose(np.sort(cells.n_counts.to_numpy()), np.sort(counts[counts > 0]))  # doubled counts


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 200 KiB tmpfs (the whole atlas of the spleen dataset takes about 260 KiB); resized by the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}; "
                    "test_resume.py's file size limit (EFBIG) checks the same handler")  # fmt: skip
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_ends_with_one_line_and_the_same_command_then_completes(small_filesystem):
    out = small_filesystem / "atlas"
    args = predict_args(out, [SPLEEN], ["model.checkpoint=null"])
    full = run(args)
    assert full.returncode == 4, full.stderr[-3000:]
    (line,) = error_lines(full.stderr)
    assert line.startswith(f"scatlas predict: error: {out}/") and "no space left on device" in line
    assert line.endswith("free space and re-run the same command; nothing done so far is lost")
    assert "Traceback" not in full.stderr + full.stdout and "HYDRA_FULL_ERROR" not in full.stderr
    (log,) = (out / "logs").glob("*/*.log")
    assert "Traceback" in log.read_text() and "No space left on device" in log.read_text()
    n_done = len(load_state(out).done)
    assert n_done < 4  # the disk filled during the run
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_filesystem)], check=True)  # space freed
    assert run(args).returncode == 0
    assert validate(out) == []
    state = load_state(out)
    n_cells = sum(r["n_cells"] + r["n_dropped"] for r in state.done.values())
    assert len(state.done) == 4 and n_cells == 340


def test_an_out_dir_that_is_a_file_is_one_line_before_anything_is_created(tmp_path):
    out = tmp_path / "atlas"
    out.write_text("not a directory")
    proc = run(predict_args(out, [SPLEEN]))
    assert proc.returncode == 4
    assert error_lines(proc.stderr) == [f"scatlas predict: error: {out}: not a directory (Not a directory): out_dir "
                                        "must name a directory (or a path to create): remove the file or use another "
                                        "out_dir"]  # fmt: skip
    assert "Traceback" not in proc.stderr and sorted(tmp_path.iterdir()) == [out]


def test_a_second_run_into_a_held_out_dir_refuses_at_once_and_the_first_completes(tmp_path):
    out = tmp_path / "atlas"
    args = predict_args(out, [SPLEEN], ["model.checkpoint=null"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (lock_path(out).exists() and f"pid {first.pid} " in lock_path(out).read_text()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # it holds out_dir for as long as the second run needs to try
    try:
        second = run(args)
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, stderr = first.wait(timeout=300), *first.communicate()
    assert (code, second.returncode) == (0, 5), (stderr[-2000:], second.stderr[-2000:])
    (line,) = error_lines(second.stderr)
    assert line.startswith(f"scatlas predict: error: {out} is in use by another run (host ")
    assert f"pid {first.pid} " in line and line.endswith("wait for it to end, or use another out_dir")
    assert validate(out) == []
    (entry,) = load_state(out).description["runs"]
    assert len(entry["attempts"]) == 1 and "finished" in entry["attempts"][0]  # the second run wrote nothing
    assert lock_path(out).read_text().startswith("host ")  # released, never removed: the next run takes it


def try_lock(path) -> subprocess.CompletedProcess:
    """Take the lock of ``path`` from a new process, as a second run would."""
    code = f"from pipeline.io.files import hold_lock\nwith hold_lock({str(path)!r}, 'the atlas'): print('taken')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_worker_forked_by_the_run_does_not_hold_its_out_dir(tmp_path):
    path = lock_path(tmp_path / "atlas")
    fork = multiprocessing.get_context("fork")
    release = fork.Event()
    with hold_lock(path, "the atlas"):
        worker = fork.Process(target=release.wait, args=(120,))  # a DataLoader or planning worker
        worker.start()
        held = try_lock(path)
    try:
        assert held.returncode != 0 and f"pid {os.getpid()} " in held.stderr  # held by this process
        # the run ended (killed, say) and its worker lives on for a moment: the next run takes out_dir
        assert worker.is_alive() and try_lock(path).stdout == "taken\n"
    finally:
        release.set()
        worker.join(timeout=60)
