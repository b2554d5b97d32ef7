"""The toy world: determinism, ground truth, held-out concepts, record round trips, benchmark."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402

PROBES = os.path.join(ROOT, "assets", "toy", "probes.safetensors")
needs_probes = pytest.mark.skipif(
    not os.path.isfile(PROBES),
    reason="assets/toy/probes.safetensors is missing; train it with "
           "`python toy_world.py train-probes --out assets/toy/probes.safetensors`")


def test_sampling_and_rendering_are_deterministic_per_seed():
    a, b, c = tw.make_sample(3, 17), tw.make_sample(3, 17), tw.make_sample(4, 17)
    assert a[0] == b[0] and a[3] == b[3]
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert a[0] != c[0]
    # a scene is resolution-free: the same scene renders at any size, with the same objects
    image, labels = tw.render(a[0], size=96)
    assert image.shape == (96, 96, 3) and labels.max() == len(a[0].objects)


def test_ground_truth_is_consistent():
    two = 0
    for i in range(40):
        scene, image, labels, rec = tw.make_sample(0, i)
        h, w = labels.shape
        assert set(np.unique(labels)) == set(range(len(scene.objects) + 1))
        words = rec["caption"].replace(",", "").split()
        assert tw.BG_PHRASE[scene.background] in rec["caption"]
        assert {s for s in tw.SIZES if s in words} <= {o.size for o in scene.objects}
        for obj, o in zip(scene.objects, rec["objects"]):
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            ys, xs = np.nonzero(labels == o["value"])
            assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
            assert o["label"] in words and o["label"] in (obj.shape, tw.GENERIC_NOUN)
            assert obj.color in words and (obj.pattern == "plain" or obj.color2 in words)
            pattern_word = "dots" if obj.pattern == "dotted" else obj.pattern
            assert obj.pattern == "plain" or pattern_word in words
            # the colours the caption names are the colours in the mask
            px = image[labels == o["value"]].astype(float)
            near = lambda c: (np.linalg.norm(px - tw.COLORS[c], axis=1) < 60).mean()  # noqa: E731
            assert near(obj.color) > 0.1, (i, obj)  # small patterned ones: ~0.17
            assert obj.pattern == "plain" or near(obj.color2) > 0.02, (i, obj)
        if len(scene.objects) == 2:
            two += 1
            main, other = scene.objects
            assert tw.SIZES[main.size] > tw.SIZES[other.size]  # "main" is the larger one
    assert two > 5


def test_hard_negatives_change_exactly_one_shape_or_position():
    """NegCLIP's negative for a caption differs from it in one shape word or one position phrase, never in a colour
    or background, and is deterministic per rng; a caption with neither has none."""
    rng = np.random.default_rng(3)
    caps = [tw.describe(tw.sample_scene(rng), rng)[0] for _ in range(300)]
    a, b = ([tw.hard_negative(np.random.default_rng(9), c) for c in caps] for _ in range(2))
    assert a == b and sum(n is None for n in a) < 30
    kinds = set()
    for c, n in zip(caps, a):
        if n is None:
            continue
        old, new = c.split(" "), n.split(" ")
        diff = [(x, y) for x, y in zip(old, new) if x != y] if len(old) == len(new) else []
        if len(diff) == 1 and diff[0][0].rstrip(",") in tw.SHAPES:
            (x, y), = diff
            assert y.rstrip(",") in tw.SHAPES and x.endswith(",") == y.endswith(",")
            kinds.add("shape")
        else:  # a position phrase replaced by another one
            ph = tw.POS_PHRASE.values()
            assert any(c.replace(p, q, 1) == n for p in ph if p in c for q in ph if q != p)
            kinds.add("position")
    assert kinds == {"shape", "position"}
    assert tw.hard_negative(rng, "a photo of a red toy on the grass") is None


def test_concepts_and_held_out_shapes_never_appear_in_pretraining():
    held_out_words = set(tw.HELD_OUT_SHAPES)
    for i in range(3000):
        rng = np.random.default_rng((0, i))
        scene = tw.sample_scene(rng)
        for o in scene.objects:
            assert o.key() not in tw.CONCEPT_KEYS and o.shape in tw.SHAPES
            assert o.color not in tw.CLASHES[scene.background]
        assert not held_out_words & set(tw.describe(scene, rng)[0].split())
    # not vacuous: without the hold-out, the same sampler does produce both
    probe = [o for i in range(3000)
             for o in tw.sample_scene(np.random.default_rng((0, i)), "probe").objects]
    assert any(o.key() in tw.CONCEPT_KEYS for o in probe)
    assert any(o.shape in tw.HELD_OUT_SHAPES for o in probe)


def test_concepts_have_references_and_answerable_prompts():
    assert len(tw.CONCEPTS) >= 6 and sum(c.shape in tw.HELD_OUT_SHAPES for c in tw.CONCEPTS) >= 2
    tok = sdm.CLIPTokenizer()
    # a learned token starts from one token: the class word, or the generic noun for "hexagon" (hex + agon)
    assert {c.id: c.init_word() for c in tw.CONCEPTS if c.init_word() != c.class_word} == {"speckled_hexagon": "toy"}
    for c in tw.CONCEPTS:
        tok.token_id(c.init_word())
        refs = tw.concept_references(c, n=4)
        assert all(s.objects[0].key() == c.key() and len(s.objects) == 1 for s, _ in refs)
        ref_bgs, _ = tw.concept_backgrounds(c)
        prompts = tw.eval_prompts(c)
        kinds = {k for p in prompts for k in p["asks"]}
        assert {"background", "position", "size", "color", "other_object"} <= kinds
        for p in prompts:
            assert p["text"].count("{}") == 1
            if "background" in p["asks"]:  # a new scene, and one where the concept is visible
                assert p["asks"]["background"] not in ref_bgs
                assert c.color not in tw.CLASHES[p["asks"]["background"]]
            scene = tw.scene_for(c, p["asks"], np.random.default_rng(0))
            labels = tw.probe_labels(scene)
            for k, v in p["asks"].items():
                if k == "other_object":
                    assert tw.PROBE_HEADS["other_shape"][labels["other_shape"]] == v["shape"]
                else:
                    assert tw.PROBE_HEADS[k][labels[k]] == v


def test_score_follows_the_benchmark_definition():
    c = tw.CONCEPTS[0]  # red star, white stripes
    pred = {"shape": "star", "color": "green", "pattern": "striped", "color2": "black",
            "background": "snow", "position": "center", "size": "large",
            "other_shape": "none", "other_color": "none"}
    fidelity, prompt = tw.score(pred, c, {"color": "green"})
    assert fidelity == {"shape": 1.0, "pattern": 1.0, "color2": 0.0} and prompt == {"color": 1.0}
    fidelity, prompt = tw.score(pred, c, {"pattern": "plain", "color2": "none"})
    assert set(fidelity) == {"shape", "color"} and prompt == {"pattern": 0.0, "color2": 0.0}
    _, prompt = tw.score(pred, c, {"other_object": {"shape": "circle", "color": "blue"}})
    assert prompt == {"other_shape": 0.0, "other_color": 0.0}
    assert tw.find_prompt(c, "a sks star in the top left")["id"] == "pos_top_left"
    with pytest.raises(SystemExit):
        tw.find_prompt(c, "a {} on the moon")


@pytest.mark.parametrize("shard_size", [None, 3])
def test_records_round_trip(tmp_path, shard_size):
    out = str(tmp_path / "records")
    tw.make_records(out, n=7, seed=5, shard_size=shard_size)
    if shard_size:
        assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar"]
    got = list(tw.read_records(out))
    assert [key for key, *_ in got] == [f"{i:06d}" for i in range(7)]
    for key, image, rec, labels in got:
        _, image2, labels2, rec2 = tw.make_sample(5, int(key))
        assert rec == rec2 and np.array_equal(image, image2) and np.array_equal(labels, labels2)
    with pytest.raises(SystemExit, match="not empty"):
        tw.make_records(out, n=1)
    if shard_size:  # same seed, same bytes: shards can be checksummed and cached
        again = str(tmp_path / "again")
        tw.make_records(again, n=7, seed=5, shard_size=shard_size)
        for name in os.listdir(out):
            with open(os.path.join(out, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
                assert a.read() == b.read()


def test_make_data_and_make_concepts_cli(tmp_path):
    tw.main(["make-data", "--out", str(tmp_path / "data"), "--n", "3", "--seed", "2"])
    with open(tmp_path / "data" / "captions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["file"] for r in rows] == ["000000.png", "000001.png", "000002.png"]
    assert rows[1]["caption"] == tw.make_sample(2, 1)[3]["caption"]
    tw.main(["make-concepts", "--out", str(tmp_path / "concepts"), "--n-refs", "4"])
    c = tw.find_concept(str(tmp_path / "concepts" / "hazard_bolt"))
    assert c == next(x for x in tw.CONCEPTS if x.id == "hazard_bolt")
    assert len([n for n in os.listdir(tmp_path / "concepts" / c.id) if n.endswith(".png")]) == 4


@needs_probes
def test_probes_read_fresh_ground_truth():
    model, meta = tw.load_probes(PROBES)
    assert os.path.getsize(PROBES) < 2 * 2**20
    x, y = tw.probe_dataset(seed=12345, n=400)
    acc = tw.probe_accuracy(model, x, y)
    for head in ("background", "position", "size", "shape", "color", "pattern"):
        assert acc[head] >= 0.8, (head, acc)
    for head in ("color2", "other_shape", "other_color"):  # "none" alone would score about 0.7
        assert acc[head] >= 0.75, (head, acc)


@needs_probes
def test_eval_end_to_end_on_oracle_images(tmp_path, capsys):
    images = str(tmp_path / "oracle")
    tw.make_oracle(images, per_prompt=1)
    with open(os.path.join(images, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    # a method that shows the wrong concept: the next concept's image for the same prompt
    shared = ("pos_top_left", "pos_bottom_right", "size_small", "size_large")
    files = {(r["concept"], r["prompt"]): r["file"] for r in rows}
    ids = [c.id for c in tw.CONCEPTS]
    rows += [{"file": files[(ids[(i + 1) % len(ids)], p)], "concept": cid, "prompt": p,
              "method": "swapped"} for i, cid in enumerate(ids) for p in shared]
    tw.write_jsonl(os.path.join(images, "manifest.jsonl"), rows)
    out = str(tmp_path / "results.json")
    tw.main(["eval", "--images", images, "--probes", PROBES, "--out", out])
    assert "| oracle |" in capsys.readouterr().out
    with open(out) as f:
        res = json.load(f)
    oracle, swapped = res["methods"]["oracle"], res["methods"]["swapped"]
    assert oracle["n"] == len(rows) - len(ids) * len(shared)
    assert oracle["concept_fidelity"] >= 0.8 and oracle["prompt_fidelity"] >= 0.8, oracle
    assert swapped["concept_fidelity"] < oracle["concept_fidelity"] - 0.3
    assert set(res["per_concept"]["oracle"]) == set(ids)


@needs_probes
def test_images_saved_for_eval_score_like_the_originals(tmp_path):
    images = tmp_path / "oracle"
    tw.make_oracle(str(images), per_prompt=1)
    with open(images / "manifest.jsonl") as f:
        c = tw.CONCEPTS[0].id
        mine = [r for r in map(json.loads, f) if r["concept"] == c][:4]
    pics = [Image.open(images / r["file"]) for r in mine]
    new = tw.save_generated(images, pics, c, [r["prompt"] for r in mine], "resaved", per_prompt=2)
    assert [r["file"] for r in new] == [f"resaved_{c}_{r['prompt']}_{k % 2}.png" for k, r in enumerate(mine)]
    probes, _ = tw.load_probes(PROBES)
    res = tw.evaluate(str(images), mine + new, probes)
    a, b = res["methods"]["oracle"], res["methods"]["resaved"]
    assert a["n"] == b["n"] == 4
    assert (a["concept_fidelity"], a["prompt_fidelity"]) == (b["concept_fidelity"], b["prompt_fidelity"])


def test_clip_loss_with_hard_negatives_matches_a_loop():
    """Each image's softmax runs over all captions and its own negatives only; the text side over captions only;
    with no negatives it is CLIP's plain symmetric loss."""
    g = torch.Generator().manual_seed(0)
    v, t = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    owner = torch.tensor([2, 0, 2])  # negatives 4, 5, 6 belong to images 2, 0, 2
    loss, _ = tw.clip_loss(10.0, v, t, owner)
    img = [-torch.log_softmax(10.0 * v[i] @ t[[*range(4), *(4 + k for k in range(3) if owner[k] == i)]].T, 0)[i] for i in range(4)]
    txt = [-torch.log_softmax(10.0 * t[j] @ v.T, 0)[j] for j in range(4)]
    assert torch.allclose(loss, (torch.stack(img).mean() + torch.stack(txt).mean()) / 2)
    plain = 10.0 * v @ t[:4].T
    ref = (F.cross_entropy(plain, torch.arange(4)) + F.cross_entropy(plain.T, torch.arange(4))) / 2
    assert torch.allclose(tw.clip_loss(10.0, v, t[:4], torch.zeros(0, dtype=torch.long))[0], ref)
    assert loss > tw.clip_loss(10.0, v, t[:4], torch.zeros(0, dtype=torch.long))[0]  # negatives only add terms


