#!/usr/bin/env bash
# Every GPU check of the training-throughput work (issue 7, item 1) in ONE run: about 8 minutes on one
# H100, for a session that has a GPU. From the repository root, through the device tool:
#
#     run(command="bash benchmarks/gpu_suite.sh", timeout_s=600)
#
# What it does, in order (each stage time-boxed, the whole suite within SUITE_BUDGET_S = 480 s):
#   1. environment: GPU, driver, torch / timm / transformers versions;
#   2. ViT-B/16 at 224 px, batch 256, bf16: HF ViTMAEForPreTraining vs ours with every main lever
#      (eager, fused AdamW, torch.compile, CUDA graphs, both);            -> base.json
#   3. ViT-T/4 at 32 px, batch 1024, bf16: the same rows;                    -> tiny.json
#   4. the GPU unit tests (CUDA-graph capture keeps masking random, the optimizer runs, no host syncs);
#   5. extra rows while time is left: compile mode "reduce-overhead", a compiled foreach AdamW inside
#      the CUDA graph, and the HF model compiled (a stronger baseline)      -> extra_tiny.json, extra_base.json
#   6. the merged tables with a MET / NOT MET line per target, printed last -> summary.md
# Everything lands in $OUT (6 files; the device tool brings back at most 8): suite.log holds every
# stage's output. A stage stopped by its time limit keeps the rows it finished (the JSON is rewritten
# after each row). Nothing changes the GPU's settings.
#
# The machine has no network. Its image has torch 2.11 + CUDA 13, timm and transformers (KINDS.md:
# 5.17). If transformers is missing there and wheels were carried in .whl/ (device README, "a Python
# package missing there"), they are installed into /tmp/site; otherwise the HF rows say
# "the Hugging Face baseline needs transformers" and only our rows are measured.
#
# Overrides (for a dry run on a CPU, e.g.):
#   SUITE_BUDGET_S=900 BASE_ARGS="--variant micro_patch4_32 --batch 8 --device cpu" \
#   TINY_ARGS="--variant micro_patch4_32 --batch 16 --device cpu" STEP_ARGS="--steps 2 --warmup 1 --repeats 1" \
#   SKIP_PYTEST=1 SKIP_EXTRA=1 bash benchmarks/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BUDGET=${SUITE_BUDGET_S:-480}
BASE_ARGS=${BASE_ARGS:-"--variant base_patch16_224 --batch 256 --dtype bf16"}
TINY_ARGS=${TINY_ARGS:-"--variant tiny_patch4_32 --batch 1024 --dtype bf16"}
STEP_ARGS=${STEP_ARGS:-"--steps 20 --warmup 5 --repeats 3"}
LOG="$OUT/suite.log"
BENCH="benchmarks/train_throughput.py"
: >"$LOG"
START=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME MAX_SECONDS COMMAND...: run it with a limit of min(MAX_SECONDS, what is left of the budget)
stage() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((left < max ? left : max))
  if ((limit < 30)); then
    say "== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    return
  fi
  say "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  ((rc == 124 || rc == 137)) && say "== $name: STOPPED at its ${limit}s limit (rows finished so far are kept)"
  say "== $name: exit $rc, $((SECONDS - START))s into the suite"
}

# 1. environment ------------------------------------------------------------------------------------
say "== environment ($(date -u '+%Y-%m-%d %H:%M UTC'))"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true; } | tee -a "$LOG"
if ! $PY -c "import transformers" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "transformers missing: installing the carried wheels from .whl/ into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    say "transformers missing and no wheels in .whl/: the HF baseline rows will say so"
  fi
fi
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("timm", "transformers", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "absent")
EOF

# 2-3. the two targets, main levers ----------------------------------------------------------------
# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
stage base 210 $PY $BENCH $BASE_ARGS $STEP_ARGS --sweep main --json "$OUT/base.json"
# shellcheck disable=SC2086
stage tiny 170 $PY $BENCH $TINY_ARGS $STEP_ARGS --sweep main --json "$OUT/tiny.json"

# 4. GPU unit tests ------------------------------------------------------------------------------------
if [[ -z ${SKIP_PYTEST:-} ]]; then
  stage gpu-tests 70 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_bench_train.py
fi

# 5. extra rows (the tiny model first: CUDA graphs matter most for a launch-bound model) ----------------
if [[ -z ${SKIP_EXTRA:-} ]]; then
  # shellcheck disable=SC2086
  stage extra-tiny 100 $PY $BENCH $TINY_ARGS $STEP_ARGS --sweep extra --json "$OUT/extra_tiny.json"
  # shellcheck disable=SC2086
  stage extra-base 150 $PY $BENCH $BASE_ARGS $STEP_ARGS --sweep extra --json "$OUT/extra_base.json"
fi

# 6. the tables, last ----------------------------------------------------------------------------------
say "== summary after $((SECONDS - START))s (full logs: suite.log; rows: *.json)"
reports=()
for f in base extra_base tiny extra_tiny; do [[ -s "$OUT/$f.json" ]] && reports+=("$OUT/$f.json"); done
if ((${#reports[@]})); then
  $PY $BENCH --summarize "${reports[@]}" | tee "$OUT/summary.md"
else
  say "no report was written: see suite.log"
fi
