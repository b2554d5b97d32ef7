"""Peak GPU memory and step time of DCO-LoRA on SDXL at 1024x1024 (issue 5; the DCO rebuttal reports
about 16.0 GB on an A100): the real `dco.train` on random SDXL-size weights, bf16 frozen weights,
gradient checkpointing, batch 1, the official rank 32.

    python bench/dco_sdxl_memory.py --device cuda                            # on a GPU: builds ~7 GB of weights once
    python bench/dco_sdxl_memory.py --config tiny --device cpu --resolution 64   # the plumbing, here

The weights are random (memory and speed do not depend on them), written once in this project's layout
to --work. The step time is the median between optimizer steps after one warm-up; the peak is
torch.cuda.max_memory_allocated over the whole run (CPU: the process's peak resident set size).
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (bench/, beside this script)
import dco  # noqa: E402
import sd_model as sdm  # noqa: E402
import weights_convert as wc  # noqa: E402


def ensure_weights(folder: Path, cfg: sdm.SDConfig) -> None:
    if (folder / "config.json").exists():
        return
    print(f"writing random weights to {folder} (once)", file=sys.stderr)
    torch.manual_seed(0)
    model = sdm.StableDiffusion(cfg)
    parts = {p: {k: v.to(torch.bfloat16) for k, v in getattr(model, p).state_dict().items()}
             for p in ("unet", "vae", "text_encoder", "text_encoder_2")}
    folder.mkdir(parents=True, exist_ok=True)
    wc.write_parts(folder, cfg, parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_sdxl_random"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is a warm-up)")
    p.add_argument("--mixed-precision", default="bf16")
    a = p.parse_args()
    work = Path(a.work) / a.config
    if a.config == "tiny":  # SDXL's layout at toy width, the tests' config: a test of this script
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import TINY_XL as cfg
    else:
        cfg = sdm.SDXL
    ensure_weights(work, cfg)
    images = Path(tempfile.mkdtemp()) / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (a.resolution, a.resolution, 3), dtype=np.uint8)).save(images / f"{i}.png")
    stamps = common.clock_train_steps(common.sync_for(a.device))
    if torch.device(a.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dco.train(dco.DCOArgs(pretrained_model=str(work), images=str(images), instance_prompt="a photo of sks dog", rank=a.rank,
                          output_dir=str(Path(tempfile.mkdtemp()) / "run"), max_train_steps=a.steps, resolution=a.resolution,
                          mixed_precision=a.mixed_precision, gradient_checkpointing=True, checkpointing_steps=0,
                          device=a.device, overwrite=True))
    steps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
    row = {"config": a.config, "resolution": a.resolution, "rank": a.rank, "mixed_precision": a.mixed_precision,
           "median_step_s": statistics.median(steps) if steps else None, "steps_timed": len(steps),
           "peak_gib": round(common.peak_gib(a.device), 2), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