def test_clip_trains_with_hard_negatives(tmp_path):
    """`train-clip --hard-negatives` trains on real captions with their negatives: the towers differ from a plain run's."""
    tw.pretrain_data(str(tmp_path / "data"), 16, workers=1)
    runs = {}
    for hn in (False, True):
        tw.train_clip(tw.ClipArgs(data=str(tmp_path / "data"), output_dir=str(tmp_path / f"clip{hn}"), train_batch_size=8,
                                  max_train_steps=1, checkpointing_steps=1, threads=1, hard_negatives=hn))
        runs[hn] = tw._clip_towers(str(tmp_path / f"clip{hn}"))[0].state_dict()
    assert all(torch.isfinite(p).all() for p in runs[True].values())
    assert any(not torch.equal(runs[True][k], runs[False][k]) for k in runs[False])


def test_unet_init_is_the_same_with_or_without_a_latent_cache(tmp_path):
    """The latent scale's draw once came from the global RNG, so the same seed gave another UNet whenever the cache
    (stage_dir/latents-N) already existed: a second run, or a resumed one in a new folder, did not reproduce the first."""
    tw.pretrain_data(str(tmp_path / "data"), 8, workers=1)
    text, vision = tw._clip_towers()
    for name, module in (("clip/text_encoder", text), ("clip/image_encoder", vision), ("vae/vae", sdm.AutoencoderKL(tw.TOY_SD.vae))):
        sdm.save_safetensors(module.state_dict(), tmp_path / f"{name}.safetensors")
    runs = []
    for run in ("fresh", "cached"):
        tw.train_unet(tw.UnetArgs(data=str(tmp_path / "data"), stage_dir=str(tmp_path), output_dir=str(tmp_path / run),
                                  train_batch_size=2, max_train_steps=1, checkpointing_steps=1, latent_images=8,
                                  validation_prompt="", export="", threads=1))
        runs.append(sdm.load_file(str(tmp_path / run / "unet.safetensors")))
    assert os.path.isfile(tmp_path / "latents-8.safetensors")
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_latent_cache_is_keyed_by_the_vae_encoder_and_the_images(tmp_path, capsys, monkeypatch):
    """The cache once ignored which VAE wrote it: after train-vae, train-unet trained on the old VAE's latents. A changed
    encoder, changed images, an unkeyed (older) or unreadable cache now re-encode, saying so; the same VAE and images,
    a decoder-only change or a change past the first n images reuse it."""
    torch.manual_seed(0)
    vae = sdm.AutoencoderKL(sdm.VAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)).eval()
    arr = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    path, encoded, real = str(tmp_path / "latents-4.safetensors"), [], tw.latent_moments
    monkeypatch.setattr(tw, "latent_moments", lambda *a: encoded.append(1) or real(*a))
    cached = lambda images: tw.cached_latents(path, vae, images, 4)  # noqa: E731
    first = cached(arr)
    assert torch.equal(first, real(vae, arr, 4)) and first.shape == (4, 8, 8, 8) and len(encoded) == 1
    assert torch.equal(cached(arr), first) and len(encoded) == 1
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)
    later = arr.copy()
    later[5] = 0  # past the first n: not in the cache
    cached(later)
    assert len(encoded) == 1 and "again" not in capsys.readouterr().err
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)  # as after train-vae
    again = cached(arr)
    assert len(encoded) == 2 and "another VAE or other images" in capsys.readouterr().err
    assert not torch.equal(again, first) and torch.equal(again, real(vae, arr, 4))
    assert torch.equal(cached(arr), again) and len(encoded) == 2  # the rebuilt cache is reused from then on
    changed = arr.copy()
    changed[3, 0, 0, 0] ^= 1  # one bit of one image
    cached(changed)
    assert len(encoded) == 3
    sdm.save_safetensors({"moments": first}, path, {"scale_factor": 1.0})  # a cache of the unkeyed version
    assert torch.equal(cached(changed), real(vae, changed, 4)) and len(encoded) == 4
    with open(path, "wb") as f:
        f.write(b"cut off")
    cached(changed)
    assert len(encoded) == 5 and "encoding them again" in capsys.readouterr().err


