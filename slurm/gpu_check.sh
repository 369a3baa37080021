#!/usr/bin/env bash
# GPU readiness check, for a bare NVIDIA machine with no package registry whose python3 already holds torch
# (a CUDA build), lightning, numpy, scipy, pandas, pyarrow, h5py, rich and scikit-learn. In one go, about
# 8 minutes at most on one H100:
#   1. finds the GPU;
#   2. installs the project and what the machine lacks from a folder of wheels (slurm/gpu_wheels.sh makes it)
#      into a fresh virtual environment that sees the machine's own packages (its torch, its CUDA);
#   3. runs the tests that exercise the predict loop (kill -9 and SIGTERM resumes, signals to the workers, a
#      failing write, a damaged part, a no-op resume) on trainer=gpu (bf16);
#   4. times the forward of small and medium at max_len 3200 in bf16 (cells/s, MFU) and an end-to-end predict
#      with small at max_len 3200 on the shipped 10,000-cell mouse-brain file (scatlas bench);
#   5. prints one table: step, result, figure.
#
#   slurm/gpu_check.sh                    # from the repository root or anywhere; wheels in gpu-wheels/
#   GPU_CHECK_ALLOW_CPU=1 slurm/gpu_check.sh   # no GPU: a dry run of every step at small sizes on the CPU
#
# Exit codes: 0 every step passed; 1 a step failed (its log is under GPU_CHECK_OUT); 2 no CUDA device, no torch
# in the python, or no wheels folder (one line says which).
#
# Settings (environment): GPU_CHECK_PYTHON (python3), GPU_CHECK_WHEELS (gpu-wheels), GPU_CHECK_VENV
# (/tmp/scatlas-gpu-check-venv, made anew), GPU_CHECK_OUT (gpu-check/: logs, bench.json, the table),
# GPU_CHECK_MODELS (small,medium), GPU_CHECK_E2E_MODEL (small), GPU_CHECK_MAX_LEN (3200), GPU_CHECK_SECONDS
# (10 per forward), GPU_CHECK_BATCH (64).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD

# What the GPU machine is assumed to hold, and the runtime dependencies the predict path never imports (they
# are not carried): tests/test_gpu_check.py checks that these and slurm/gpu_wheels.txt cover pyproject.toml.
DEVICE_HAS="torch lightning numpy scipy pandas pyarrow h5py rich scikit-learn"
NOT_ON_PREDICT_PATH="scanpy tables hydra-submitit-launcher"
# the predict-loop tests run on trainer=gpu (SCATLAS_TEST_TRAINER, tests/conftest.py)
TESTS=(
    tests/test_resume.py::test_kill_9_then_resume_loses_and_duplicates_nothing
    tests/test_resume.py::test_sigterm_stops_cleanly_with_requeue_code_and_resumes
    tests/test_resume.py::test_signals_to_every_process_leave_the_workers_alone
    tests/test_resume.py::test_a_failing_write_marks_nothing_done_and_leaves_no_corrupt_file
    tests/test_faults.py::test_a_damaged_part_is_embedded_again_and_never_breaks_the_summary
    tests/test_pipeline.py::test_resume_skips_done_units_and_keeps_part_ids
)

py=${GPU_CHECK_PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-gpu-wheels}
venv=${GPU_CHECK_VENV:-/tmp/scatlas-gpu-check-venv}
out=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$out" && out=$(cd "$out" && pwd)
log=$out/gpu_check.log
: >"$log"
started=$SECONDS
rows=()
failed=0

row() { # step, result, figure: one line now, one row of the final table
    rows+=("$1|$2|$3")
    printf '%s: %s  %s\n' "$1" "$2" "$3" | tee -a "$log"
}

