#!/usr/bin/env bash
# Issues 4-8's GPU rows as device calls of under 10 minutes each: every bench script the README's
# Performance section names, on the random SD1.5-size weights, bf16. Each script runs under its own
# time limit and its output goes to $OUT/PART.txt; one that fails or runs out of time is reported and
# the next one runs. Not yet run on a GPU: the limits below are guesses, to be set from a first run.
#
#   bash bench/gpu_rows.sh sample     # UNet fwd / fwd+bwd / 50 guided calls, the 512 px pipeline, DCI's and ICO's cost
#   bash bench/gpu_rows.sh train      # one training step of each method at 512 px, time and peak memory
#   bash bench/gpu_rows.sh scaling    # cost against resolution (256-1024) for sampling and a LoRA step
#   bash bench/gpu_rows.sh sdxl       # DCO-LoRA on SDXL at 1024 px: step time and peak memory (no diffusers needed)
#   DEVICE=cpu SMALL=1 OUT=/tmp/g bash bench/gpu_rows.sh sample   # the plumbing, here (tiny sizes, slow)
#
# The device machine has torch, transformers and peft but not diffusers, the reference: carry its wheel.
# Here, once per checkout:  echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp -d .whl diffusers==0.42.1 importlib_metadata
# then run(command="bash bench/gpu_rows.sh sample", carry=[".whl"], timeout_s=600). The random SD1.5
# folder is built on the machine's first call (about 4 GB, in $WORK); a fresh machine builds it again.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?give a part: sample, train, scaling or sdxl}
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"   # the device machine makes it; a CPU run here may name a new folder
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/bench_sd15_random}
DEADLINE=${DEADLINE:-560}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ "$PART" = sdxl ] || $PY -c "import diffusers" || { echo "diffusers is missing: carry its wheel (see the top of this script)"; exit 1; }
start=$(date +%s)
# SMALL=1: the same commands at sizes a CPU runs in minutes (a test of this script, not a measurement)
if [ "${SMALL:-0}" = 1 ]; then RES=64; LAT=8; STEPS=2; RUNS=1; DT=fp32; MP=no; DCI="--config tiny --train-steps 2 --repeats 1"
else RES=512; LAT=64; STEPS=50; RUNS=3; DT=bf16; MP=bf16; DCI="--config sd15"; fi
ON=(--work "$WORK" --device "$DEVICE")

step() {  # step LIMIT_S NAME COMMAND...: run it under the smaller of its limit and the time left
  local limit=$1 name=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) + start ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped, $left s left" | tee -a "$OUT/$PART.txt"; return; fi
  echo "== $name ($(( $(date +%s) - start )) s in, limit $limit s): $*" | tee -a "$OUT/$PART.txt"
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v "%|" | tee -a "$OUT/$PART.txt"
  local rc=${PIPESTATUS[0]}
  (( rc != 0 )) && echo "== $name: exit $rc$( (( rc == 124 )) && echo ' (out of time)')" | tee -a "$OUT/$PART.txt"
  return 0
}

[ "$PART" = sdxl ] || [ -f "$WORK/model_index.json" ] || step 240 "build the random SD1.5 folder" $PY -c \
  "import sys; sys.path.insert(0, 'bench'); import common; common.ensure_random_sd15(sys.argv[1])" "$WORK"
case $PART in
  sample)
    step 150 "UNet forward" $PY bench/bench_unet.py --dtype "$DT" --latent "$LAT" --runs "$RUNS" "${ON[@]}"
    step 150 "UNet forward + backward" $PY bench/bench_unet.py --dtype "$DT" --latent "$LAT" --runs "$RUNS" "${ON[@]}" --backward
    step 150 "UNet, $STEPS guided calls" $PY bench/bench_unet.py --dtype "$DT" --latent "$LAT" --runs "$RUNS" "${ON[@]}" --sample-steps "$STEPS"
    step 150 "pipeline ${RES}px, $STEPS steps" $PY bench/bench_pipeline.py "${ON[@]}" --dtype "$DT" --height "$RES" --width "$RES" --steps "$STEPS" --runs "$RUNS"
    step 150 "DCI against plain sampling, an ICO step" $PY bench/dci_ico_timing.py $DCI --device "$DEVICE" --weights-dtype "$DT" \
      --mixed-precision "$MP" --gradient-checkpointing --batch 1 --sample-steps "$STEPS" --out "$OUT/dci_timing.json"
    ;;
  train)
    step 500 "training steps ${RES}px" $PY bench/bench_train.py "${ON[@]}" --mixed-precision "$MP" --gradient-checkpointing --resolution "$RES" --runs "$RUNS"
    ;;
  scaling)
    if [ "${SMALL:-0}" = 1 ]; then R="64 128"; else R="256 512 768 1024"; fi
    step 500 "cost against resolution" $PY bench/bench_scaling.py "${ON[@]}" --dtype "$DT" --mixed-precision "$MP" --gradient-checkpointing --resolutions $R --batches 1
    ;;
  sdxl)
    if [ "${SMALL:-0}" = 1 ]; then X="--config tiny --resolution 64"; else X="--config sdxl --resolution 1024"; fi
    step 500 "SDXL DCO-LoRA step and peak memory" $PY bench/dco_sdxl_memory.py $X --device "$DEVICE" --work "${WORK}_xl"
    ;;
  *) echo "unknown part '$PART': sample, train, scaling or sdxl"; exit 2 ;;
esac
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$OUT/$PART.txt"
