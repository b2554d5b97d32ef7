"""Which caption words does the toy UNet use? And does a zero-terminal-SNR schedule make it use more?

`gaps`: for 128 fresh single-object scenes, the x0 error of the denoiser (in latent space, so eps and v
models compare) given the scene's full caption, and how much it grows when one attribute of the caption is
swapped for another value (shape, position, colour, size, background) or the caption is empty, at fixed t
and noise. A word the model ignores costs nothing when swapped. At t = 999 on a zero-terminal-SNR schedule the
input is pure noise, so the caption is all the model has: there a position the model could place costs
as much as a wrong object position does.

`leak`: SD's schedule ends at sqrt(a_999) = 0.068, not 0, so in training x_T still shows roughly where the
object is, and sampling (from pure noise) never has that. Starts DDIM from pure noise, and from the noised
latent of the same scene moved elsewhere, and asks the probes where the object landed.

`attention`: where the UNet's cross-attention looks. For 64 fresh scenes at one t, the probability mass
each kind of caption token receives (averaged over heads, pixels and the 16 cross-attention layers; the
uniform share of one token is 1/77 = 0.013), and per layer the entropy of the attention over the 77
tokens as a fraction of its largest value log 77 (1 = uniform: the layer reads the context's mean).

`clip`: does the toy CLIP itself tell a scene's caption from the same caption with one attribute swapped?
The fraction of 256 fresh scenes whose image scores higher with its own caption (chance 0.5), and how far
the swap reaches into the text encoder's output (what the UNet reads): mean per-token change, cosine of
the pooled state; and the image side: the cosine of the image embedding when the scene is drawn with the
same change. `--clip DIR` reads a `train-clip` output folder (or a model folder).

`finetune`: the shipped toy UNet (its EMA weights) trained N more steps from the same cached latents and
captions as `toy_world.py train-unet`, either as before (eps, SD's schedule: `--schedule eps`) or with
v-prediction on the zero-terminal-SNR schedule with trailing timesteps (Lin et al. 2024, Sec. 3: `v0snr`);
lr 1e-4 after 100 warm-up steps (`--qk-lr-mult M`: M times that for the cross-attention queries and keys),
batch 32, EMA 0.998 from the shipped weights. `--clip DIR` swaps in another toy CLIP's text tower first
(the UNet then learns to read its states). Without train-unet's latent cache, the same posterior moments
are encoded once by the shipped VAE (5 min on 2 cores). Writes a model folder every
500 steps (`eval-base --model` and `gaps --model` read it).

    python bench/toy_caption_use.py gaps                                    # the shipped model
    python bench/toy_caption_use.py leak                                    # does x_T decide the position?
    python bench/toy_caption_use.py attention --model outputs/toy/unet/checkpoint-2400   # how selective?
    python bench/toy_caption_use.py clip --clip outputs/toy-hn/clip           # a toy CLIP's attribute binding
    python bench/toy_caption_use.py finetune --schedule v0snr --steps 2000 --out outputs/toy/ft-v0snr
    python bench/toy_caption_use.py gaps --model outputs/toy/ft-v0snr/step-2000
"""

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402

SWAPS = ("shape", "position", "color", "size", "background", "empty")
TS = (50, 200, 400, 600, 800, 950, 999)
V0SNR = sdm.ScheduleConfig(prediction="v", rescale_betas_zero_snr=True, timestep_spacing="trailing")


def caption(scene, **change):
    """eval-base's caption ("a small red star on the snow, in the top left") with attributes changed."""
    o, bg = scene.objects[0], change.pop("background", scene.background)
    o = tw.Obj(**{**{k: getattr(o, k) for k in ("shape", "color", "pattern", "color2", "size", "position", "cx", "cy", "r")}, **change})
    return f"{tw.object_phrase(o, o.shape)} {tw.BG_PHRASE[bg]}, {tw.POS_PHRASE[o.position]}"


