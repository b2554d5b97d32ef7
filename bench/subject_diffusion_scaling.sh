#!/usr/bin/env bash
# Subject-Diffusion training throughput on CPU, 1 process vs 2 (torchrun + gloo) at the same global
# batch of 16, on a toy-shaped model with random weights (throughput does not depend on the weights).
#   bash bench/subject_diffusion_scaling.sh        # PYTHON and WORK may be set
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
W=${WORK:-/tmp/sd_scaling}
[ -f "$W/model/config.json" ] || $PY toy_world.py init-sd --out "$W/model"
[ -d "$W/records" ] || $PY toy_world.py make-records --out "$W/records" --n 2000 --shard-size 500
COMMON="--pretrained-model $W/model --data $W/records --overwrite --max-train-steps 20 --mixed-precision no --num-workers 0 --min-box-area 0.02 --checkpointing-steps 0 --lr-warmup-steps 0"
for rep in 1 2; do
  OMP_NUM_THREADS=1 $PY subject_diffusion.py train $COMMON --train-batch-size 16 --output-dir "$W/s1_$rep" 2>/dev/null
  OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node 2 subject_diffusion.py train $COMMON --train-batch-size 8 --output-dir "$W/s2_$rep" 2>/dev/null
done
W="$W" $PY - <<'PY'
import json, os, numpy as np
w = os.environ["W"]
for n in (1, 2):
    v = [r["images_per_s"] for rep in (1, 2) for r in map(json.loads, open(f"{w}/s{n}_{rep}/log.jsonl")) if r.get("step", 0) > 3 and "images_per_s" in r]
    print(f"{n} process(es): median {np.median(v):.2f} images/s (steps 4-20 of 2 runs)")
PY
