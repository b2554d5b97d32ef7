"""How much of a scene survives the toy VAE: the probes on 128 fresh single-object scenes and on their
reconstructions (posterior mean, decoded). Bounds what any model on this VAE can reach.

    python bench/toy_vae_recon.py                                   # the shipped toy model's VAE
    python bench/toy_vae_recon.py outputs/toy/vae/checkpoint-1000/training_state.safetensors --grid g.png
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402

KEYS = ("background", "position", "size", "shape", "color", "pattern", "color2")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="?", default=str(Path(tw.TOY_DIR) / "vae.safetensors"),
                   help="a vae.safetensors, or a train-vae checkpoint's training_state.safetensors")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--grid", default="", help="PNG: 16 originals over their reconstructions")
    a = p.parse_args()
    st = load_file(a.weights)
    sd = {k[len("param."):]: v.float() for k, v in st.items() if k.startswith("param.")} or {k: v.float() for k, v in st.items()}
    vae = sdm.AutoencoderKL(tw.TOY_SD.vae)
    vae.load_state_dict(sd)
    vae.eval()
    probes, _ = tw.load_probes(tw.PROBES_PATH)
    rng = np.random.default_rng(5)
    scenes = [tw.sample_scene(rng, "pretrain", p_two=0.0) for _ in range(a.n)]
    imgs = np.stack([tw.render(s)[0] for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mean).clamp(-1, 1)
    recs = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    truth = [{k: tw.PROBE_HEADS[k][v] for k, v in tw.probe_labels(s).items()} for s in scenes]
    on = {"original": tw.predict(probes, list(imgs)), "reconstruction": tw.predict(probes, list(recs))}
    print(f"L1 (pixels in [-1, 1]): {(rec - x).abs().mean().item():.4f}, n = {a.n}")
    print("| probe | on originals | on reconstructions |\n|---|---|---|")
    for k in KEYS:
        acc = [np.mean([p[k] == t[k] for p, t in zip(on[w], truth)]) for w in on]
        print(f"| {k} | {acc[0]:.2f} | {acc[1]:.2f} |")
    if a.grid:
        sdm.image_grid([Image.fromarray(im) for im in np.concatenate([imgs[:16], recs[:16]])], 8).save(a.grid)


if __name__ == "__main__":
    main()
