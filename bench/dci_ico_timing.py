"""Cost of ICO and DCI against their plain counterparts, on a small model (CPU-friendly).

Training: seconds per optimizer step of ICO (per-image contexts P^i, S^i) against the manual-template
baseline (`--no-contexts`: Custom Diffusion's K/V + token rows on "photo of a V noun"), both through
`dci_ico.train` with the same batch. A step is timed as (T(n0 + n) - T(n0)) / n over two runs of
n0 and n0 + n steps, so model loading, VAE encoding and the final save cancel out.
Sampling: seconds per image of plain CFG of the fine-tuned model (`--no-dci`) against DCI at the same
number of steps: tau = 0.3 with the shared unconditional row (3 UNet rows a sample in the window,
2 outside) and with separate ones (4 rows), and tau = 1 (the window covers every step); also the base
model's own CFG sampling without the ICO hooks. Each number is the minimum over --repeats runs.

    OMP_NUM_THREADS=1 python bench/dci_ico_timing.py                       # toy-shaped random model, 64 px
    python bench/dci_ico_timing.py --config sd15 --device cuda --weights-dtype bf16 --mixed-precision bf16 \
        --gradient-checkpointing --batch 1 --sample-steps 50                 # SD1.5 shapes at 512 px, on a GPU

Run from the repository root. Weights are random: timing does not depend on them.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dci_ico as di  # noqa: E402
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402

CONFIGS = {"toy": tw.TOY_SD, "tiny": sdm.TINY, "sd15": sdm.SD15}


def build(config, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = sdm.StableDiffusion(CONFIGS[config])
    return model.to(dtype=dtype).eval().requires_grad_(False)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_seconds(model, images, out, steps, contexts, a):
    args = di.ICOArgs(images=str(images), class_word="star", contexts=contexts, output_dir=str(out), overwrite=True,
                      max_train_steps=steps, train_batch_size=a.batch, gradient_accumulation_steps=1, checkpointing_steps=0,
                      mixed_precision=a.mixed_precision, gradient_checkpointing=a.gradient_checkpointing, device=a.device)
    sync(a.device)
    t0 = time.perf_counter()
    di.train(args, model)
    sync(a.device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="toy", choices=sorted(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", default="no", help="training autocast: no | fp16 | bf16")
    p.add_argument("--weights-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="the frozen model's weights (trainables stay fp32); with fp16 use --mixed-precision fp16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--batch", type=int, default=2, help="training batch (the card: 2) and sampling prompts")
    p.add_argument("--train-steps", type=int, default=15, help="n: steps timed (after n0 = 2 steps of overhead)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="also write the numbers as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = build(a.config, a.device, sdm.DTYPES[a.weights_dtype])
    res, n0 = {}, 2
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "refs"
        images.mkdir()
        size = model.cfg.image_size
        for i, (_, img) in enumerate(tw.concept_references(tw.CONCEPTS[0], n=5, size=size)):
            sdm.save_image(sdm.tensor_to_images(torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1)[0],
                           images / f"{i:02d}.png")
        train_seconds(model, images, Path(tmp) / "warm", n0, True, a)  # first-call costs (allocator, caches) out
        for name, contexts in (("template (Custom Diffusion) train step", False), ("ICO train step", True)):
            per = []
            for r in range(a.repeats):
                if a.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                short = train_seconds(model, images, Path(tmp) / f"s{r}", n0, contexts, a)
                long = train_seconds(model, images, Path(tmp) / f"l{r}", n0 + a.train_steps, contexts, a)
                per.append((long - short) / a.train_steps)
            res[name] = {"s": min(per), "all": per}
            if a.device.startswith("cuda"):
                res[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        ico = di.ICO.load(Path(tmp) / "l0", model)

    prompts = [f"a {ico.phrase} on the snow", f"a {ico.phrase} next to a small blue circle"] * a.batch
    prompts = prompts[:a.batch]
    runs = {"base model CFG (no ICO hooks)": None, "fine-tuned CFG (--no-dci)": dict(dci=False),
            "DCI tau 0.3, shared uncond": dict(tau=0.3), "DCI tau 0.3, separate uncond": dict(tau=0.3, share_guidance=False),
            "DCI tau 1.0, shared uncond": dict(tau=1.0)}
    for name, kw in runs.items():
        times = []
        for r in range(a.repeats + 1):  # the first run warms up
            g = torch.Generator(a.device).manual_seed(r)
            steps = 2 if r == 0 else a.sample_steps
            sync(a.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                if kw is None:
                    base = [q.replace(ico.phrase, ico.class_word) for q in prompts]  # the base model lacks V
                    model.sample(base, steps=steps, guidance_scale=6.0, eta=1.0, generator=g, progress=False)
                else:
                    di.sample(model, ico, prompts, aux_noun="square", steps=steps, gamma=1.0, generator=g, progress=False, **kw)
            sync(a.device)
            if r:
                times.append((time.perf_counter() - t0) / len(prompts))
        res[name] = {"s": min(times), "all": times}
    plain_train, plain_sample = res["template (Custom Diffusion) train step"]["s"], res["fine-tuned CFG (--no-dci)"]["s"]
    head = (f"config {a.config} ({model.cfg.image_size} px), device {a.device}, threads {a.threads}, batch {a.batch}, "
            f"train steps timed {a.train_steps}, sampling DDIM eta 1 scale 6 {a.sample_steps} steps, min of {a.repeats}")
    lines = [head, "", "| what | seconds | relative |", "|---|---|---|"]
    for name, r in res.items():
        ref = plain_train if "train" in name else plain_sample
        unit = "s/step" if "train" in name else "s/image"
        mem = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        lines.append(f"| {name} | {r['s']:.4f} {unit}{mem} | {r['s'] / ref:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": res, "table": text}, indent=1))


if __name__ == "__main__":
    main()
