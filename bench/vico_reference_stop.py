"""What stopping ViCo's reference stream after the last image layer saves (card 15): the median time of
one ViCo training step (prompt encoding, the doubled UNet forward with the regulariser, backward) with
the early stop and with the whole batch, alternating, and the largest difference of eps between them.

    OMP_NUM_THREADS=1 python bench/vico_reference_stop.py                   # the shipped toy model, CPU
    python bench/vico_reference_stop.py --pretrained-model models/sd15 --device cuda --size 512

Run from the repository root.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sd_model as sdm  # noqa: E402
import vico  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained-model", default="")
    p.add_argument("--device", default="")
    p.add_argument("--size", type=int, default=0, help="pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    model = sdm.load_model(a.pretrained_model, device=a.device)
    dev, f = model.device, model.vae.downsample_factor
    ids = vico.add_placeholders(model, ["S*"])
    v = vico.ViCo(model.unet, ["S*"], ids, model.text_encoder.token_embedding.weight[[model.tokenizer.token_id("dog")]]).to(dev)
    side = (a.size or model.cfg.image_size) // f
    x, r = torch.randn(2, 1, model.cfg.unet.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(dev)
    prompt = ["a photo of a S*"]
    tok = model.tokenize(prompt)
    cols, eot = vico.token_columns(tok, ids[0], "S*"), (tok == model.tokenizer.eos_id).int().argmax(-1)
    table = model.text_encoder.token_embedding.num_embeddings
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        times = []
        for _ in range(a.steps):
            sync()
            t0 = time.perf_counter()
            ctx = model.encode_prompt(prompt, extra=(v.text_rows(table), None)).context
            with v.install(model.unet):
                out, reg = v.denoise(model.unet, x, torch.tensor([500]), ctx, r[None], cols[None], eot)
                (out.float().square().mean() + reg).backward()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2], out.detach()

    keep = vico.ViCo._drop_reference_rows
    for i in range(a.rounds):
        fast, o1 = run()
        vico.ViCo._drop_reference_rows = lambda self, block, args: None  # the whole batch to the end
        full, o2 = run()
        vico.ViCo._drop_reference_rows = keep
        print(f"round {i + 1}: early stop {fast * 1000:.1f} ms, whole batch {full * 1000:.1f} ms a step, "
              f"ratio {fast / full:.3f}; max |eps difference| {(o1 - o2).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
