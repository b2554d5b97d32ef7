"""ICO vs the manual template, and DCI vs plain sampling, on the toy world (issue 6's measurements).

For every toy concept: write its reference images, render regularization images of its class word
(pretraining-world scenes captioned as the pretraining captions are, standing in for the official
LAION retrievals), and train ICO and the manual-template baseline (`--no-contexts`, "photo of a
V noun", i.e. Custom Diffusion without its augmentation) with the same steps, batch, learning
rate, seed and regularization images, keeping a checkpoint at each --eval-steps (the paper's
"various fine-tuning steps"). From each checkpoint, sample every eval prompt plainly and with DCI
at each --gammas (same seed, so plain and DCI start from the same x_T); the pretrained model on the
class-word prompts is the floor. Images + manifest.jsonl go to OUT/images, so

    python toy_world.py eval --images OUT/images

scores them again; this script also scores them (concept fidelity = the probes agree with the
concept's shape/colour/pattern, prompt fidelity = with what the prompt asks) and writes
OUT/results.md and OUT/results.json, including the fidelity curves over fine-tuning steps and the
prompt fidelity per prompt kind (scene / position / size / colour / pattern / second object).

    OMP_NUM_THREADS=1 python bench/dci_ico_toy.py --out outputs/dci_ico_toy            # full run
    python toy_world.py init-sd --out /tmp/toyrand && OMP_NUM_THREADS=1 python bench/dci_ico_toy.py \
        --out /tmp/dci_b --model /tmp/toyrand --concepts candy_star --steps 2 --eval-steps 1 2 \
        --sample-steps 4 --per-prompt 1 --reg 2 --gammas 1                                 # smoke test

On several cores, run shards into the same --out, e.g. `--concepts candy_star ...` in one process and
the rest in another: each finished concept leaves OUT/parts/<concept>.json (its manifest rows and
timings), and every run scores the union of the parts it finds; `--score-only` just re-scores them.
`--out NEW --runs-from OUT` samples OUT's checkpoints again (other γ, τ or steps) without training.

The auxiliary noun defaults to "square": a plain shape the toy model knows, that is no concept's
class word, and that differs from the second object the eval prompts ask for (always a circle).
`--aux-noun ""` lets dci_ico pick from its preset list by text similarity instead, which on the toy
CLIP may pick a word the toy world never used ("dog"). Run from the repository root.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dci_ico as di  # noqa: E402
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402


def to_pil(img):
    return sdm.tensor_to_images(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]


def write_references(folder, concept):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, img) in enumerate(tw.concept_references(concept)):
        sdm.save_image(to_pil(img), folder / f"{i:02d}.png")


def write_regularization(folder, concept, n, seed=0):
    """n pretraining-world scenes whose main object is of the concept's class (any shape for "toy"),
    captioned like the pretraining data, with the class word as the main object's noun."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 77, tw.CONCEPTS.index(concept) if concept in tw.CONCEPTS else 0))
    generic = concept.class_word == tw.GENERIC_NOUN
    rows = []
    while len(rows) < n:
        scene = tw.sample_scene(rng, "pretrain", p_two=0.0 if generic else 0.35)
        if not generic and scene.objects[0].shape != concept.class_word:
            continue
        caption, _ = tw.describe(scene, rng, p_generic=1.0 if generic else 0.0)  # one object: "toy" is its noun
        name = f"{len(rows):03d}.png"
        sdm.save_image(to_pil(tw.render(scene)[0]), folder / name)
        rows.append({"file": name, "caption": caption})
    tw.write_jsonl(str(folder / "captions.jsonl"), rows)


def train(a, model, refs, reg, out, class_word, contexts):
    """One run of dci_ico.train with checkpoints at every eval step; returns seconds per step."""
    every = math.gcd(*a.eval_steps)
    args = di.ICOArgs(pretrained_model=a.model, images=str(refs), class_word=class_word,
                      reg_images=str(reg) if reg else "", contexts=contexts, output_dir=str(out), overwrite=True,
                      max_train_steps=a.steps, learning_rate=a.lr, train_batch_size=a.batch,
                      gradient_accumulation_steps=a.accum, checkpointing_steps=every, seed=a.seed)
    t0 = time.time()
    di.train(args, model)
    return (time.time() - t0) / a.steps


