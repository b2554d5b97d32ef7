"""Our UNet against diffusers' on the same SD1.5-size weights and inputs.

    python bench/bench_unet.py                       # CPU: forward at 64x64 latents, fp32
    python bench/bench_unet.py --device cuda --dtype bf16 --backward --sample-steps 50
    python bench/bench_unet.py --no-sdpa             # what SDPA buys: both with explicit softmax attention

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

    dev, dtype = torch.device(a.device), common.dtype(a.dtype)
    if impl == "ours":
        model = common.load_ours(a.work, "unet")
        fwd = lambda x, t, c: model(x, t, c)
    else:
        model = UNet2DConditionModel.from_pretrained(a.work, subfolder="unet")
        fwd = lambda x, t, c: model(x, t, c).sample
    model.to(dev, dtype).requires_grad_(a.backward)
    if a.no_sdpa:  # the SDPA speed feature off: explicit softmax(QK^T)V on both sides
        if impl == "ours":
            import sd_model as sdm

            for m in model.modules():
                if isinstance(m, sdm.Attention):
                    m.processor = lambda attn, q, k, v: sdm.attention_with_probs(attn, q, k, v)[0]
        else:
            from diffusers.models.attention_processor import AttnProcessor

            model.set_attn_processor(AttnProcessor())
    if a.channels_last:
        model.to(memory_format=torch.channels_last)
    if a.compile:
        fwd = torch.compile(fwd)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 4, a.latent, a.latent, generator=g).to(dev, dtype)
    width = model.cfg.context_dim if impl == "ours" else model.config.cross_attention_dim  # 768 on SD1.5
    ctx = torch.randn(a.batch, 77, width, generator=g).to(dev, dtype)
    t = torch.tensor([500] * a.batch, device=dev)
    last = {}

    def step():
        if a.sample_steps:  # a plain loop of guided UNet calls (batch doubled for CFG)
            with torch.no_grad():
                z = x
                for i in range(a.sample_steps):
                    z = z + 0.01 * fwd(torch.cat([z, z]), t.repeat(2), torch.cat([ctx, ctx])).chunk(2)[0]
                last["out"] = z
        elif a.backward:
            last["out"] = fwd(x, t, ctx)
            last["out"].float().square().mean().backward()
        else:
            with torch.no_grad():
                last["out"] = fwd(x, t, ctx)

    res = common.timed(step, a.runs, dev, a.warmup)
    common.save_output(a, last["out"])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_side_by_side_args(p)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--sample-steps", type=int, default=0, help="time a loop of this many CFG UNet calls")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-sdpa", action="store_true", help="both UNets without SDPA (explicit softmax attention)")
    a = p.parse_args()
    if a.impl:
        print(json.dumps(run_one(a.impl, a)))
        return
    common.ensure_random_sd15(a.work)
    what = "sampling loop" if a.sample_steps else "forward+backward" if a.backward else "forward"
    common.side_by_side(__file__, a, f"SD1.5 UNet {what}, {a.device} {a.dtype}, batch {a.batch}, latent {a.latent}x{a.latent}")


if __name__ == "__main__":
    main()
