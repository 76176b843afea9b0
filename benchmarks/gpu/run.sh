#!/usr/bin/env bash
# The GPU run of issue #16, on one H100/H200 with Python 3.12, torch 2.11 and timm installed, nothing reachable
# (benchmarks/gpu/README.md says how the device calls bring .gpu/ there). Stages, each under a time budget that
# rolls its unused seconds forward, so the whole run ends within GPU_BUDGET_S (480 s):
#   install  join the parts (sha256-checked), pip install every wheel --no-index --no-deps --target
#   check    stage 0: GPU, versions, every project module imports on this torch, bf16 matmul TFLOP/s
#   pytest   pytest -m gpu
#   model-eager, model-compile   pipeline bench model: ViT-B/16 SimCLR bf16, batch 64/128/256 at 224 px
#   loader   pipeline bench loader: DALI mixed decode vs the torch backend on all CPU cores, two 224 px views
#   e2e      pipeline bench e2e: 200 steps of ViT-S/16 SimCLR from the shards on DALI: data-wait fraction
# After every stage the figures so far go into RESULTS_DIR (README.md, summary.json, each mode's files) and
# $OUT (run.log, summary.md, summary.json, results.tar.gz): a run cut short still returns what it measured.
#
# Environment: OUT (default runs/gpu-out), STAGES (comma list, default all of the above), GPU_BUDGET_S,
# GPU_PYTEST_PATHS (default tests),
# GPU_SMOKE=1 (a CPU rehearsal at tiny sizes), PYTHON (default python3), GPU_DIR (default .gpu),
# GPU_WORK (default /tmp/gpu-run: payload and site-packages, outside the repository), RESULTS_DIR
# (default benchmarks/results/<date>_gpu_<gpu>).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
REPO=$PWD
export PY=${PYTHON:-python3}
export GPU_DIR=${GPU_DIR:-.gpu}
export WORK=${GPU_WORK:-/tmp/gpu-run}
export SMOKE=${GPU_SMOKE:-0}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$WORK/site/bin:$PATH"
CORES=$(nproc)
export CORES

if ((SMOKE)); then  # tiny sizes on CPU: every stage runs the same commands as on the GPU
  export DEV=cpu REPEAT=2 LOADER_BATCH=8 LOADER_BATCHES=2 LOADER_REPEATS=1 LOADER_CORES=$((CORES < 2 ? CORES : 2))
  export MODEL_WARMUP=1 MODEL_STEPS=2 MODEL_BATCHES=2,4 IMG=32 E2E_BATCH=4 E2E_WARMUP=2 E2E_STEPS=2 E2E_LOG=2
  export COMPILE=${GPU_SMOKE_COMPILE:-false}
  TINY="model.embed_dim=32 model.depth=2 model.num_heads=2 model.patch_size=8 method.proj_hidden_dim=64 method.proj_dim=32"
  export MODEL_B="$TINY" MODEL_S="$TINY" LOADER_IMG=32
else
  export DEV=cuda REPEAT=64 LOADER_BATCH=256 LOADER_BATCHES=60 LOADER_REPEATS=2 LOADER_CORES=$CORES
  export MODEL_WARMUP=10 MODEL_STEPS=30 MODEL_BATCHES=64,128,256 IMG=224 E2E_BATCH=256 E2E_WARMUP=20 E2E_STEPS=200
  export E2E_LOG=20 COMPILE=true MODEL_B="" MODEL_S="" LOADER_IMG=224
fi
export SHARDS="$WORK/payload/shards"

# -- stage bodies (run as `run.sh --stage NAME`, under `timeout`) -----------------------------------------------

payload_images() {  # the tile count of the carried shards (SHARDS/shards-N)
  local d
  d=$(ls -d "$SHARDS"/shards-[0-9]* 2>/dev/null | grep -v -- '-x' | head -1)
  [[ -n "$d" ]] || { echo "run.sh: no shards in $SHARDS: the payload did not arrive (see the install stage)" >&2; return 1; }
  echo "${d##*shards-}"
}