# ---------------------------------------------------------------------------- 1. the device
if ! device=$("$py" -c '
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda|{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"cpu|torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
' 2>>"$log"); then
    echo "gpu_check: $py cannot import torch (see $log)"
    exit 2
fi
kind=${device%%|*}
device=${device#*|}
if [[ "$kind" != cuda && "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
    echo "gpu_check: no CUDA device: $device; GPU_CHECK_ALLOW_CPU=1 runs a CPU dry run at small sizes"
    exit 2
fi
if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "gpu_check: no wheels in $wheels: run slurm/gpu_wheels.sh where pip reaches the registry, carry the folder"
    exit 2
fi
wheels=$(cd "$wheels" && pwd)
if [[ "$kind" == cuda ]]; then
    trainer=gpu precision=(--precision bf16)
    max_len=${GPU_CHECK_MAX_LEN:-3200} seconds=${GPU_CHECK_SECONDS:-10}
    models=${GPU_CHECK_MODELS:-small,medium} e2e_model=${GPU_CHECK_E2E_MODEL:-small}
    row device ok "$device"
else  # the dry run: the same steps, at sizes a CPU does in seconds
    trainer=cpu precision=()
    max_len=${GPU_CHECK_MAX_LEN:-128} seconds=${GPU_CHECK_SECONDS:-2}
    models=${GPU_CHECK_MODELS:-small,medium} e2e_model=${GPU_CHECK_E2E_MODEL:-tiny}
    row device "dry run" "$device: CPU, small sizes (GPU_CHECK_ALLOW_CPU=1)"
fi
batch=${GPU_CHECK_BATCH:-64}

# ---------------------------------------------------------------------------- 2. install from the wheels
# A venv of its own, without pip (a distribution's python may lack ensurepip), that sees the machine's packages
# through a .pth file: --system-site-packages would show the base interpreter's, not those of a python3 that is
# itself a venv. What the venv installs comes first on sys.path; pip itself comes from the machine.
t0=$SECONDS
install() {
    rm -rf "$venv" && "$py" -m venv --without-pip "$venv" || return
    local site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return
    "$py" - "$site/scatlas_device_python.pth" <<'EOF' || return
import site, sys
with open(sys.argv[1], "w") as pth:
    pth.writelines(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages())
EOF
    # the project's runtime and build requirements, by their ranges, less what predict never imports; and pytest
    "$venv/bin/python" - "$out/requirements.txt" "$NOT_ON_PREDICT_PATH" <<'EOF' || return
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
skip = set(sys.argv[2].split())
name = lambda spec: re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()
wanted = [s for s in project["project"]["dependencies"] if name(s) not in skip]
wanted += project["build-system"]["requires"]
wanted += [s for s in project["project"]["optional-dependencies"]["test"] if name(s) == "pytest"]
open(sys.argv[1], "w").write("\n".join(wanted) + "\n")
EOF
    # no registry: only the folder, and no pip configuration of this machine
    local pip=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT
               PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
               "$venv/bin/python" -m pip)
    "${pip[@]}" install --no-index --find-links "$wheels" -r "$out/requirements.txt" || return
    "${pip[@]}" install --no-index --no-deps --no-build-isolation -e "$root" || return
    "$venv/bin/python" -c 'import anndata, hydra, pytest, torch, pipeline.run.predict, pipeline.tools.bench'
    # where each package the machine was to hold came from: the machine, or the wheels (a version it lacked)
    "$venv/bin/python" - "$DEVICE_HAS" <<'EOF'
import importlib.metadata as m, sys
for name in sys.argv[1].split():
    print(f"{name} {m.version(name)} from {m.distribution(name).locate_file('')}")
EOF
}
if install >>"$log" 2>&1; then
    n=$(grep -h '^Successfully installed' "$log" | head -n1 | wc -w)
    row install ok "the project and $((n > 2 ? n - 2 : 0)) packages from $(find "$wheels" -name '*.whl' | wc -l) wheels, $((SECONDS - t0)) s"
else
    row install FAILED "see $log"
    failed=1
fi

# ---------------------------------------------------------------------------- 3. the predict-loop tests
if ((!failed)); then
    t0=$SECONDS
    # the machine's other pytest plugins stay out: only what the suite needs; one process (-o addopts: not
    # pyproject's parallel workers, whose plugin is not carried), the GPU's tests one after another
    SCATLAS_TEST_TRAINER=$trainer PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 270 \
        "$venv/bin/python" -m pytest -q -o addopts=-ra -p no:cacheprovider "${TESTS[@]}" >"$out/pytest.log" 2>&1
    code=$?
    summary=$(grep -E '^=* ?[0-9]+ (passed|failed|error)' "$out/pytest.log" | tail -n1 | tr -d '=' | xargs)
    if ((code == 0)); then
        row "tests, trainer=$trainer" ok "${summary:-?} (${#TESTS[@]} predict-loop tests)"
    else
        ((code == 124)) && summary="timed out after 270 s; $summary"
        row "tests, trainer=$trainer" FAILED "${summary:-exit $code}, see $out/pytest.log"
        failed=1
    fi
fi

# ---------------------------------------------------------------------------- 4. forward and end to end
if [[ -d "$venv" ]] && "$venv/bin/python" -c 'import pipeline.tools.bench' 2>/dev/null; then
    t0=$SECONDS
    rm -rf "$out/bench.json"
    timeout 240 "$venv/bin/python" -m pipeline bench --only forward,end_to_end --model "$e2e_model" \
        --forward-models "$models" --max-len "$max_len" --batch-size "$batch" --seconds "$seconds" \
        "${precision[@]}" --work-dir "$(mktemp -d)" --json "$out/bench.json" >"$out/bench.log" 2>&1
    code=$?
    ((code)) && failed=1
    if [[ -s "$out/bench.json" ]]; then
        while IFS='|' read -r step result figure; do
            row "$step" "$result" "$figure"
        done < <("$venv/bin/python" - "$out/bench.json" "$e2e_model" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["forward"]:
    precision = "fp32" if r["precision"] == "32" else r["precision"]
    print(f"forward {r['model']}, max_len {r['max_len']}, {precision}|ok|{r['cells_per_s']:,.1f} cells/s, "
          f"batch {r['batch_size']}, {r['flop_per_s'] / 1e12:.2f} TFLOP/s, MFU {r['mfu']:.1%} of {r['peak_source']}")
e = report["end_to_end"]
ok = "ok" if e["exit_code"] == 0 else f"FAILED (exit {e['exit_code']})"
print(f"end-to-end predict, {sys.argv[2]}, {e['cells_embedded']:,} cells|{ok}|{e['dataset']}: predict loop "
      f"{e['predict_loop_cells_per_s']:,.0f} cells/s = {e['predict_loop_cells_per_s'] / e['forward_same_batches_cells_per_s']:.0%} "
      f"of the forward alone ({e['forward_same_batches_cells_per_s']:,.0f}); overall {e['overall_cells_per_s']:,.0f} "
      f"cells/s; {e['workers']} workers; peak RSS {e['peak_rss_mib']:,.0f} MiB")
EOF
        )
        grep -q '|FAILED' <<<"${rows[*]}" && failed=1
    else
        why="exit $code"
        ((code == 124)) && why="timed out after 240 s"
        row "forward and end to end" FAILED "scatlas bench: $why, see $out/bench.log"
    fi
else
    row "forward and end to end" skipped "nothing installed"
fi

# ---------------------------------------------------------------------------- 5. the table
total=$((SECONDS - started))
row total "$( ((failed)) && echo FAILED || echo ok)" "$total s (budget 480 s on one H100)"
{
    echo
    printf '%-44s %-8s %s\n' step result figure
    for r in "${rows[@]}"; do
        IFS='|' read -r step result figure <<<"$r"
        printf '%-44s %-8s %s\n' "$step" "$result" "$figure"
    done
} | tee "$out/table.txt" | tee -a "$log"
exit "$failed"
