"""One training step of each method, ours against the closest diffusers training script, same weights.

    python bench/bench_train.py --resolution 256 --runs 3                      # CPU: SD1.5 size, slow
    python bench/bench_train.py --resolution 256 --runs 3 --no-cache-latents   # ours encodes every step too
    python bench/bench_train.py --methods lora --no-cache-latents --no-cache-text   # ... and runs the text encoder too
    python bench/bench_train.py --device cuda --mixed-precision bf16 --gradient-checkpointing

| ours | reference step (diffusers examples) |
|---|---|
| `vico.py train --no-visual-condition` (textual inversion) | `textual_inversion/textual_inversion.py` |
| `vico.py train` | none: ours only |
| `dco.py train --dco-beta 0` (DreamBooth-LoRA) | `dreambooth/train_dreambooth_lora.py` |
| `dco.py train` (DCO, beta 1000: one more frozen forward) | none: ours only |
| `dci_ico.py train --no-contexts` (manual template) | `custom_diffusion/train_custom_diffusion.py` |
| `dci_ico.py train` (ICO) | none: ours only |

The weights are the random SD1.5-size diffusers folder every side-by-side script shares (built on first use).
Ours is the real `train` of each method file (its VAE latents cached unless --no-cache-latents; DCO's frozen
prompts encoded once unless --no-cache-text), timed between optimizer steps (a wrapper around
sd_model.train_loop's after_step); the reference is that script's per-step body, written out here
because the example scripts are not importable: VAE encode, noise, text encoder, UNet, MSE,
backward, clipping where the script clips, AdamW, and the script's own bookkeeping (restoring the
frozen embedding rows, zeroing other rows' gradients). Both use the same images, batch size,
resolution, precision and checkpointing. Each run is its own subprocess; the median step after
--warmup steps is reported, with peak memory (GPU: max allocated; CPU: peak RSS).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (bench/, beside this script)
PAIRS = {"ti": "textual_inversion", "vico": None, "lora": "train_dreambooth_lora", "dco": None,
         "template": "train_custom_diffusion", "ico": None}


def write_images(folder: Path, res: int, n: int = 4) -> Path:
    """A toy concept's reference images, resized to the benchmark resolution."""
    import toy_world as tw
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, img) in enumerate(list(tw.concept_references(tw.CONCEPTS[0]))[:n]):
        Image.fromarray(img).resize((res, res), Image.BICUBIC).save(folder / f"{i:02d}.png")
    return folder


def ours(name: str, a, images: Path, out: Path, sync) -> list[float]:
    import dci_ico
    import dco
    import vico

    stamps = common.clock_train_steps(sync)
    flags = dict(pretrained_model=a.work, output_dir=str(out), max_train_steps=a.warmup + a.runs + 1, resolution=a.resolution,
                  train_batch_size=a.batch, gradient_accumulation_steps=1, mixed_precision=a.mixed_precision,
                  gradient_checkpointing=a.gradient_checkpointing, checkpointing_steps=0, device=a.device, overwrite=True,
                  cache_latents=not a.no_cache_latents)
    if name in ("ti", "vico"):
        vico.train(vico.ViCoArgs(images=[str(images)], init_word=["star"], templates=["a photo of a {}"],
                                 visual_condition=name == "vico", **flags))
    elif name in ("lora", "dco"):
        dco.train(dco.DCOArgs(images=str(images), instance_prompt="a photo of sks star", rank=a.rank,
                              dco_beta=1000.0 if name == "dco" else 0.0, cache_text_embeddings=not a.no_cache_text, **flags))
    else:
        dci_ico.train(dci_ico.ICOArgs(images=str(images), class_word="star", contexts=name == "ico", **flags))
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]