def change_of(rng, scene, what):
    """Another value the world allows for `what` (a colour never equal to the second one); None for "empty"."""
    o, other = scene.objects[0], lambda seq, cur: tw._pick(rng, [x for x in seq if x != cur])
    change = {"shape": lambda: {"shape": other(tw.SHAPES, o.shape)},
              "position": lambda: {"position": other(tw.POSITIONS, o.position)},
              "color": lambda: {"color": other([c for c in tw.COLORS if c != o.color2], o.color)},
              "size": lambda: {"size": other(list(tw.SIZES), o.size)},
              "background": lambda: {"background": other(tw.BACKGROUNDS, scene.background)},
              "empty": None}[what]
    return None if change is None else change()


def swapped(rng, scene, what):
    """The caption with `what` changed (the empty caption for "empty")."""
    change = change_of(rng, scene, what)
    return "" if change is None else caption(scene, **change)


def changed_scene(rng, scene, change):
    """The scene drawn with the change: a new position or size is placed anew in its cell (rng)."""
    o, bg = scene.objects[0], change.get("background", scene.background)
    o = replace(o, **{k: v for k, v in change.items() if k != "background"})
    if "position" in change or "size" in change:
        o = replace(o, **dict(zip(("cx", "cy", "r"), tw.place(rng, o.size, o.position))))
    return replace(scene, background=bg, objects=(o,))