@torch.no_grad()
def generate(model, folder, prompts, a, dci, gamma, steps, seed):
    ico = di.ICO.load(folder, model)
    g = torch.Generator().manual_seed(seed)
    x, _ = di.sample(model, ico, prompts, aux_noun=a.aux_noun, dci=dci, tau=a.tau, gamma=gamma, steps=steps,
                     sampler=a.sampler, eta=a.eta, guidance_scale=a.guidance, generator=g, progress=False)
    return sdm.tensor_to_images(x)


def kind(prompt_id):
    return prompt_id.split("_")[0].replace("next", "second object").replace("pos", "position")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/dci_ico_toy")
    p.add_argument("--model", default="", help="base model ('' = the toy model, assets/toy/sd)")
    p.add_argument("--concepts", nargs="+", default=[c.id for c in tw.CONCEPTS])
    p.add_argument("--methods", nargs="+", default=["ico", "template"], choices=["ico", "template"])
    p.add_argument("--dci-for", nargs="+", default=["ico"], help="methods also sampled with DCI")
    # the card's recipe (finetune_addtoken.yaml): 1e-5 x batch 2 x 3 GPUs (accumulation here) = 6e-5, 900 steps
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--eval-steps", type=int, nargs="+", default=[300, 600, 900])
    p.add_argument("--lr", type=float, default=1e-5, help="base learning rate, scaled by batch x accumulation")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=3)
    p.add_argument("--reg", type=int, default=20, help="regularization images per concept (0 = none)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--dci-steps", type=int, default=0, help="steps for DCI (0 = --sample-steps; lower to match compute)")
    p.add_argument("--eta", type=float, default=1.0, help="sample.py: DDIM eta 1")
    p.add_argument("--guidance", type=float, default=6.0, help="sample.py: scale 6")
    p.add_argument("--tau", type=float, default=0.3)
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--aux-noun", default="square")
    p.add_argument("--per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-from", default="", help="sample the checkpoints an earlier --out trained (e.g. other --gammas)")
    p.add_argument("--score-only", action="store_true", help="score the finished concepts in OUT/parts, train nothing")
    a = p.parse_args()
    if max(a.eval_steps) > a.steps or min(a.eval_steps) < 1:
        sys.exit("error: every --eval-steps must lie in 1..--steps.")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    model = sdm.load_model(a.model) if not a.score_only else None
    rows, timing, t_start = [], {}, time.time()

    def emit(images, concept, prompt_ids, method):
        rows.extend(tw.save_generated(img_dir, images, concept.id, prompt_ids, method, a.per_prompt))

    def timed(key, n, fn, *args):
        t0 = time.time()
        result = fn(*args)
        timing.setdefault(key, []).append((time.time() - t0) / n)
        return result

    for cid in a.concepts if not a.score_only else []:
        concept = tw.find_concept(cid)
        rows, timing = [], {}
        refs, reg = out / "data" / cid / "refs", (out / "data" / cid / "reg") if a.reg else None
        write_references(refs, concept)
        if reg:
            write_regularization(reg, concept, a.reg, a.seed)
        ps = tw.eval_prompts(concept)
        pids = [q["id"] for q in ps for _ in range(a.per_prompt)]
        floor = [q["text"].format(concept.class_word) for q in ps for _ in range(a.per_prompt)]
        x = model.sample(floor, steps=a.sample_steps, guidance_scale=a.guidance, sampler=a.sampler, eta=a.eta,
                         generator=torch.Generator().manual_seed(a.seed + 1), progress=False)
        emit(sdm.tensor_to_images(x), concept, pids, "pretrained")
        for method in a.methods:
            run = Path(a.runs_from or out) / "runs" / f"{method}_{cid}"
            if a.runs_from:
                missing = [s for s in a.eval_steps if not (run / f"checkpoint-{s}").is_dir()]
                if missing:
                    sys.exit(f"error: {run} has no checkpoint for steps {missing}; train them first (drop --runs-from).")
            else:
                timing.setdefault(f"train_{method}_s_per_step", []).append(
                    train(a, model, refs, reg, run, concept.class_word, method == "ico"))
            phrase = " ".join(di.read_metadata(run)["tokens"]) + " " + concept.class_word
            prompts = [q["text"].format(phrase) for q in ps for _ in range(a.per_prompt)]
            for step in sorted(set(a.eval_steps)):
                folder = run / f"checkpoint-{step}"
                imgs = timed("sample_plain_s_per_image", len(prompts), generate, model, folder, prompts, a, False, 0.0,
                             a.sample_steps, a.seed + 1)
                emit(imgs, concept, pids, f"{method}-{step}-plain")
                for gamma in a.gammas if method in a.dci_for else ():
                    imgs = timed("sample_dci_s_per_image", len(prompts), generate, model, folder, prompts, a, True, gamma,
                                 a.dci_steps or a.sample_steps, a.seed + 1)
                    emit(imgs, concept, pids, f"{method}-{step}-dci{gamma:g}")
        tw.atomic_write(parts / f"{cid}.json", json.dumps({"rows": rows, "timing": timing}).encode())
        print(f"{cid} done at {time.time() - t_start:.0f} s", flush=True)

    rows, timing = [], {}  # the union of every finished concept, this run's and other shards'
    for part in sorted(parts.glob("*.json")):
        done = json.loads(part.read_text())
        rows += done["rows"]
        for k, v in done["timing"].items():
            timing.setdefault(k, []).extend(v)
    if not rows:
        sys.exit(f"error: no finished concept in {parts}.")
    pids = sorted({r["prompt"] for r in rows})
    tw.write_jsonl(str(img_dir / "manifest.jsonl"), rows)
    probes, _ = tw.load_probes(tw.PROBES_PATH)
    model_dir = a.model or tw.TOY_DIR
    has_clip = all(os.path.isfile(os.path.join(model_dir, f)) for f in ("config.json", "image_encoder.safetensors"))
    res = tw.evaluate(str(img_dir), rows, probes, None, tw.ToyCLIP(a.model or None) if has_clip else None)
    res.pop("images")
    # fidelity curves over fine-tuning steps, and prompt fidelity per prompt kind (the "hard prompts" question)
    curves = ["| variant | step | concept fidelity | prompt fidelity |", "|---|---|---|---|"]
    points = []
    for name, s in res["methods"].items():  # "ico-300-dci1" -> ("ico-dci1", 300); "pretrained" -> step 0
        method, step, how = name.split("-", 2) if name.count("-") >= 2 else (name, "0", "")  # "dci-1": gamma -1
        points.append((f"{method}-{how}" if how else method, int(step), s))
    for variant, step, s in sorted(points, key=lambda v: v[:2]):
        curves.append(f"| {variant} | {step} | {s['concept_fidelity']:.3f} | {s['prompt_fidelity']:.3f} |")
    kinds = sorted({kind(pid) for pid in pids})
    by_kind = {}
    for m, per_concept in res["per_prompt"].items():
        for per_prompt in per_concept.values():
            for pid, s in per_prompt.items():
                by_kind.setdefault(m, {}).setdefault(kind(pid), []).append(s["prompt_fidelity"])
    hard = ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m in sorted(by_kind):
        hard.append(f"| {m} | " + " | ".join(f"{np.mean(by_kind[m][k]):.3f}" if k in by_kind[m] else "-" for k in kinds) + " |")
    summary = {"timing": {k: round(float(np.mean(v)), 4) for k, v in timing.items()}, "args": vars(a),
               "wall_s": round(time.time() - t_start), "command": " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps({"summary": summary, **res}, indent=1))
    text = (f"{tw.markdown_table(res)}\n\nCurves over fine-tuning steps:\n\n" + "\n".join(curves) +
            "\n\nPrompt fidelity per prompt kind (mean over concepts):\n\n" + "\n".join(hard) +
            f"\n\ntiming: {summary['timing']}\nwall: {summary['wall_s']} s\ncommand: {summary['command']}\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
