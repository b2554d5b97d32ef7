"""DCO vs DreamBooth-LoRA on the toy world: the paper's concept-fidelity / prompt-fidelity (Pareto) comparison.

For every toy concept: train DCO (beta 1000) and DreamBooth-LoRA (beta 0) with the same steps, captions and
learned token (comprehensive captions + TI, as in the paper's comparisons), sample every eval prompt with
the fine-tuned model's plain CFG and with consistency guidance at several w_cons, score with the toy
world's probes. Then a merge: each concept LoRA + a "style-like" LoRA trained on ONE image of another
object on a background that is one of the concept's eval scenes; the merged adapters are sampled on that
scene's prompt, and both fidelities are reported (concept identity kept / background = the "style").

    OMP_NUM_THREADS=1 python bench/dco_toy.py --out outputs/dco_toy            # full run
    OMP_NUM_THREADS=1 python bench/dco_toy.py --out /tmp/b --model /tmp/toy-random \
        --concepts candy_star --steps 4 --sample-steps 2 --per-prompt 1 --w-cons 3             # smoke test

Run from the repository root (it imports dco, sd_model and toy_world). Writes OUT/results.md and .json.
On 2 cores, run two shards into the same OUT (concepts whose merge scene is the same background in one
shard: they share that style LoRA), e.g. --concepts candy_star hazard_bolt stripy_moon speckled_hexagon
in one process and the other four in another: each finished concept leaves OUT/parts/<concept>.json (its
manifest rows and timings), and every run scores the union of the parts it finds; `--score-only` just
re-scores them.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dco  # noqa: E402
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402


def caption(obj, bg, noun):
    """A comprehensive caption in the toy world's words: size, background, position (DCO Sec. 3)."""
    return f"a {obj.size} {noun} {tw.BG_PHRASE[bg]}, {tw.POS_PHRASE[obj.position]}"


def write_concept(folder, concept, token):
    folder.mkdir(parents=True, exist_ok=True)
    images, prompts, bases = [], [], []
    for i, (scene, img) in enumerate(tw.concept_references(concept)):
        name = f"{i:02d}.png"
        sdm.save_image(sdm.tensor_to_images(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1)[0], folder / name)
        images.append(name)
        prompts.append(caption(scene.objects[0], scene.background, token))
        bases.append(caption(scene.objects[0], scene.background, concept.class_word))
    cfg = {"images": images, "prompts": prompts, "base_prompts": bases, "inserting_tokens": [token],
           "initializer_tokens": [concept.init_word()]}
    (folder / "captions.json").write_text(json.dumps(cfg, indent=1))


