"""How our cost grows with resolution and batch size: sampling and training, time and peak memory.

    python bench/bench_scaling.py --resolutions 256 512 768 1024 --batches 1          # CPU: slow but feasible
    python bench/bench_scaling.py --device cuda --dtype bf16 --mixed-precision bf16 --gradient-checkpointing

On the random SD1.5-size diffusers folder the side-by-side scripts share (built on first use), for
every resolution x batch point, each measurement in its own fresh process so its peak memory is its
own:
- sampling: one guided denoising step (the UNet on the conditional and unconditional halves, batch
  2B, what each of the N steps of `StableDiffusion.sample` costs) and the VAE decode of B images,
  with the process's peak memory over both;
- training: one optimizer step of a method's real `train` (default: DreamBooth-LoRA, `dco.py train
  --dco-beta 0`; bench_train.py's harness), with its peak memory.
GPU memory is torch's max allocated; CPU memory is the peak resident set size of the process, which
includes the loaded weights. A point that fails (out of memory) is printed as such and the rest go on.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (bench/, beside this script)
import bench_train  # noqa: E402


def sample_point(a, res: int, batch: int) -> dict:
    import torch

    import sd_model as sdm

    dev, sync = torch.device(a.device), common.sync_for(a.device)
    model = sdm.StableDiffusion.from_pretrained(a.work, dev, common.dtype(a.dtype), vae_dtype=torch.float32 if a.fp32_vae else None)
    if a.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if a.compile:
        model.unet.compile()
    with torch.no_grad():
        step = model.cfg_model_fn(model.encode_prompt(["a photo of a red star"] * batch, (res, res)),
                                  model.uncond([""] * batch, (res, res)), 7.5)
        f = model.vae.downsample_factor
        z = torch.randn(batch, 4, res // f, res // f, generator=torch.Generator().manual_seed(0)).to(dev)
        unet = common.timed(lambda: step(z, 500, 0), a.runs, dev, a.warmup)  # a step as sample_loop calls it
        decode = common.timed(lambda: model.decode_latents(z), a.runs, dev, a.warmup)
    sync()
    return {"step_s": unet["median_s"], "decode_s": decode["median_s"], "peak_gib": common.peak_gib(dev),
            "threads": unet["threads"]}


def train_point(a, res: int, batch: int) -> dict:
    import torch

    sync = common.sync_for(a.device)
    ns = SimpleNamespace(work=a.work, warmup=a.warmup, runs=a.runs, resolution=res, batch=batch, rank=a.rank,
                         mixed_precision=a.mixed_precision, gradient_checkpointing=a.gradient_checkpointing, device=a.device,
                         no_cache_latents=False, no_cache_text=False)
    with tempfile.TemporaryDirectory() as tmp:
        images = bench_train.write_images(Path(tmp) / "images", res, n=max(4, batch))
        steps = bench_train.ours(a.method, ns, images, Path(tmp) / "out", sync)[a.warmup :]
    return {"train_s": statistics.median(steps), "peak_gib": common.peak_gib(a.device), "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_work_arg(p)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 768, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="sampling weights")
    p.add_argument("--fp32-vae", action="store_true", help="sampling: keep the VAE in fp32")
    p.add_argument("--channels-last", action="store_true", help="sampling: channels-last UNet")
    p.add_argument("--compile", action="store_true", help="sampling: torch.compile the UNet")
    p.add_argument("--method", choices=list(bench_train.PAIRS), default="lora", help="whose training step")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="training")
    p.add_argument("--gradient-checkpointing", action="store_true", help="training")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (lora/dco)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip", choices=["sample", "train"], help="measure only the other one")
    p.add_argument("--point", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.point:
        kind, res, batch = a.point[0], int(a.point[1]), int(a.point[2])
        print(json.dumps((sample_point if kind == "sample" else train_point)(a, res, batch)))
        return
    if any(r % 8 for r in a.resolutions):
        sys.exit("every resolution must be a multiple of 8 (the VAE's downsampling).")
    common.ensure_random_sd15(a.work)
    mem = "GPU max allocated" if a.device.startswith("cuda") else "peak RSS"
    print(f"SD1.5 size, {a.device}, sampling {a.dtype}{' channels-last' if a.channels_last else ''}"
          f"{' compiled' if a.compile else ''}{' fp32 VAE' if a.fp32_vae else ''}; training {a.method}, mixed precision "
          f"{a.mixed_precision}{', gradient checkpointing' if a.gradient_checkpointing else ''}; median of {a.runs} after "
          f"{a.warmup} warm-up")
    print(f"| resolution | batch | guided step (s) | VAE decode (s) | sampling {mem} (GiB) | train step (s) | "
          f"training {mem} (GiB) |\n|---|---|---|---|---|---|---|", flush=True)
    for res in a.resolutions:
        for batch in a.batches:
            t0 = time.perf_counter()
            s, tr = ({"error": "-"} if a.skip == kind else common.run_impl(__file__, "--point", kind, str(res), str(batch), fatal=False)
                     for kind in ("sample", "train"))
            cells = ([s["error"]] * 3 if "error" in s else [f"{s['step_s']:.3f}", f"{s['decode_s']:.3f}", f"{s['peak_gib']:.2f}"])
            cells += [tr["error"]] * 2 if "error" in tr else [f"{tr['train_s']:.3f}", f"{tr['peak_gib']:.2f}"]
            print(f"| {res} | {batch} | " + " | ".join(cells) + " |", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
