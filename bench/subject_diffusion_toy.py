"""Subject-Diffusion on the toy world: pretrain once on the records, personalise every toy concept zero-shot.

1. records: `toy_world.make_records` (world="pretrain": the 8 toy concepts and the held-out shapes never
   appear), tar shards;
2. pretrain Subject-Diffusion on them (`subject_diffusion.py train`, resumable, a time budget in steps);
3. for every concept, ONE reference image (make-concepts' 00.png), every eval prompt with the class word
   as the entity ("a star on the snow, the star is sks"), 4 images each, paired seeds:
     - subject-diffusion (1 subject, box): the default centred box;
     - subject-diffusion (1 subject, no location): --no-location, the layout left to the prompt;
     - subject-diffusion (2 subjects): the "next to a small <color> <shape>" prompt with a second
       reference image of that object, boxes: concept large on the left, the other small on the right;
     - base (class word): the base toy model, the prompt with the class word only.
4. `toy_world.py eval` on the folder: concept / prompt fidelity (+ CLIP-I / CLIP-T).

    OMP_NUM_THREADS=1 python bench/subject_diffusion_toy.py --out outputs/sd_toy        # full run
    OMP_NUM_THREADS=1 python bench/subject_diffusion_toy.py --out /tmp/sdb --model /tmp/toy-random \
        --records 400 --train-steps 4 --per-prompt 1 --sample-steps 2                              # smoke test
Run from the repository root. Writes OUT/images (+ manifest.jsonl, eval_results.json) and OUT/results.md.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sd_model as sdm  # noqa: E402
import subject_diffusion as sdx  # noqa: E402
import toy_world as tw  # noqa: E402

TWO = [(0.04, 0.2, 0.6, 0.76), (0.66, 0.36, 0.92, 0.62)]  # concept large on the left, the other small on the right


def other_reference(asks, seed):
    o = asks["other_object"]
    scene = tw.scene_for(tw.Concept("other", o["shape"], o["shape"], o["color"]), {"size": "large"}, np.random.default_rng(seed))
    return Image.fromarray(tw.render(scene)[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="", help="base model folder (default: the toy model)")
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--train-steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--text-scale", type=float, default=7.5)
    p.add_argument("--image-scale", type=float, default=1.5)
    p.add_argument("--concepts", nargs="*", default=[c.id for c in tw.CONCEPTS])
    a = p.parse_args()
    out = Path(a.out)
    rec, run, img_dir = out / "records", out / "train", out / "images"
    if not (rec / "done").exists():
        tw.make_records(str(rec), a.records, seed=0, shard_size=1000, overwrite=True)
        (rec / "done").write_text("ok")
    t0 = time.time()
    if not (run / "subject_diffusion.safetensors").exists() or json.loads((run / "args.json").read_text())["max_train_steps"] != a.train_steps:
        cmd = [sys.executable, "subject_diffusion.py", "train", "--data", str(rec), "--output-dir", str(run), "--resume", "latest",
               "--max-train-steps", str(a.train_steps), "--train-batch-size", str(a.batch), "--learning-rate", str(a.lr),
               "--lr-warmup-steps", "100", "--mixed-precision", "no", "--min-box-area", "0.02", "--num-workers", "1",
               "--checkpointing-steps", "200", "--checkpoints-total-limit", "1", *(["--pretrained-model", a.model] if a.model else [])]
        subprocess.run(cmd, check=True)
    train_s = time.time() - t0
    sd, vision, method, meta = sdx.load_trained(run, a.model, device="cpu")
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []

    def save(images, concept, prompt, method_name):
        for j, im in enumerate(sdm.tensor_to_images(images)):
            slug = "".join(ch if ch.isalnum() else "_" for ch in method_name)
            name = f"{slug}_{concept.id}_{prompt['id']}_{j}.png"
            sdm.save_image(im, img_dir / name)
            rows.append({"file": name, "concept": concept.id, "prompt": prompt["id"], "method": method_name})

    t1 = time.time()
    for ci, c in enumerate(tw.CONCEPTS):
        if c.id not in a.concepts:
            continue
        ref = Image.fromarray(tw.concept_references(c, n=1)[0][1])
        for pi, pr in enumerate(tw.eval_prompts(c)):
            text = pr["text"].format(c.class_word)
            g = lambda: torch.Generator().manual_seed(1000 * ci + pi)  # paired seeds across methods
            kw = dict(n=a.per_prompt, steps=a.sample_steps, text_scale=a.text_scale, image_scale=a.image_scale,
                      drop_objects=meta.get("drop_objects", "True") == "True", progress=False)
            one = [sdx.Subject(ref, c.class_word)]
            save(sdx.generate(method, sd, vision, text, one, generator=g(), **kw)[0], c, pr, "subject-diffusion (1 subject, box)")
            save(sdx.generate(method, sd, vision, text, one, generator=g(), location=False, **kw)[0], c, pr,
                 "subject-diffusion (1 subject, no location)")
            if "other_object" in pr["asks"]:
                two = [sdx.Subject(ref, c.class_word, TWO[0]),
                       sdx.Subject(other_reference(pr["asks"], ci), pr["asks"]["other_object"]["shape"], TWO[1])]
                save(sdx.generate(method, sd, vision, text, two, generator=g(), **kw)[0], c, pr, "subject-diffusion (2 subjects)")
            save(sd.sample([text] * a.per_prompt, steps=a.sample_steps, guidance_scale=a.text_scale, generator=g(),
                           progress=False), c, pr, "base (class word)")
    sample_s = time.time() - t1
    (img_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "toy_world.py", "eval", "--images", str(img_dir),
                        *(["--clip-model", a.model] if a.model else [])], check=True, capture_output=True, text=True)
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    ips = np.median([l["images_per_s"] for l in log[2:]]) if len(log) > 2 else float("nan")
    text = (f"# Subject-Diffusion on the toy world\n\npretraining: {a.train_steps} steps x {a.batch} images, lr {a.lr}, "
            f"{a.records} records; {train_s / 60:.1f} min this call, median {ips:.2f} images/s; sampling {sample_s / 60:.1f} min "
            f"(DDIM {a.sample_steps}, s_T {a.text_scale}, s_I {a.image_scale}, {a.per_prompt} images per prompt)\n\n{r.stdout}\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