@torch.no_grad()
def gaps(model_dir=None, n=128, seed=5):
    m = sdm.StableDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    scenes = [tw.sample_scene(rng, "pretrain", p_two=0.0) for _ in range(n)]
    prompts = {"true": [caption(s) for s in scenes], **{w: [swapped(rng, s, w) for s in scenes] for w in SWAPS}}
    x = torch.stack([torch.from_numpy(np.array(tw.render(s)[0])).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    z0 = m.encode_images(x, sample=False)
    ctx = {k: m.encode_prompt(v).context for k, v in prompts.items()}
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for t in tqdm(TS, desc="t"):
        tt = torch.full((n,), t)
        zt = m.schedule.q_sample(z0, tt, noise)
        err = {k: (m.schedule.eps_x0(m.unet(zt, tt, c), zt, tt)[1] - z0).square().mean().item() for k, c in ctx.items()}
        rows.append({"t": t, "x0_mse": err["true"], **{w: err[w] - err["true"] for w in SWAPS}})
    s = m.cfg.schedule
    print(f"{model_dir or 'shipped toy model'}: {s.prediction}, zero-terminal SNR {s.rescale_betas_zero_snr}, {n} scenes\n")
    # what the swap does to the text encoder's output: per-token change, and the pooled (<|endoftext|>) state
    eot = lambda k: ctx[k][torch.arange(n), (m.tokenize(prompts[k]) == m.tokenizer.eos_id).int().argmax(1)]
    print(f"context: token norm {ctx['true'].norm(dim=-1).mean():.2f}; per swap, mean / largest per-token change, "
          "cosine of the <|endoftext|> state")
    for w in SWAPS:
        d = (ctx[w] - ctx["true"]).norm(dim=-1)
        print(f"  {w:>10}: {d.mean():.2f} / {d.max(1).values.mean():.2f}, cos {F.cosine_similarity(eot(w), eot('true')).mean():.3f}")
    print()
    print("| t | x0 MSE, true caption | " + " | ".join(f"+ {w}" for w in SWAPS) + " |\n" + "|---" * (len(SWAPS) + 2) + "|")
    for r in rows:
        print(f"| {r['t']} | {r['x0_mse']:.4f} | " + " | ".join(f"{r[w] * 1e3:+.2f}" for w in SWAPS) + " |")
    print("\n(the swapped columns: growth of the x0 MSE, x 1e-3)")
    return rows


@torch.no_grad()
def attention(model_dir=None, n=64, t=600, seed=2):
    m = sdm.StableDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    scenes = [tw.sample_scene(rng, "pretrain", p_two=0.0) for _ in range(n)]
    prompts = [caption(s) for s in scenes]
    ids, ctx = m.tokenize(prompts), m.encode_prompt(prompts).context
    z0 = m.encode_images(torch.stack([torch.from_numpy(np.array(tw.render(s)[0])).permute(2, 0, 1).float() / 127.5 - 1
                                      for s in scenes]), sample=False)
    probs = {}

    def record(attn, q, k, v):
        out, p = sdm.attention_with_probs(attn, q, k, v)
        probs[attn.name] = p.mean(1)  # b, pixels, 77 (averaged over heads)
        return out
    with sdm.hooked(m.unet, processor=record):
        tt = torch.full((n,), t)
        m.unet(m.schedule.q_sample(z0, tt, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))), tt, ctx)
    # the kind of every caption token: the scene's own attribute words, the padding after <|endoftext|>, the rest
    piece = lambda w: m.tokenize([w])[0, 1 : 1 + int((m.tokenize([w])[0, 1:] != m.tokenizer.eos_id).sum())].tolist()
    kinds = []
    for s, row in zip(scenes, ids.tolist()):
        o, eos = s.objects[0], row.index(m.tokenizer.eos_id)
        words = {"shape": [o.shape], "colour": [o.color], "size": [o.size], "background": [tw.BG_PHRASE[s.background].split()[-1]],
                 "position": [w for w in tw.POS_PHRASE[o.position].split()[1:] if w != "the"]}
        kind = {tid: k for k, ws in words.items() for w in ws for tid in piece(w)}
        kinds.append([kind.get(tid, "other words") if 0 < i < eos else "<|startoftext|>" if i == 0 else
                      "<|endoftext|>" if i == eos else "padding" for i, tid in enumerate(row)])
    mass = torch.stack([p.mean(1) for p in probs.values()]).mean(0)  # b, 77: the mean over pixels, then layers
    print(f"{model_dir or 'shipped toy model'}, t = {t}, {n} scenes: attention mass per token kind (uniform: 0.013 a token)")
    print("| token kind | mass per token | total |\n|---|---|---|")
    kinds_mass, layers = {}, {}
    for k in ("shape", "position", "colour", "size", "background", "other words", "<|startoftext|>", "<|endoftext|>", "padding"):
        per = [mass[b, i].item() for b in range(n) for i, kk in enumerate(kinds[b]) if kk == k]
        kinds_mass[k] = (float(np.mean(per)), float(np.sum(per) / n))
        print(f"| {k} | {kinds_mass[k][0]:.4f} | {kinds_mass[k][1]:.3f} |")
    print("\n| layer | entropy / log 77 | largest probability |\n|---|---|---|")
    for name, p in probs.items():
        ent = -(p.clamp_min(1e-12).log() * p).sum(-1).mean() / np.log(p.shape[-1])
        layers[name] = (ent.item(), p.max(-1).values.mean().item())
        print(f"| {name.removesuffix('.transformer_blocks.0.attn2')} | {layers[name][0]:.3f} | {layers[name][1]:.3f} |")
    return kinds_mass, layers


