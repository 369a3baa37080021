#!/usr/bin/env bash
# Download the wheels that slurm/gpu_check.sh installs on a GPU machine without a package registry:
# the versions listed in slurm/gpu_wheels.txt, for that machine's Python (3.12 unless GPU_WHEELS_PYTHON says
# otherwise) on x86-64 Linux. Run it where pip reaches the registry; carry the folder to the GPU machine.
#
#   slurm/gpu_wheels.sh                          # writes gpu-wheels/ (git-ignored), about 20 MiB
#   GPU_WHEELS_PYTHON=3.11 slurm/gpu_wheels.sh /tmp/wheels311   # wheels for this machine's Python (a dry run)
#
# It fails if the folder grows past 64 MiB (what a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-gpu-wheels}
pyver=${GPU_WHEELS_PYTHON:-3.12}
list=slurm/gpu_wheels.txt
limit_mib=64
mkdir -p "$dir"

binary=()   # name==version of every wheel the registry has
source=()   # those it has only as an sdist (pure Python): built here into a py3-none-any wheel
while read -r line; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    [[ -z "$line" ]] && continue
    if [[ "$line" == antlr4-python3-runtime==* ]]; then
        source+=("$line")
    else
        binary+=("$line")
    fi
done <"$list"

# --no-deps: the list names every package the machine lacks (see the list's header); --only-binary: nothing
# is compiled on the GPU machine. pip matches a manylinux_2_N tag exactly, so each N the wheels use is named.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "${binary[@]}"
if ((${#source[@]})); then
    python3 -m pip wheel --quiet --no-deps -w "$dir" "${source[@]}"
fi

count=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
kib=$(du -sk "$dir" | cut -f1)
echo "gpu_wheels: $count wheels in $dir, $((kib / 1024)) MiB (Python $pyver, x86_64)"
if ((kib > limit_mib * 1024)); then
    echo "gpu_wheels: $dir is over ${limit_mib} MiB: remove what the GPU machine already has" >&2
    exit 1
fi
