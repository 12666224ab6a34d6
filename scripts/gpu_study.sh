#!/usr/bin/env bash
# The study's float16/bfloat16 grid on one CUDA GPU (issue 5, must 10).
#
#   scripts/gpu_study.sh OUTDIR        e.g. scripts/gpu_study.sh docs/results/gpu
#
# Trains in runs/study-gpu (resumable: rerun the script after an interruption) and
# copies the small outputs (report.md, report.html, plots, manifest.json, results.csv)
# to OUTDIR. Budget: about 8 minutes on one GPU; the study is stopped after
# $GPU_STUDY_SECONDS (default 400) and the report then covers what finished.
set -euo pipefail
out="${1:?usage: scripts/gpu_study.sh OUTDIR}"
cd "$(dirname "$0")/.."
run_dir="${GPU_STUDY_RUN_DIR:-runs/study-gpu}"
seconds="${GPU_STUDY_SECONDS:-400}"

python - <<'PY'
import torch
assert torch.cuda.is_available(), "scripts/gpu_study.sh needs a CUDA device"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

# Several worker processes share the GPU: these models are small, so one process
# would leave it idle between kernel launches.
args=(--device cuda --precisions float16,bfloat16 --jobs "${GPU_STUDY_JOBS:-4}" --out "$run_dir")
start=$(date +%s)
status=0
timeout --signal=INT "$seconds" python -m kinkgrad.study "${args[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    echo "study stopped with status $status after $(( $(date +%s) - start )) s;" \
         "writing the report of the configurations that finished" >&2
    python -m kinkgrad.study "${args[@]}" --report-only
fi
echo "study took $(( $(date +%s) - start )) s"

mkdir -p "$out/plots"
cp "$run_dir"/report.md "$run_dir"/report.html "$run_dir"/manifest.json "$run_dir"/results.csv "$out"/
cp "$run_dir"/plots/*.png "$out"/plots/
echo "report: $out/report.md"