def write_style(folder, bg, seed=0):
    """One image of a plain blue circle (or red square) on `bg`: the style-like LoRA's only example."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, tw.BACKGROUNDS.index(bg)))
    shape, color = ("circle", "blue") if bg not in ("water", "sky", "night") else ("square", "red")
    scene = tw.scene_for(tw.Concept("style", shape, shape, color), {"background": bg, "size": "medium"}, rng)
    sdm.save_image(sdm.tensor_to_images(torch.from_numpy(tw.render(scene)[0]).permute(2, 0, 1)[None].float() / 127.5 - 1)[0],
                   folder / "00.png")
    o = scene.objects[0]
    (folder / "captions.json").write_text(json.dumps({"images": ["00.png"],
                                                      "prompts": [f"a {o.size} {color} {shape} {tw.BG_PHRASE[bg]}"]}))


def train(a, data, out, beta, rank, steps, lr):
    args = dco.DCOArgs(pretrained_model=a.model, images=str(data), captions=str(data / "captions.json"), output_dir=str(out),
                       rank=rank, dco_beta=beta, max_train_steps=steps, learning_rate=lr, text_encoder_lr=a.ti_lr,
                       checkpointing_steps=0, seed=a.seed, overwrite=True)
    t0 = time.time()
    dco.train(args)
    return (time.time() - t0) / steps


@torch.no_grad()
def generate(model, lora_dirs, prompts, guidance, w_cons, a, seed):
    model.tokenizer = sdm.CLIPTokenizer()  # each run adds its own token again
    loras = [dco.load_lora(d, model.unet, f"l{i}") for i, d in enumerate(lora_dirs)]
    emb = [Path(d) / "learned_embeds.safetensors" for d in lora_dirs if (Path(d) / "learned_embeds.safetensors").exists()]
    tokens = dco.LearnedTokens.load(emb[0], model) if emb else None
    g = torch.Generator().manual_seed(seed)
    with dco.install(model.unet, *loras):
        x = dco.sample(model, loras, prompts, tokens=tokens, guidance=guidance, w_text=a.w_text, w_cons=w_cons,
                       steps=a.sample_steps, generator=g, progress=False)
    return sdm.tensor_to_images(x)


def hypervolume(points):
    """Area dominated by (prompt fidelity, concept fidelity) points above (0, 0): one number per frontier."""
    pts, area, best = sorted(points, key=lambda p: -p[0]), 0.0, 0.0
    for x, y in pts:
        if y > best:
            area += x * (y - best)
            best = y
    return area


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/dco_toy")
    p.add_argument("--model", default="", help="base model ('' = the toy model, assets/toy/sd)")
    p.add_argument("--concepts", nargs="+", default=[c.id for c in tw.CONCEPTS])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ti-lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=1000.0)
    p.add_argument("--style-steps", type=int, default=200)
    p.add_argument("--style-rank", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--per-prompt", type=int, default=2)
    p.add_argument("--w-text", type=float, default=7.5)
    p.add_argument("--w-cons", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--score-only", action="store_true", help="score the finished concepts in OUT/parts, train nothing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    model = sdm.load_model(a.model) if not a.score_only else None
    t_start = time.time()
    settings = [("cfg", 0.0)] + [("consistency", w) for w in a.w_cons]

    def emit(images, concept, prompt_ids, method, per_prompt=a.per_prompt):
        rows.extend(tw.save_generated(img_dir, images, concept.id, prompt_ids, method, per_prompt))

    for cid in a.concepts if not a.score_only else []:
        rows, timing = [], {}
        concept = tw.find_concept(cid)
        token = f"<{concept.id}>"
        data = out / "data" / concept.id
        write_concept(data, concept, token)
        ps = tw.eval_prompts(concept)
        prompts = [q["text"].format(token) for q in ps for _ in range(a.per_prompt)]
        pids = [q["id"] for q in ps for _ in range(a.per_prompt)]
        # the pretrained model on the class-word prompts: no personalization at all
        imgs = generate(model, [], [q["text"].format(concept.class_word) for q in ps for _ in range(a.per_prompt)], "cfg", 0, a, 1)
        emit(imgs, concept, pids, "pretrained")
        for method, beta in (("dco", a.beta), ("db", 0.0)):
            run = out / "runs" / f"{method}_{concept.id}"
            timing.setdefault(f"train_{method}_s_per_step", []).append(train(a, data, run, beta, a.rank, a.steps, a.lr))
            for guidance, w in settings:
                t0 = time.time()
                imgs = generate(model, [run], prompts, guidance, w, a, 1)
                timing.setdefault(f"sample_{guidance}_s_per_image", []).append((time.time() - t0) / len(prompts))
                emit(imgs, concept, pids, f"{method}-{'cfg' if guidance == 'cfg' else f'cons{w:g}'}")
        # merge: concept LoRA + a style-like LoRA on one image of the first eval background
        bg = tw.concept_backgrounds(concept)[1][0]
        style = out / "runs" / f"style_{bg}"
        if not (style / "pytorch_lora_weights.safetensors").exists():
            write_style(out / "data" / f"style_{bg}", bg)
            train(a, out / "data" / f"style_{bg}", style, a.beta, a.style_rank, a.style_steps, a.lr)
        q = next(q for q in ps if q["id"] == f"scene_{bg}")
        for method in ("dco", "db"):
            run = out / "runs" / f"{method}_{concept.id}"
            for tag, dirs in (("alone", [run]), ("merged", [run, style])):
                imgs = generate(model, dirs, [q["text"].format(token)] * (2 * a.per_prompt), "consistency", 3.0, a, 2)
                emit(imgs, concept, [q["id"]] * (2 * a.per_prompt), f"merge-{method}-{tag}", 2 * a.per_prompt)
        tw.atomic_write(parts / f"{cid}.json", json.dumps({"rows": rows, "timing": timing}).encode())
        print(f"{concept.id} done at {time.time() - t_start:.0f} s", flush=True)

    rows, timing = [], {}  # the union of every finished concept, this run's and other shards'
    for part in sorted(parts.glob("*.json")):
        done = json.loads(part.read_text())
        rows += done["rows"]
        for k, v in done["timing"].items():
            timing.setdefault(k, []).extend(v)
    if not rows:
        sys.exit(f"error: no finished concept in {parts}.")
    tw.write_jsonl(str(img_dir / "manifest.jsonl"), rows)
    probes, _ = tw.load_probes(tw.PROBES_PATH)
    clip = tw.ToyCLIP(a.model or None) if os.path.isfile(os.path.join(a.model or tw.TOY_DIR, "config.json")) and \
        os.path.isfile(os.path.join(a.model or tw.TOY_DIR, "image_encoder.safetensors")) else None
    res = tw.evaluate(str(img_dir), rows, probes, None, clip)
    res.pop("images")
    front = {m: [] for m in ("dco", "db")}
    for name, s in res["methods"].items():
        for m in front:
            if name.startswith(m + "-"):
                front[m].append((s["prompt_fidelity"], s["concept_fidelity"]))
    summary = {"hypervolume": {m: round(hypervolume(v), 4) for m, v in front.items()},
               "timing": {k: round(float(np.mean(v)), 4) for k, v in timing.items()}, "args": vars(a),
               "wall_s": round(time.time() - t_start)}
    (out / "results.json").write_text(json.dumps({"summary": summary, **res}, indent=1))
    table = tw.markdown_table(res)
    text = (f"{table}\n\nhypervolume (area under the prompt/concept fidelity frontier): {summary['hypervolume']}\n"
            f"timing: {summary['timing']}\nwall: {summary['wall_s']} s\ncommand: {' '.join(sys.argv)}\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