def reference(name: str, a, images: Path, sync) -> list[float]:
    """The per-step body of the diffusers example script for `name` (see the table above)."""
    import diffusers
    import torch
    import torch.nn.functional as F
    from transformers import CLIPTextModel, CLIPTokenizer

    import sd_model as sdm

    dev, wdt = torch.device(a.device), common.dtype({"no": "fp32"}.get(a.mixed_precision, a.mixed_precision))
    unet = diffusers.UNet2DConditionModel.from_pretrained(a.work, subfolder="unet")
    vae = diffusers.AutoencoderKL.from_pretrained(a.work, subfolder="vae")
    text = CLIPTextModel.from_pretrained(a.work, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(a.work, subfolder="tokenizer")
    sched = diffusers.DDPMScheduler.from_pretrained(a.work, subfolder="scheduler")
    for m in (unet, vae, text):
        m.requires_grad_(False)
    pix = torch.stack([sdm.image_to_tensor(img) for _, img in sdm.load_image_folder(images)])
    if name == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
        prompt, text_grad = "a photo of sks star", False
    else:  # a new token initialised from "star", its embedding row trained (both scripts)
        token = "<cat-toy>" if name == "ti" else "<new1>"
        tok.add_tokens(token)
        text.resize_token_embeddings(len(tok))
        emb = text.get_input_embeddings().weight
        new_id = tok.convert_tokens_to_ids(token)
        with torch.no_grad():
            emb[new_id] = emb[tok.encode("star", add_special_tokens=False)[0]]
        emb.requires_grad_(True)
        prompt, text_grad = f"a photo of a {token}" if name == "ti" else f"photo of a {token} star", True
        keep = torch.arange(len(tok)) != new_id
        original = emb.detach().clone()
    if name == "template":
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        procs, sd, ch = {}, unet.state_dict(), unet.config.block_out_channels
        for n in unet.attn_processors:
            hidden = ch[-1] if n.startswith("mid_block") else (ch[::-1] if n.startswith("up") else ch)[int(n.split(".")[1])]
            if n.endswith("attn1.processor"):
                procs[n] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=hidden)
            else:
                procs[n] = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden,
                                                           cross_attention_dim=unet.config.cross_attention_dim)
                base = n[: -len("processor")]
                procs[n].load_state_dict({"to_k_custom_diffusion.weight": sd[base + "to_k.weight"],
                                          "to_v_custom_diffusion.weight": sd[base + "to_v.weight"]})
        unet.set_attn_processor(procs)
    unet.to(dev, wdt), vae.to(dev, wdt), text.to(dev, wdt if not text_grad else torch.float32)
    trainable = [p for m in (unet, text) for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # trainables in fp32 (cast_training_params / the scripts' upcast)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if text_grad:
            text.gradient_checkpointing_enable()
    unet.train(), text.train(text_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = tok([prompt] * a.batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
    amp = torch.autocast(dev.type, wdt, enabled=a.mixed_precision != "no")
    times, g = [], torch.Generator().manual_seed(0)
    for _ in range(a.warmup + a.runs):
        t0 = time.perf_counter()
        x = pix[torch.randint(0, len(pix), (a.batch,), generator=g)].to(dev, wdt)
        with amp:
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,), device=dev)
            noisy = sched.add_noise(latents, noise, t)
            with torch.set_grad_enabled(text_grad):
                context = text(ids)[0]
            loss = F.mse_loss(unet(noisy, t, context.to(wdt)).sample.float(), noise.float())
        loss.backward()
        if name == "template":
            emb.grad[keep] = 0
        if name != "ti":
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name == "ti":
            with torch.no_grad():
                emb[keep] = original[keep]
        loss.item()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run_one(a) -> dict:
    import torch

    torch.set_num_threads(a.threads) if a.threads else None
    sync = common.sync_for(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "images", a.resolution)
        if a.impl == "ours":
            steps = ours(a.method, a, images, Path(tmp) / "out", sync)
        else:
            steps = reference(a.method, a, images, sync)
    steps = steps[a.warmup :]
    return {"median_s": statistics.median(steps), "times": steps, "peak_gib": common.peak_gib(a.device),
            "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_work_arg(p)
    p.add_argument("--methods", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank for lora/dco (train_dreambooth_lora.py's default)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate the two processes this many times (paired ratios)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--no-cache-latents", action="store_true",
                   help="ours encodes the images every step, as the diffusers scripts do (by default it samples cached posteriors)")
    p.add_argument("--no-cache-text", action="store_true",
                   help="lora/dco run the text encoder every step, as the diffusers script without --pre_compute_text_embeddings")
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.impl:
        print(json.dumps(run_one(a)))
        return
    common.ensure_random_sd15(a.work)
    mem = "GPU max allocated" if a.device.startswith("cuda") else "peak RSS"
    print(f"SD1.5 training step, {a.resolution}x{a.resolution}, batch {a.batch}, {a.device}, mixed precision {a.mixed_precision}"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}, median of {a.runs} after {a.warmup} warm-up, "
          f"{a.rounds} round(s)")
    print(f"| method | ours (s) | ours {mem} (GiB) | diffusers script | diffusers (s) | diffusers {mem} (GiB) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in a.methods:
        impls = ("ours", "diffusers") if PAIRS[name] else ("ours",)
        res, ratios = common.compare(__file__, {impl: ["--impl", impl, "--method", name] for impl in impls}, a.rounds)
        o, d = res["ours"], res.get("diffusers")
        ref = f"{PAIRS[name]} | {d['median_s']:.3f} | {d['peak_gib']:.2f} | {common.ratio_text(ratios)}" if d else "- | - | - | -"
        print(f"| {name} | {o['median_s']:.3f} | {o['peak_gib']:.2f} | {ref} |", flush=True)


if __name__ == "__main__":
    main()