st_install() {
  local wheels=() core
  core=$(ls -d "$GPU_DIR"/call*/core 2>/dev/null | sort -V | tail -1)
  if "$PY" benchmarks/gpu/pack.py join --gpu-dir "$GPU_DIR" --dest "$WORK/payload"; then
    wheels+=("$WORK"/payload/wheels/*.whl)
  else
    echo "install: no DALI payload here: the loader and e2e stages will fail for want of it"
  fi
  [[ -n "$core" ]] && wheels+=("$core"/wheels/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "install: no wheels under $GPU_DIR: using what is installed"
    return 0
  fi
  local key
  key=$(ls -l "${wheels[@]}" | awk '{print $5, $NF}' | sha256sum | cut -c1-16)
  if [[ -f "$WORK/site/.installed-$key" ]]; then
    echo "install: the same ${#wheels[@]} wheels are installed in $WORK/site already"
    return 0
  fi
  rm -rf "$WORK/site"
  echo "install: ${#wheels[@]} wheels into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "${wheels[@]}" || return 1
  touch "$WORK/site/.installed-$key"
}

st_check() {
  local args=(--out "$RES/env.json")
  ((SMOKE)) && args+=(--smoke)
  "$PY" benchmarks/gpu/check.py "${args[@]}"
}

st_pytest() {
  local args=(-m gpu -q -rA -p no:cacheprovider --continue-on-collection-errors --junitxml="$RES/pytest.xml") fm
  fm=$(ls -d "$GPU_DIR"/call*/core/fmnist 2>/dev/null | sort -V | tail -1)
  [[ -n "$fm" ]] && export FASHION_MNIST_DIR=$(realpath "$fm")  # the subset tests/conftest.py reads
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 300)
  # shellcheck disable=SC2086  # GPU_PYTEST_PATHS may name several
  "$PY" -m pytest "${args[@]}" ${GPU_PYTEST_PATHS:-tests} 2>&1 | tee "$RES/pytest.txt"
}

st_model() {  # st_model COMPILE NAME
  # shellcheck disable=SC2086  # MODEL_B holds several overrides
  "$PY" -m pipeline bench model --output "$RES/model_$2" --no-progress --warmup "$MODEL_WARMUP" \
    --steps "$MODEL_STEPS" --batch-sizes "$MODEL_BATCHES" --image-sizes "$IMG" model.name=vit_base_patch16_224 \
    method.name=simclr engine.precision=bf16 "engine.compile=$1" metrics.tensorboard=false $MODEL_B
}

st_loader() {
  local images
  images=$(payload_images) || return 1
  "$PY" -m pipeline bench loader --device "$DEV" --workdir "$SHARDS" --images "$images" --repeat "$REPEAT" \
    --image-size "$LOADER_IMG" --batch-size "$LOADER_BATCH" --cpu-cores "$LOADER_CORES" --batches "$LOADER_BATCHES" \
    --repeats "$LOADER_REPEATS" --recipe simclr --backends dali torch --output "$RES/loader"
}

st_e2e() {
  local images shards
  images=$(payload_images) || return 1
  shards="$SHARDS/shards-$images-x$REPEAT"
  "$PY" -c "import sys; from pipeline.bench.loader import repeat_shards; repeat_shards(*sys.argv[1:3], int(sys.argv[3]))" \
    "$SHARDS/shards-$images" "$shards" "$REPEAT" || return 1
  # shellcheck disable=SC2086
  "$PY" -m pipeline bench e2e --output "$RES/e2e" --no-progress --shards "$shards" --backends dali \
    --warmup "$E2E_WARMUP" --steps "$E2E_STEPS" model.name=vit_small_patch16_224 method.name=simclr \
    "loader.batch_size=$E2E_BATCH" "loader.num_workers=$LOADER_CORES" "loader.device=$DEV" engine.precision=bf16 \
    "engine.compile=$COMPILE" "augment.image_size=$IMG" "model.img_size=$IMG" "metrics.log_every=$E2E_LOG" \
    metrics.tensorboard=false $MODEL_S
}

if [[ "${1:-}" == "--stage" ]]; then
  case $2 in
    install) st_install ;;
    check) st_check ;;
    pytest) st_pytest ;;
    model-eager) st_model false eager ;;
    model-compile) st_model "$COMPILE" compile ;;
    loader) st_loader ;;
    e2e) st_e2e ;;
    *) echo "run.sh: unknown stage $2" >&2; exit 2 ;;
  esac
  exit $?
