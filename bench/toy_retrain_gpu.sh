#!/usr/bin/env bash
# Issue 3's GPU run in one device call: the pretraining data, a long toy CLIP (the CPU run of
# 2026-12-06 found position arriving between 600 and 1800 steps: README, "A longer toy CLIP learns
# position"), then the toy UNet from scratch on that text tower and the shipped VAE. Only training
# runs there; scoring (eval-base, bench/toy_caption_use.py) runs here on the returned weights.
#
#   bash bench/toy_retrain_gpu.sh                        # on the device machine ($OUT is set there)
#   DEVICE=cpu N=600 CLIP_STEPS=2 UNET_STEPS=2 LATENTS=600 OUT=/tmp/r bash bench/toy_retrain_gpu.sh   # plumbing, here
#   bash bench/toy_retrain_gpu.sh join FILES_AT outputs/toy-gpu/sd   # here: the returned files -> a model folder
#
# A returned file is capped at 16 MB, so the UNet (17 MB in fp16) comes back in two halves, beside
# the towers, the VAE, config.json and report.tar (logs, args, the last validation grids). The whole
# script ends by DEADLINE seconds (a device call is cut at 600): the CLIP stage stops after CLIP_SECONDS
# and the UNet stage when the deadline nears, each then going on from its newest complete checkpoint,
# so a machine slower than guessed still returns a model. Not yet run on a GPU: its timings are unmeasured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = join ]; then
  [ $# = 3 ] || { echo "usage: bash bench/toy_retrain_gpu.sh join FILES_AT MODEL_DIR"; exit 2; }
  exec $PY - "$2" "$3" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
import sd_model as sdm
from safetensors.torch import load_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
halves = [load_file(str(src / f"unet-{i}-of-2.safetensors")) for i in (1, 2)]
sdm.save_safetensors({**halves[0], **halves[1]}, dst / "unet.safetensors")
for f in ("text_encoder.safetensors", "image_encoder.safetensors", "vae.safetensors", "config.json"):
    shutil.copy(src / f, dst / f)
sdm.StableDiffusion.from_pretrained(dst)  # loads strictly, or says what is wrong
print(f"wrote {dst}")
PY
fi

OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"   # the device machine makes it; a CPU run here may name a new folder
W=${WORK:-/tmp/toy-retrain}
DEVICE=${DEVICE:-cuda}
N=${N:-200000}                   # pretraining scenes (the shipped run's 200,000)
CLIP_STEPS=${CLIP_STEPS:-3600}   # batch 256; on the CPU: position 0.93 at 1800, 0.96 at 3600
UNET_STEPS=${UNET_STEPS:-7600}   # batch 32, one cosine schedule (the shipped UNet: 2400, then a warm restart to 7600)
LATENTS=${LATENTS:-200000}       # images with cached latents (the shipped run: 32,000)
CLIP_SECONDS=${CLIP_SECONDS:-200}
DEADLINE=${DEADLINE:-560}        # seconds from the start; packing the results takes about 10
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-8}
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
newest() {  # the newest complete checkpoint, as --resume latest finds it
  $PY -c "import sys; sys.path.insert(0, '.'); import sd_model; print(sd_model.find_checkpoint(sys.argv[1], 'latest') or '')" "$1"
}
quiet() { tr '\r' '\n' | grep -v "%|" || true; }   # progress bars out of the returned tail

[ -f "$W/data/images.npy" ] || { stamp data; $PY toy_world.py pretrain-data --out "$W/data" --n "$N" --workers "$(nproc)"; }
stamp clip
set +e   # a stage cut off by its timeout (exit 124) goes on from its newest complete checkpoint
timeout "$CLIP_SECONDS" $PY toy_world.py train-clip --data "$W/data" --output-dir "$W/clip" --max-train-steps "$CLIP_STEPS" \
    --checkpointing-steps "${CLIP_CKPT:-300}" --device "$DEVICE" --threads "$OMP_NUM_THREADS" --resume latest 2>&1 | quiet; rc=${PIPESTATUS[0]}; set -e
if [ "$rc" != 0 ]; then   # the UNet trains on the newest complete CLIP checkpoint
  c=$(newest "$W/clip"); [ -n "$c" ] || { echo "the CLIP stage (exit $rc) wrote no checkpoint in ${CLIP_SECONDS} s"; exit 1; }
  echo "the CLIP stage ended with exit $rc; using $c"; cp "$c"/text_encoder.safetensors "$c"/image_encoder.safetensors "$W/clip/"
fi
mkdir -p "$W/vae" && cp assets/toy/sd/vae.safetensors "$W/vae/"   # the shipped VAE reconstructs well (README)
stamp unet
set +e
timeout $(( DEADLINE - 15 - $(date +%s) + start )) $PY toy_world.py train-unet --data "$W/data" --stage-dir "$W" --output-dir "$W/unet" \
    --max-train-steps "$UNET_STEPS" --latent-images "$LATENTS" --checkpointing-steps "${UNET_CKPT:-400}" --validation-steps 1000 \
    --device "$DEVICE" --threads "$OMP_NUM_THREADS" --export "" --resume latest 2>&1 | quiet; rc=${PIPESTATUS[0]}; set -e
stamp "pack (the UNet stage's exit: $rc)"
W="$W" OUT="$OUT" FINISHED=$(( rc == 0 )) $PY - <<'PY'
import json, os, shutil, sys, tarfile
from pathlib import Path
from safetensors.torch import load_file, save_file
sys.path.insert(0, ".")
import sd_model as sdm
w, out = Path(os.environ["W"]), Path(os.environ["OUT"])
unet = w / "unet"
model = unet if os.environ["FINISHED"] == "1" else sdm.find_checkpoint(unet, "latest")
if model is None:
    raise SystemExit("the UNet stage wrote no complete checkpoint: raise DEADLINE or lower UNET_CKPT")
print("shipping", model)
sd = load_file(str(model / "unet.safetensors"))
keys = sorted(sd)
for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
    save_file({k: sd[k] for k in part}, str(out / f"unet-{i}-of-2.safetensors"))
for f in ("text_encoder.safetensors", "image_encoder.safetensors", "vae.safetensors", "config.json"):
    shutil.copy(model / f, out / f)
(w / "shipped.json").write_text(json.dumps({"from": str(model.relative_to(w))}))
with tarfile.open(out / "report.tar", "w") as tar:
    tar.add(w / "shipped.json", "shipped.json")
    for stage in ("clip", "unet"):
        for f in ("log.jsonl", "args.json"):
            if (w / stage / f).exists():
                tar.add(w / stage / f, f"{stage}/{f}")
    for f in sorted((unet / "validation").glob("*.png"))[-4:]:
        tar.add(f, f"unet/validation/{f.name}")
PY
stamp done
