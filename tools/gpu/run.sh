#!/usr/bin/env bash
# Every GPU check of the dictionary engine in one device call, each stage under its share of one time budget:
#   tests     tests/test_gpu.py (extraction on CUDA equals the CPU's; training on CUDA; the weights reload on a CPU)
#   headline  tools/gpu/headline.py: GPT-2 small's shapes, 12 TopK SAEs of 24,576 latents fed by one forward, 10M tokens
#             (a 1M-token probe first: the full run only if it fits what is left), extraction vs the bare forward, MFU
#   bench     `ghosttrack bench --gpu` against SAELens and sparsify (sparsify's own Triton decoder on CUDA); bench.json
#             is written after each section, so a bench cut off by its share still returns what it measured
#   tsp       the tsp20-pomo policy trained for what is left (resumed epochs), then its greedy gap on TSP-20; not in the
#             default stages: one call has no room left for it, so it is a second call, `STAGES=tsp BUDGET=200`
#
# Here, once (the packages the GPU machine's image lacks, as Python 3.12 wheels, into .whl/, which git ignores):
#     python tools/gpu/wheels.py
# Then, with the device tool:  run(command="bash tools/gpu/run.sh", carry=[".whl"], timeout_s=600)
# and give_back afterwards. What comes back in $OUT: summary.txt (environment, each stage's exit status and seconds),
# log.txt (everything printed), headline.json, bench.json, bench.png, tsp_eval.csv.
# STAGES="headline bench" picks stages; BUDGET (seconds, default 560) is the whole run's; WHEELS (default .whl) the
# folder of wheels to install first.
# On a machine without a GPU, `GPU_REHEARSAL=1 bash tools/gpu/run.sh` runs the same stages at toy sizes on the CPU.
set -u
cd "$(dirname "$0")/../.."
start=$(date +%s)
BUDGET=${BUDGET:-560}
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
summary=$OUT/summary.txt; log=$OUT/log.txt
: > "$summary"; : > "$log"
# the carried packages are installed without byte-compiling (plotly and wandb alone are thousands of files); the first
# import writes the caches that the bench's many interpreters then reuse
unset PYTHONDONTWRITEBYTECODE
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GHOSTTRACK_CACHE=${GHOSTTRACK_CACHE:-/tmp/ghosttrack-cache}
PY=${PYTHON:-python3}

WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # the image's own packages stay first; the carried ones only add what it lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ghosttrack-site "$WHEELS"/*.whl \
    >> "$log" 2>&1 || echo "installing the carried wheels failed (log.txt)" >> "$summary"
  export PYTHONPATH=$PWD:/tmp/ghosttrack-site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# the peers run in this same interpreter, which has them from the carried wheels
export GHOSTTRACK_SAELENS_PYTHON=${GHOSTTRACK_SAELENS_PYTHON:-$(command -v "$PY")}
export GHOSTTRACK_SPARSIFY_PYTHON=${GHOSTTRACK_SPARSIFY_PYTHON:-$(command -v "$PY")}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu: none (nvidia-smi absent)"
  "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| transformers', transformers.__version__)"
  "$PY" -c "import importlib.metadata as m
for d in ('sae-lens', 'eai-sparsify', 'schedulefree', 'datasets'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'MISSING')" | paste -sd' '
} >> "$summary" 2>&1

if [ "${GPU_REHEARSAL:-0}" = 1 ]; then   # toy sizes on the CPU: every stage's code path, in seconds
  HEADLINE_ARGS="--device cpu --n-layer 2 --d-model 32 --tokens 30000 --probe-tokens 10000 --extract-tokens 4000 --expansion 4 --k 4 --batch-size 256"
  BENCH_ARGS="--smoke"; TSP_ARGS="--preset tiny --device cpu --epoch-size 128 --val-size 16 --baseline-eval-size 32"
  TSP_STEP=1; TSP_MAX_EPOCHS=2; TSP_EVAL_ARGS="--num-instances 16 --device cpu"
else
  HEADLINE_ARGS="--device cuda"; BENCH_ARGS="--gpu"
  TSP_ARGS="--preset tsp20-pomo --device cuda --epoch-size 102400 --batch-size 256 --eval-batch-size 4096"; TSP_STEP=4; TSP_MAX_EPOCHS=400
  TSP_EVAL_ARGS="--num-instances 256 --device cuda --multistart"
fi

TSP_RUN=${TSP_RUN:-/tmp/ghosttrack-tsp20-pomo}   # a fresh machine has none; a rerun on a warm one continues it
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# stage NAME SHARE CMD...: runs CMD under min(SHARE, what is left) seconds, its output into log.txt
stage() {
  local name=$1 share=$2; shift 2
  local t=$(left); [ "$share" -lt "$t" ] && t=$share
  if [ "$t" -lt 20 ]; then echo "$name: skipped, $(left) s of the budget left" >> "$summary"; return; fi
  echo "=== $name (up to ${t}s) ===" >> "$log"
  local s0=$(date +%s) rc
  if [ "$(type -t "$1")" = function ]; then STAGE_SECONDS=$t "$@" >> "$log" 2>&1; rc=$?   # it keeps to its share itself
  else timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1; rc=$?; fi
  echo "$name: rc $rc$([ $rc = 124 ] && echo ' (its time share ran out)') in $(( $(date +%s) - s0 ))s" >> "$summary"
}

tsp() {   # epochs in steps of TSP_STEP while the share lasts (each finished step is a policy), then the greedy gap
  local until=$(( $(date +%s) + STAGE_SECONDS - 60 )) e=0
  while [ "$(date +%s)" -lt "$until" ] && [ "$e" -lt "$TSP_MAX_EPOCHS" ]; do
    e=$((e + TSP_STEP))
    timeout $(( until - $(date +%s) + 1 )) "$PY" -m ghosttrack tsp-train --run-dir "$TSP_RUN" $TSP_ARGS --epochs $e --quiet || break
  done
  "$PY" -m ghosttrack tsp-eval --run-dir "$TSP_RUN" $TSP_EVAL_ARGS --out "$OUT/tsp_eval.csv" --quiet
}

for s in ${STAGES:-tests headline bench}; do
  case $s in
    tests)    stage tests 45 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs ;;
    headline) stage headline 220 "$PY" tools/gpu/headline.py --out "$OUT/headline.json" --budget-seconds 200 $HEADLINE_ARGS ;;
    bench)    stage bench 290 "$PY" -m ghosttrack bench $BENCH_ARGS --out "$OUT" ;;
    tsp)      stage tsp 600 tsp ;;
    *)        echo "unknown stage $s" >> "$summary" ;;
  esac
done
echo "total: $(( $(date +%s) - start ))s of a ${BUDGET}s budget" >> "$summary"
cat "$summary"