fi

# -- the driver ------------------------------------------------------------------------------------------------

BUDGET=${GPU_BUDGET_S:-480}
STAGES=${STAGES:-install,check,pytest,model-eager,model-compile,loader,e2e}
# Seconds per stage at GPU_BUDGET_S=480 (scaled with it). A stage must end by the start plus the budgets of the
# selected stages up to it, so time one stage leaves unused rolls on to the next and none can overrun the run.
declare -A PLAN=([install]=40 [check]=35 [pytest]=130 [model-eager]=45 [model-compile]=110 [loader]=50 [e2e]=70)
ORDER=(install check pytest model-eager model-compile loader e2e)
OUT=${OUT:-$REPO/runs/gpu-out}
mkdir -p "$OUT" "$WORK"

if command -v nvidia-smi >/dev/null && GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) \
    && [[ -n "$GPU_NAME" ]]; then
  SLUG=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | sed 's/nvidia//; s/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
else
  SLUG="cpu${CORES}c"
fi
KIND=gpu
((SMOKE)) && KIND=gpu-smoke
export RES=${RESULTS_DIR:-$REPO/benchmarks/results/$(date +%F)_${KIND}_${SLUG}}

publish() {  # the figures so far: into RES (README.md, summary.json) and OUT (what comes back)
  "$PY" benchmarks/gpu/summarize.py "$RES" || echo "run.sh: summarize failed"
  cp "$RES/README.md" "$OUT/summary.md" 2>/dev/null
  cp "$RES/summary.json" "$OUT/summary.json" 2>/dev/null
  tar -czf "$OUT/results.tar.gz.partial" -C "$(dirname "$RES")" "$(basename "$RES")" \
    && mv "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
}

main() {
  local t0 end left s rc took failed=()
  t0=$(date +%s)
  end=$t0
  mkdir -p "$RES"
  : >"$RES/stages.jsonl"
  PIPELINE_GIT_COMMIT=$("$PY" benchmarks/gpu/pack.py tree --repo "$REPO" --gpu-dir "$GPU_DIR" 2>"$RES/tree.txt")
  export PIPELINE_GIT_COMMIT
  echo "run.sh: $(date -Is), commit $PIPELINE_GIT_COMMIT, ${GPU_NAME:-no GPU}, $CORES CPUs, budget ${BUDGET}s," \
    "stages $STAGES, results in $RES, smoke=$SMOKE"
  for name in "${ORDER[@]}"; do
    [[ ",$STAGES," == *",$name,"* ]] || continue
    end=$(( end + PLAN[$name] * BUDGET / 480 ))
    left=$(( end - $(date +%s) ))
    if (( left < 5 )); then
      echo "== $name: skipped, the run's time is spent"
      echo "{\"stage\": \"$name\", \"rc\": -1, \"seconds\": 0, \"budget_s\": $left, \"command\": \"not run: no time left\"}" \
        >>"$RES/stages.jsonl"
      failed+=("$name")
      continue
    fi
    echo "== $name: up to ${left}s"
    s=$(date +%s)
    timeout -k 10 "$left" bash "$REPO/benchmarks/gpu/run.sh" --stage "$name"
    rc=$?
    took=$(( $(date +%s) - s ))
    echo "== $name: exit $rc after ${took}s"
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"budget_s\": $left, \"command\": \"STAGES=$name bash benchmarks/gpu/run.sh\"}" \
      >>"$RES/stages.jsonl"
    ((rc == 0)) || failed+=("$name")
    publish
    if [[ $name == check && $rc == 2 ]]; then
      echo "run.sh: no GPU to measure: stopping here (GPU_SMOKE=1 rehearses on a CPU)"
      break
    fi
  done
  echo "run.sh: done in $(( $(date +%s) - t0 ))s; failed: ${failed[*]:-none}; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  ((${#failed[@]} == 0))
}

main 2>&1 | tee -a "$OUT/run.log"
exit "${PIPESTATUS[0]}"