def test_unet_resume_refuses_another_vae_and_may_export_elsewhere(tmp_path, monkeypatch):
    """A rebuilt cache must not feed a resumed run: its checkpoint was trained on the latents of the VAE it holds. The
    export folder, written after the loop, stays out of the checkpoint's settings (a resume exporting to a new folder
    was refused)."""
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "images.npy", np.zeros((2, 64, 64, 3), np.uint8))
    (data / "captions.json").write_text('["a red star on the grass", "a blue circle"]')
    text, vision = tw._clip_towers()
    for name, module in (("clip/text_encoder", text), ("clip/image_encoder", vision), ("vae/vae", sdm.AutoencoderKL(tw.TOY_SD.vae))):
        sdm.save_safetensors(module.state_dict(), tmp_path / f"{name}.safetensors")
    ckpt = tmp_path / "unet" / "checkpoint-1"
    other = {k: v.half() for k, v in sdm.AutoencoderKL(tw.TOY_SD.vae).state_dict().items()}  # another init: another VAE
    sdm.save_safetensors(other, ckpt / "vae.safetensors")
    args = tw.UnetArgs(data=str(data), stage_dir=str(tmp_path), output_dir=str(tmp_path / "unet"), resume=str(ckpt),
                       latent_images=2, validation_prompt="", export="", threads=1)
    with pytest.raises(ValueError, match="trained on the latents of another VAE"):
        tw.train_unet(args)
    with pytest.raises(FileExistsError, match="not empty"):  # a folder the loop refuses: refused before encoding too
        tw.train_unet(sdm.replace(args, resume=""))
    assert not os.path.exists(tmp_path / "latents-2.safetensors")  # refused before anything was written
    sdm.save_safetensors({k: v.half() for k, v in sdm.load_file(str(tmp_path / "vae" / "vae.safetensors")).items()},
                         ckpt / "vae.safetensors")
    seen = {}

    class Stop(Exception):
        pass

    def loop(a, *_, metadata=None, **__):
        seen.update(args=a, metadata=metadata)
        raise Stop

    monkeypatch.setattr(sdm, "train_loop", loop)
    with pytest.raises(Stop):  # its own VAE: past the check, into the loop
        tw.train_unet(sdm.replace(args, export=str(tmp_path / "new" / "sd")))
    assert seen["args"].export == "" and seen["args"].resume == str(ckpt)
    assert seen["metadata"] == {"export": str(tmp_path / "new" / "sd")}  # still in args.json


