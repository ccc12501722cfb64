#!/usr/bin/env bash
# leanclip's first command: install what the demo needs, then index real sample photos and
# answer a few text queries and one image query. Offline apart from the package registry.
#   usage: scripts/demo.sh [extra `leanclip demo` options, e.g. --dir /tmp/photos]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import leanclip._engine, skimage, sklearn, matplotlib, leanclip.starter" 2>/dev/null; then
    echo "installing leanclip with the demo extra (builds the Rust engine; needs cargo) ..." >&2
    "$PYTHON" -m pip install -e '.[demo]'
fi
exec "$PYTHON" -m leanclip.cli demo "$@"