@torch.no_grad()
def clip_binding(clip_dir=None, n=256, seed=5):
    text, vision = tw._clip_towers(clip_dir or tw.TOY_DIR)
    text.eval(), vision.eval()
    tok = sdm.CLIPTokenizer()
    rng, place_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    scenes = [tw.sample_scene(rng, "pretrain", p_two=0.0) for _ in range(n)]
    pixels = lambda ss: torch.stack([torch.from_numpy(np.array(tw.render(s)[0])).permute(2, 0, 1).float() / 127.5 - 1 for s in ss])
    embed = lambda ss: F.normalize(vision(vision.preprocess(pixels(ss)))[1], dim=-1)
    v = embed(scenes)
    ids = tok([caption(s) for s in scenes])
    ctx, pooled = text(ids)[:2]
    print(f"{clip_dir or 'shipped toy CLIP'}, {n} scenes: | swap | image prefers its caption | mean per-token change "
          f"(token norm {ctx.norm(dim=-1).mean():.2f}) | cosine of the pooled state | cosine of the image embedding, "
          "the scene drawn with the change |\n|---|---|---|---|---|")
    rows = {}
    for w in SWAPS[:-1]:
        changes = [change_of(rng, s, w) for s in scenes]
        c2, p2 = text(tok([caption(s, **c) for s, c in zip(scenes, changes)]))[:2]
        win = ((v * F.normalize(pooled, dim=-1)).sum(-1) > (v * F.normalize(p2, dim=-1)).sum(-1)).float().mean()
        v2 = embed([changed_scene(place_rng, s, c) for s, c in zip(scenes, changes)])
        rows[w] = dict(prefers_own=win.item(), token_change=(c2 - ctx).norm(dim=-1).mean().item(),
                       pooled_cosine=F.cosine_similarity(p2, pooled).mean().item(), image_cosine=(v * v2).sum(-1).mean().item())
        print(f"| {w} | {rows[w]['prefers_own']:.3f} | {rows[w]['token_change']:.2f} | {rows[w]['pooled_cosine']:.3f} "
              f"| {rows[w]['image_cosine']:.3f} |")
    return rows


@torch.no_grad()
def leak(model_dir=None, n=96, steps=25, seed=11):
    """Where does the object land: where the prompt says, or where x_T says? DDIM from pure noise, and from
    q_sample(z0, T) of the same scene drawn at another position; the probes read the position."""
    m = sdm.StableDiffusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    probes, _ = tw.load_probes(tw.PROBES_PATH)
    rng = np.random.default_rng(seed)
    scenes = [tw.sample_scene(rng, "pretrain", p_two=0.0) for _ in range(n)]
    moved = []
    for s in scenes:
        o = s.objects[0]
        pos = tw._pick(rng, [p for p in tw.POSITIONS if p != o.position])
        moved.append(tw.Scene(s.background, (tw.Obj(o.shape, o.color, o.pattern, o.color2, o.size, pos, *tw.place(rng, o.size, pos)),),
                              s.texture_seed))
    z0 = m.encode_images(torch.stack([torch.from_numpy(np.array(tw.render(s)[0])).permute(2, 0, 1).float() / 127.5 - 1
                                      for s in moved]), sample=False)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    T = m.schedule.timesteps(steps)[0]
    print(f"first timestep {T}, sqrt(a_T) = {m.schedule.alphas_cumprod[T].sqrt().item():.4f}; chance 0.111")
    for name, x_T in (("pure noise", noise), (f"q_sample(moved scene, {T})", m.schedule.q_sample(z0, torch.full((n,), T), noise))):
        images = m.sample([caption(s) for s in scenes], steps=steps, guidance_scale=5.0, latents=x_T, progress=False)
        pred = tw.predict(probes, [np.asarray(im) for im in sdm.tensor_to_images(images)])
        to = lambda ss: np.mean([p["position"] == s.objects[0].position for p, s in zip(pred, ss)])
        print(f"  from {name}: the prompt's position {to(scenes):.3f}, the moved scene's {to(moved):.3f}")


