#!/usr/bin/env bash
# Build monofast's binary wheels: one abi3 wheel per platform (any CPython >= 3.10), tagged
# manylinux2014 (glibc 2.17), so `pip install` needs no Rust toolchain. zig (from PyPI)
# links against glibc 2.17 and cross-links aarch64; auditwheel checks every wheel's tag.
#
#   bash scripts/build_wheels.sh [OUT_DIR]     (default: dist/)
#   MONOFAST_WHEEL_TARGETS="x86_64-unknown-linux-gnu" bash scripts/build_wheels.sh   (one platform)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
targets=(${MONOFAST_WHEEL_TARGETS:-x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu})
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install --quiet "maturin>=1.12.1,<2" ziglang auditwheel
mkdir -p "$out"
for target in "${targets[@]}"; do
    if ! rustup target list --installed 2>/dev/null | grep -qx "$target" && ! rustup target add "$target"; then
        echo "build_wheels: no Rust standard library for $target (rustup target add $target failed): skipped" >&2
        continue
    fi
    python3 -m maturin build --release --strip --target "$target" --compatibility manylinux2014 --zig --out "$out"
done
for wheel in "$out"/monofast-*.whl; do
    python3 -m auditwheel show "$wheel"
done
