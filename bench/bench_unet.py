"""Our UNet against diffusers' on the same SD1.5-size weights and inputs.

    python bench/bench_unet.py                       # CPU: forward at 64x64 latents, fp32
    python bench/bench_unet.py --device cuda --dtype bf16 --backward --sample-steps 50

Each implementation runs in its own subprocess (so peak memory is its own), loads the UNet of the
random SD1.5 diffusers folder that bench_pipeline.py and bench_train.py use too (ours through
weights_convert, diffusers through from_pretrained), warms up, and reports the median of several
timed runs. Prints both times, the ratio ours / diffusers, and peak memory
(GPU: max allocated; CPU: peak resident set size of the process).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (bench/, beside this script)


def run_one(impl: str, a) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    import sd_model as sdm
    import weights_convert as wc

    dev, dtype = torch.device(a.device), common.dtype(a.dtype)
    folder = Path(a.work) / "unet"
    if impl == "ours":
        cfg = wc.diffusers_unet_config(json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):  # as StableDiffusion.from_pretrained: the loaded tensors become the parameters
            model = sdm.UNetModel(cfg)
        model.load_state_dict(wc.diffusers_unet_to_ldm(wc.folder_weights(folder, "diffusion_pytorch_model"), cfg), assign=True)
        fwd = lambda x, t, c: model(x, t, c)
    else:
        model = UNet2DConditionModel.from_pretrained(folder)
        fwd = lambda x, t, c: model(x, t, c).sample
    model.to(dev, dtype).requires_grad_(a.backward)
    if a.channels_last:
        model.to(memory_format=torch.channels_last)
    if a.compile:
        fwd = torch.compile(fwd)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 4, a.latent, a.latent, generator=g).to(dev, dtype)
    ctx = torch.randn(a.batch, 77, 768, generator=g).to(dev, dtype)
    t = torch.tensor([500] * a.batch, device=dev)

    def step():
        if a.sample_steps:  # a plain loop of guided UNet calls (batch doubled for CFG)
            with torch.no_grad():
                z = x
                for i in range(a.sample_steps):
                    z = z + 0.01 * fwd(torch.cat([z, z]), t.repeat(2), torch.cat([ctx, ctx])).chunk(2)[0]
        elif a.backward:
            fwd(x, t, ctx).float().square().mean().backward()
        else:
            with torch.no_grad():
                fwd(x, t, ctx)

    return common.timed(step, a.runs, dev, a.warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_side_by_side_args(p)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--sample-steps", type=int, default=0, help="time a loop of this many CFG UNet calls")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    if a.impl:
        print(json.dumps(run_one(a.impl, a)))
        return
    common.ensure_random_sd15(a.work)
    what = "sampling loop" if a.sample_steps else "forward+backward" if a.backward else "forward"
    common.side_by_side(__file__, a, f"SD1.5 UNet {what}, {a.device} {a.dtype}, batch {a.batch}, latent {a.latent}x{a.latent}")


if __name__ == "__main__":
    main()
