"""Our VAE against diffusers' AutoencoderKL: decode (what ends every sampling run) or encode (what
starts every training step without cached latents), on the same SD1.5-size weights.

    python bench/bench_vae.py --resolution 512 --rounds 3                       # CPU
    python bench/bench_vae.py --device cuda --dtype bf16 --resolution 1024

Each implementation runs in its own subprocess and loads the VAE of the random SD1.5 diffusers folder
that the other scripts share (ours through weights_convert, diffusers through from_pretrained); the
median of the timed runs after a warm-up, the peak memory, and the paired ratio with --rounds.
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

    dev, dtype = torch.device(a.device), common.dtype(a.dtype)
    if impl == "ours":
        vae = common.load_ours(a.work, "vae")
        decode, encode = vae.decode, lambda x: vae.encode(x).mean
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(a.work, subfolder="vae")
        decode, encode = (lambda z: vae.decode(z).sample), (lambda x: vae.encode(x).latent_dist.mean)
    vae.to(dev, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    if a.encode:
        x, run = torch.rand(a.batch, 3, a.resolution, a.resolution, generator=g).to(dev, dtype) * 2 - 1, encode
    else:
        x, run = torch.randn(a.batch, 4, a.resolution // 8, a.resolution // 8, generator=g).to(dev, dtype), decode
    last = {}
    with torch.no_grad():
        res = common.timed(lambda: last.update(out=run(x)), a.runs, dev, a.warmup)
    common.save_output(a, last["out"])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_side_by_side_args(p)
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--encode", action="store_true", help="time the encoder instead of the decoder")
    a = p.parse_args()
    if a.impl:
        print(json.dumps(run_one(a.impl, a)))
        return
    if a.resolution % 8:
        sys.exit(f"--resolution must be a multiple of 8 (got {a.resolution}).")
    common.ensure_random_sd15(a.work)
    common.side_by_side(__file__, a, f"SD1.5 VAE {'encode' if a.encode else 'decode'}, {a.device} {a.dtype}, batch {a.batch}, "
                                     f"{a.resolution}x{a.resolution} pixels")


if __name__ == "__main__":
    main()