def test_stages_refuse_shared_flags_they_do_not_read(tmp_path, capsys):
    """--pretrained-model, --resolution (outside train-vae), --scale-lr, ... were accepted and silently dropped: a
    reader reproducing the stages believed they applied. Now one sentence, before anything is written."""
    for argv, flags in ((["train-clip", "--pretrained-model", "x", "--scale-lr"], "--pretrained-model, --scale-lr"),
                        (["train-unet", "--resolution", "32"], "--resolution"),
                        (["train-vae", "--compile", "--validation-prompt", "a star"], "--compile, --validation-prompt")):
        with pytest.raises(SystemExit, match=f"{argv[0]} does not use {flags} "):
            tw.main([*argv, "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")])
    assert not os.listdir(tmp_path)
    with pytest.raises(SystemExit, match="No pretraining data"):  # train-vae reads --resolution (its crop): past the check
        tw.main(["train-vae", "--resolution", "32", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")])
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "images.npy", np.zeros((2, 64, 64, 3), np.uint8))
    (tmp_path / "data" / "captions.json").write_text('["a", "b"]')
    for r in ("30", "96"):  # were tracebacks a step in, after the run folder was made
        with pytest.raises(SystemExit, match=f"--resolution {r} must be a multiple of 4 no larger than the images' 64 px"):
            tw.main(["train-vae", "--resolution", r, "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        tw.main(["train-unet", "--latent-images", "-1"])
    assert "--latent-images must be at least 0" in capsys.readouterr().err


def test_export_replaces_a_model_folder_as_a_whole(tmp_path):
    """The export wrote file by file into the shipped model's folder: an interrupted one left a UNet of one run beside
    the config (latent scale) of another. Now it is swapped in whole, and a folder holding other files is refused."""
    src, dst = tmp_path / "run", tmp_path / "sd"
    for folder, text in ((src, "new"), (dst, "old")):
        folder.mkdir()
        for f in tw.MODEL_FILES:
            (folder / f).write_text(text + f)
    tw.export_model(str(src), str(dst))
    assert {f: (dst / f).read_text() for f in tw.MODEL_FILES} == {f: "new" + f for f in tw.MODEL_FILES}
    assert sorted(os.listdir(tmp_path)) == ["run", "sd"]  # nothing left beside it
    tw.export_model(str(src), str(tmp_path / "fresh" / "sd"))
    assert sorted(os.listdir(tmp_path / "fresh" / "sd")) == sorted(tw.MODEL_FILES)
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not a model folder"):
        tw.export_model(str(src), str(dst))
    args = tw.UnetArgs(data=str(tmp_path / "none"), output_dir=str(tmp_path / "unet"), export=str(dst))
    with pytest.raises(SystemExit, match="is not a model folder"):  # train-unet: before the run starts
        tw.train_unet(args)
    assert (dst / "notes.txt").read_text() == "mine" and not (tmp_path / "unet").exists()


def test_bad_manifests_and_concept_files_are_one_sentence(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png", "prompt": "scene_snow"\n')
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        tw.read_manifest(str(tmp_path / "manifest.jsonl"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "concept.json").write_text('{"id": "mine"}')
    with pytest.raises(SystemExit, match="is not a concept.json"):
        tw.find_concept(str(tmp_path / "c"))
    (tmp_path / "c" / "concept.json").write_text(json.dumps({"id": "mine", "class_word": "toy", "attributes": {
        "shape": "pentagon", "color": "red", "pattern": "plain", "color2": "none"}}))
    with pytest.raises(SystemExit, match="shape 'pentagon' is outside"):
        tw.find_concept(str(tmp_path / "c"))
    if not torch.cuda.is_available():  # the project's errors (here pick_device's ValueError) end as one line, not a traceback
        np.save(tmp_path / "images.npy", np.zeros((2, 64, 64, 3), np.uint8))
        (tmp_path / "captions.json").write_text('["a", "b"]')
        with pytest.raises(SystemExit, match="^error: --device cuda"):
            tw.main(["train-clip", "--data", str(tmp_path), "--device", "cuda"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(tw.TOY_DIR, "config.json")), reason="needs the toy model")
def test_clip_i_of_a_concept_folder_uses_its_own_references(tmp_path):
    """A concept read from a folder (make-concepts, or a user's own) is compared with the references in that folder;
    a new concept used to crash in CONCEPTS.index."""
    tw.make_concepts(str(tmp_path), n_refs=2, seed=1)
    folder = tmp_path / "candy_star"
    d = json.loads((folder / "concept.json").read_text())
    d["id"], d["attributes"]["color"] = "blue_candy_star", "blue"
    (folder / "concept.json").write_text(json.dumps(d))
    mine = tw.find_concept(str(folder))
    refs = [np.asarray(Image.open(folder / f"{i:02d}.png")) for i in range(2)]
    clip = tw.ToyCLIP(None)
    sim = clip.image_similarity(refs[:1], [mine])[0]
    mean = F.normalize(clip.embed_images(refs).mean(0), dim=-1)
    assert sim == pytest.approx(float(clip.embed_images(refs[:1])[0] @ mean), abs=1e-6)
    builtin = clip.image_similarity(refs[:1], [tw.CONCEPTS[0]])[0]  # make-concepts' defaults: other references
    assert abs(builtin - sim) > 1e-4


def test_pretrain_data_refuses_finished_data_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """pretrain-data wrote over finished data unasked, left its .images.npy.tmp (2.4 GB at 200k) after a crash, and took
    --n 0. Now: one sentence for each refusal before anything is written; an interrupted run's leftovers are taken over."""
    data = tmp_path / "data"
    with pytest.raises(SystemExit, match="--n must be at least 1"):
        tw.main(["pretrain-data", "--out", str(data), "--n", "0"])
    assert not data.exists()
    tw.main(["pretrain-data", "--out", str(data), "--n", "3", "--workers", "1"])
    arr, captions = tw.load_pretrain_data(str(data))
    assert sorted(os.listdir(data)) == ["captions.json", "images.npy"] and len(captions) == len(arr) == 3
    assert captions[1] == tw.make_sample(0, 1)[3]["caption"] and np.array_equal(arr[1], tw.make_sample(0, 1)[1])
    before = {f: (data / f).read_bytes() for f in os.listdir(data)}
    with pytest.raises(SystemExit, match="already holds pretraining data; pass --overwrite"):
        tw.main(["pretrain-data", "--out", str(data), "--n", "3", "--seed", "1", "--workers", "1"])
    assert {f: (data / f).read_bytes() for f in os.listdir(data)} == before

    def crash(path, data):
        raise KeyboardInterrupt
    monkeypatch.setattr(tw, "atomic_write", crash)  # after the render, before captions.json and images.npy
    with pytest.raises(KeyboardInterrupt):
        tw.pretrain_data(str(data), 3, seed=1, workers=1, overwrite=True)
    assert os.listdir(data) == ["captions.json"]  # no temporary file, and the old captions never beside new images
    monkeypatch.undo()
    (data / ".images.npy.tmp").write_bytes(b"cut")  # what a killed run leaves: taken over without --overwrite
    tw.pretrain_data(str(data), 3, seed=1, workers=1)
    assert json.loads((data / "captions.json").read_text())[1] == tw.make_sample(1, 1)[3]["caption"]
    assert sorted(os.listdir(data)) == ["captions.json", "images.npy"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="already holds other files"):
        tw.pretrain_data(str(tmp_path / "mine"), 3, workers=1)


@pytest.mark.parametrize("argv", [["pretrain-data", "--n", "3", "--workers", "-1"], ["make-data", "--n", "0"],
                                  ["make-records", "--n", "2", "--shard-size", "0"], ["make-concepts", "--n-refs", "0"],
                                  ["make-oracle", "--per-prompt", "0"], ["train-probes", "--n-train", "0"],
                                  ["train-probes", "--threads", "0"], ["train-probes", "--steps", "0"],
                                  ["eval-base", "--n", "0"], ["pretrain", "--threads", "0"],
                                  ["make-data", "--n", "2", "--seed", "-1"], ["pretrain-data", "--n", "2", "--seed", "-1"],
                                  ["make-concepts", "--seed", "-1"], ["train-probes", "--seed", "-1"], ["init-sd", "--seed", "-1"]])
def test_integer_flags_below_their_floor_are_one_sentence_before_anything_is_written(tmp_path, argv):
    """--n 0 wrote an empty captions.jsonl, --n-refs 0 concepts without references, --threads 0 and --n-train 0 were
    tracebacks, --workers 0 was Pool's own 'Number of processes must be at least 1', --seed -1 NumPy's 'expected non-negative
    integer' after the output folder was made."""
    out = tmp_path / "out"
    where = {"pretrain": "--work", "train-probes": "--out", "eval-base": "--out"}.get(argv[0], "--out")
    flag = argv[-2]
    with pytest.raises(SystemExit, match=f"^{flag} must be at least [01] \\(got -?[0-9]+\\)\\.$"):
        tw.main([*argv, where, str(out)])
    assert not out.exists()


def test_pretrain_data_renders_in_this_process_with_zero_workers(tmp_path):
    """--workers 0 renders here (a DataLoader's convention; no fork, so it runs where processes cannot), the same data."""
    tw.pretrain_data(str(tmp_path / "a"), 3, workers=0)
    tw.pretrain_data(str(tmp_path / "b"), 3, workers=2)
    (a, ca), (b, cb) = tw.load_pretrain_data(str(tmp_path / "a")), tw.load_pretrain_data(str(tmp_path / "b"))
    assert np.array_equal(a, b) and ca == cb
