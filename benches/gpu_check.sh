#!/usr/bin/env bash
# Check and time every GPU path of monofast on one CUDA machine, in under 8 minutes.
#
#   bash benches/gpu_check.sh build [DIR]   where Rust and maturin are: build the abi3 wheel
#                                           into DIR (default dist/), nothing else
#   bash benches/gpu_check.sh [DIR [ARGS]]  on the GPU machine: install DIR's wheel into a
#                                           private folder, check, time, print the table
#                                           (ARGS go to gpu_check.py: --small runs the same
#                                           code at toy sizes on a CPU)
#
# The GPU machine needs torch and Triton (>= 3.6) but no package index and no Rust: the
# wheel built elsewhere travels with the checkout. If DIR/cache exists it becomes
# MONOFAST_CACHE, so the laptop run's corpus (tinyshakespeare.txt) can travel too on a
# machine without the internet. Results: $OUT (default gpu_check_out/), gpu_check.json and
# the logs; the last thing printed is the table.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "build" ]]; then
    dir="${2:-dist}"
    mkdir -p "$dir"
    rm -f "$dir"/monofast-*.whl
    maturin build --release --quiet --out "$dir"
    ls -l "$dir"/monofast-*.whl
    exit 0
fi

dir="${1:-dist}"
shift || true
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
wheels=("$dir"/monofast-*.whl)
if [[ ! -f "${wheels[0]}" ]]; then
    echo "no monofast wheel in $dir: build one with 'bash benches/gpu_check.sh build $dir'" >&2
    exit 2
fi
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${wheels[0]}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d "$dir/cache" ]]; then
    export MONOFAST_CACHE="$(cd "$dir/cache" && pwd)"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 | tee "$out/nvidia-smi.txt" || true
python3 -c "import monofast, monofast._native; print('monofast from', monofast.__file__)"
python3 benches/gpu_check.py --out "$out" --budget "${BUDGET:-400}" "$@" 2>&1 | tee "$out/gpu_check.log"
