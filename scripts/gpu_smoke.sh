#!/usr/bin/env bash
# GPU smoke run of the training code (issue 17): a few hundred steps of stage 1 and stage 2 on
# generated data at full model size (random-init ViT-B/32 teacher, ViT-S/16 and ViT-S/32
# students, S6/S4 text; nothing is downloaded), bf16 autocast, DDP over every GPU. Prints
# images/s per stage, peak GPU memory and the projected wall time of each Table 1/2 row, and
# writes them to $OUT (JSON).
#
#   scripts/gpu_smoke.sh              # all GPUs of this machine, STEPS=300
#   STEPS=100 scripts/gpu_smoke.sh
#   scripts/gpu_smoke.sh --dry-run    # tiny models, 2 CPU processes, 3 steps (what CI checks)
#   PYTHON=.venv/bin/python scripts/gpu_smoke.sh   # another interpreter (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # the interpreter to run (a venv's, say); not a bare `python`
STEPS="${STEPS:-300}"
OUT="${OUT:-gpu_smoke.json}"
WORKDIR="${WORKDIR:-$(mktemp -d -t leanclip_smoke.XXXXXX)}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # random weights only: never reach the hub
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--dry-run" ]]; then
    export OMP_NUM_THREADS=1
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 \
        -m training.step_timing --smoke --dry-run --steps "${STEPS_DRY:-3}" \
        --workdir "$WORKDIR" --json-out "$OUT"
fi
if ! command -v nvidia-smi >/dev/null; then
    echo "gpu_smoke.sh: nvidia-smi not found (no CUDA machine); use --dry-run to check on a CPU" >&2
    exit 2
fi
NGPU="$(nvidia-smi -L | wc -l)"
echo "gpu_smoke.sh: $NGPU GPU(s), $STEPS steps per run, work dir $WORKDIR" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    -m training.step_timing --smoke --steps "$STEPS" --workdir "$WORKDIR" --json-out "$OUT"
