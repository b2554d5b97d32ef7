"""A whole text-to-image run, ours against the diffusers StableDiffusionPipeline, on the same weights.

    python bench/bench_pipeline.py --height 256 --width 256 --steps 20          # CPU: a feasible size
    python bench/bench_pipeline.py --device cuda --dtype bf16                   # GPU: 50 DDIM steps at 512x512

One SD1.5-size pipeline with random weights (UNet, VAE, CLIP ViT-L/14 text tower, the real CLIP
tokenizer vocabulary) is saved once as a diffusers folder (--work); each implementation then loads
that folder the way a user would (ours through weights_convert, diffusers through from_pretrained)
in its own subprocess, so load time and peak memory are its own. A timed run is everything a user
waits for: tokenizing, text encoding with the unconditional prompt, the DDIM loop with classifier-
free guidance, and the VAE decode. Both start from the same initial latents, and the script prints
how far apart the two images are, so the two timed runs are shown to compute the same thing.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (bench/, beside this script)
PROMPT = "a photo of a red striped star on the snow, top left"


def run_one(impl: str, a) -> dict:
    import torch

    dev, dtype, sync = torch.device(a.device), common.dtype(a.dtype), common.sync_for(a.device)
    latents = torch.randn(a.batch, 4, a.height // 8, a.width // 8, generator=torch.Generator().manual_seed(a.seed))
    prompts = [PROMPT] * a.batch
    t0 = time.perf_counter()
    if impl == "ours":
        import sd_model as sdm

        model = sdm.StableDiffusion.from_pretrained(a.work, dev, dtype).eval()
        unet = model.unet

        def generate(steps):
            return model.sample(prompts, steps=steps, guidance_scale=a.guidance_scale, sampler="ddim", height=a.height,
                                width=a.width, latents=latents, progress=False)
    else:
        import diffusers

        model = diffusers.StableDiffusionPipeline.from_pretrained(a.work, torch_dtype=dtype, safety_checker=None).to(dev)
        model.set_progress_bar_config(disable=True)
        unet = model.unet

        def generate(steps):
            images = model(prompts, num_inference_steps=steps, guidance_scale=a.guidance_scale, height=a.height,
                           width=a.width, latents=latents.to(dev, dtype), output_type="pt").images
            return images * 2 - 1  # diffusers returns [0, 1]; ours [-1, 1]
    sync()
    load_s = time.perf_counter() - t0
    if a.channels_last:
        unet.to(memory_format=torch.channels_last)
    if a.compile:
        unet.compile()
    last = {}

    def run():
        last["images"] = generate(a.steps)
    with torch.no_grad():
        res = common.timed(run, a.runs, dev, a.warmup, lambda: generate(min(a.steps, 3)))
    common.save_output(a, last["images"])
    return {**res, "load_s": load_s}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_side_by_side_args(p)  # --warmup: untimed runs of 3 steps
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels-last", action="store_true", help="both UNets in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    a = p.parse_args()
    if a.impl:
        print(json.dumps(run_one(a.impl, a)))
        return
    common.ensure_random_sd15(a.work)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        dst = {impl: Path(tmp) / f"{impl}.pt" for impl in ("ours", "diffusers")}
        res, ratios = common.compare(__file__, {impl: ["--impl", impl, "--output-to", str(f)] for impl, f in dst.items()},
                                     a.rounds)
        images = {impl: torch.load(f) for impl, f in dst.items()}
    diff = (images["ours"] - images["diffusers"]).abs().max().item()
    mem = "GPU max allocated" if a.device.startswith("cuda") else "peak RSS"
    print(f"SD1.5 text-to-image, {a.steps} DDIM steps, CFG {a.guidance_scale}, {a.height}x{a.width}, batch {a.batch}, "
          f"{a.device} {a.dtype}{' channels-last' if a.channels_last else ''}{' compiled' if a.compile else ''}, "
          f"{res['ours']['threads']} threads, median of {a.runs} x {a.rounds} round(s)")
    print(f"| impl | time (s) | load (s) | {mem} (GiB) |\n|---|---|---|---|")
    for impl in ("ours", "diffusers"):
        r = res[impl]
        print(f"| {impl} | {r['median_s']:.3f} | {r['load_s']:.1f} | {r['peak_gib']:.2f} |")
    print(f"ratio ours / diffusers: {common.ratio_text(ratios)}; "
          f"max |image difference| {diff:.2e} (images in [-1, 1])")


if __name__ == "__main__":
    main()