def finetune(out, schedule="v0snr", steps=2000, data="outputs/toy/data", latents="outputs/toy/latents-32000.safetensors",
             lr=1e-4, batch=32, ema_decay=0.998, seed=1, qk_lr_mult=1.0, clip_dir=None):
    m = sdm.StableDiffusion.from_pretrained(None, dtype=torch.float32).eval()
    vision = sdm.StableDiffusion.load_image_encoder()
    if clip_dir:  # another toy CLIP's towers: the UNet learns to read the new text encoder's states
        text, vision = tw._clip_towers(clip_dir)
        m.text_encoder.load_state_dict(text.state_dict(), strict=True)
    cfg = sdm.replace(m.cfg, schedule=V0SNR if schedule == "v0snr" else m.cfg.schedule)
    arr, captions = tw.load_pretrain_data(data)
    # train-unet's cache, keyed by the VAE encoder and the images: encoded again by the shipped VAE when it is another's
    moments = tw.cached_latents(latents, m.vae, arr, min(tw.UnetArgs.latent_images, len(arr)))
    n, sched, unet, text = len(moments), sdm.NoiseSchedule(cfg.schedule), m.unet.train().requires_grad_(True), m.text_encoder
    ids = sdm.CLIPTokenizer()(captions[:n] + [""])
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    is_qk = lambda name: ".attn2.to_q." in name or ".attn2.to_k." in name  # cross-attention queries and keys
    qk = [p for name, p in unet.named_parameters() if is_qk(name)]
    rest = [p for name, p in unet.named_parameters() if not is_qk(name)]
    opt = torch.optim.AdamW([{"params": rest, "mult": 1.0}, {"params": qk, "mult": qk_lr_mult}], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(1, steps + 1), desc=f"finetune ({schedule})")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * group["mult"] * min(1.0, step / 100)
        idx = torch.randint(0, n, (batch,), generator=g)
        drop = torch.rand(batch, generator=g) < 0.1  # the empty caption, as in train-unet
        with torch.no_grad():
            context = text(ids[torch.where(drop, n, idx)])[0]
        d = sdm.DiagonalGaussian(moments[idx].float())
        z0 = (d.mean + d.std * torch.randn(d.mean.shape, generator=g)) * m.cfg.vae.scale_factor
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        loss = F.mse_loss(unet(sched.q_sample(z0, t, noise), t, context), sched.target(z0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 500 == 0 or step == steps:
            parts = {"unet": ema, **{p: getattr(m, p).state_dict() for p in ("vae", "text_encoder")},
                     "image_encoder": vision.state_dict()}
            tw.save_toy(os.path.join(out, f"step-{step}"), parts, cfg)
            with open(os.path.join(out, f"step-{step}", "finetune.json"), "w") as f:
                json.dump({"schedule": schedule, "qk_lr_mult": qk_lr_mult, "clip": clip_dir, "steps": step, "lr": lr, "batch": batch, "ema": ema_decay, "seed": seed}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("gaps", help="x0 error with the true caption and with one attribute swapped")
    c.add_argument("--model", default=None, help="a model folder (default: the shipped toy model)")
    c.add_argument("--n", type=int, default=128)
    c.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("attention", help="how much cross-attention each kind of caption word receives")
    c.add_argument("--model", default=None)
    c.add_argument("--t", type=int, default=600)
    c.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("clip", help="does the toy CLIP tell a caption from one with an attribute swapped?")
    c.add_argument("--clip", default=None, help="a train-clip output folder (default: the shipped toy model's towers)")
    c.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("leak", help="does the object land where the prompt or where x_T says?")
    c.add_argument("--model", default=None)
    c.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("finetune", help="the shipped UNet, N more steps under a schedule")
    c.add_argument("--out", required=True)
    c.add_argument("--schedule", choices=["eps", "v0snr"], default="v0snr")
    c.add_argument("--steps", type=int, default=2000)
    c.add_argument("--data", default="outputs/toy/data")
    c.add_argument("--latents", default="outputs/toy/latents-32000.safetensors")
    c.add_argument("--qk-lr-mult", type=float, default=1.0, help="learning rate x M for the cross-attention queries and keys")
    c.add_argument("--clip", default=None, help="a train-clip output folder whose text tower replaces the shipped one")
    c.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.cmd == "gaps":
        gaps(a.model, a.n)
    elif a.cmd == "leak":
        leak(a.model)
    elif a.cmd == "clip":
        clip_binding(a.clip)
    elif a.cmd == "attention":
        attention(a.model, t=a.t)
    else:
        finetune(a.out, a.schedule, a.steps, a.data, a.latents, qk_lr_mult=a.qk_lr_mult, clip_dir=a.clip)


if __name__ == "__main__":
    main()
