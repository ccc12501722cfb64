#!/usr/bin/env bash
# Release wheels that install on older Linux, checked, and the sdist, checked by building it.
#
#   scripts/build_wheels.sh [OUT_DIR]        (default: dist/)
#
# 1. `maturin sdist`, unpacked in a temporary folder;
# 2. from that sdist alone (so the sdist is proven complete), `maturin build --release --zig
#    --compatibility manylinux2014`: zig (the `ziglang` package from PyPI) links against glibc
#    2.17 symbols, so the wheel installs on any x86_64 Linux with glibc >= 2.17 instead of only
#    the build machine's glibc (2.34+). One abi3 wheel serves every supported CPython;
# 3. `auditwheel show` must report the wheel consistent with manylinux_2_17 (no newer symbol,
#    no external library to vendor).
# The sdist and the wheel land in OUT_DIR; the wheel's path is the last line on stdout.
# tests/test_wheel_install.py runs this script, then installs the wheel and uses it.
#
# Needs: maturin, ziglang, auditwheel (all in the `test` extra) and cargo.
# Env: PYTHON (default python3), MANYLINUX (default manylinux2014).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="$(command -v "${PYTHON:-python3}")"
MANYLINUX="${MANYLINUX:-manylinux2014}"
OUT="$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)"
case "$MANYLINUX" in
    manylinux2014) GLIBC_TAG=manylinux_2_17 ;;
    manylinux_2_*) GLIBC_TAG="$MANYLINUX" ;;
    *) echo "MANYLINUX must be manylinux2014 or manylinux_2_NN, not $MANYLINUX" >&2; exit 2 ;;
esac

for tool in maturin ziglang auditwheel; do
    if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$tool') is None)"; then
        echo "error: $tool is not installed: pip install -e '.[test]' (or pip install $tool)" >&2
        exit 2
    fi
done

# the maturin command of this Python's environment (a venv's bin/ may lack it: use PATH's)
if [ -x "$(dirname "$PYTHON")/maturin" ]; then MATURIN=("$(dirname "$PYTHON")/maturin");
elif command -v maturin >/dev/null; then MATURIN=(maturin); else MATURIN=("$PYTHON" -m maturin); fi

# zig from this Python's ziglang package, whichever Python maturin itself runs on
export CARGO_ZIGBUILD_PYTHON_PATH="$PYTHON"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== sdist" >&2
"${MATURIN[@]}" sdist --out "$work" >&2
sdist=$(ls "$work"/leanclip-*.tar.gz)
tar -xzf "$sdist" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'leanclip-*')

echo "== release wheel from the sdist alone ($MANYLINUX, zig linker) -> $OUT" >&2
# built from the unpacked sdist, so a file missing from the sdist fails here; cargo's cache of
# compiled dependencies is this checkout's target/
(cd "$src" && CARGO_TARGET_DIR="$ROOT/target" "${MATURIN[@]}" build --release --zig --interpreter "$PYTHON" \
    --compatibility "$MANYLINUX" --out "$work/wheels" --quiet >&2)
built=$(ls "$work"/wheels/leanclip-*"${GLIBC_TAG}"*.whl 2>/dev/null | head -n1)
if [ -z "$built" ]; then
    echo "error: maturin wrote no ${GLIBC_TAG} wheel" >&2
    exit 1
fi

echo "== auditwheel show $(basename "$built")" >&2
report=$("$PYTHON" -m auditwheel show "$built" 2>&1)
echo "$report" >&2
# auditwheel wraps its lines: compare with the whitespace collapsed
if ! tr -s ' \n' '  ' <<<"$report" | grep -q "consistent with the following platform tag: \"${GLIBC_TAG}_x86_64\""; then
    echo "error: auditwheel does not find $(basename "$built") consistent with ${GLIBC_TAG}" >&2
    exit 1
fi

cp "$sdist" "$built" "$OUT/"
wheel="$OUT/$(basename "$built")"
echo "ok: $(basename "$sdist") builds $(basename "$wheel")" >&2
echo "$wheel"
