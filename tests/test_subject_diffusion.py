"""Subject-Diffusion: the card's identities (methods/subject_diffusion.md §11), the data format, DDP and resume."""

import copy
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_XL, assert_close
from PIL import Image

import sd_model as sdm
import subject_diffusion as sdx
import toy_world as tw
import weights_convert as wc

VISION = sdm.CLIPVisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64, projection_dim=64)
FAST = ["--mixed-precision", "no", "--num-workers", "0", "--min-box-area", "0.01", "--learning-rate", "1e-3",
        "--lr-warmup-steps", "0", "--max-grad-norm", "1.0", "--train-batch-size", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SD (every weight perturbed so every path counts), its folder, and toy records."""
    torch.manual_seed(0)
    sd = sdm.StableDiffusion(sdm.TINY).eval().requires_grad_(False)
    vision = sdm.CLIPVisionModel(VISION).eval().requires_grad_(False)
    with torch.no_grad():
        for p in [*sd.unet.parameters(), *vision.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("sdx")
    parts = {p: getattr(sd, p).state_dict() for p in ("unet", "vae", "text_encoder")}
    wc.write_parts(root / "model", sdm.TINY, {**parts, "image_encoder": vision.state_dict()}, VISION)
    tw.make_records(str(root / "tars"), 16, shard_size=8)
    tw.make_records(str(root / "loose"), 16)
    return sd, vision, root


def method_for(sd, vision, seed=1, perturb=False):
    torch.manual_seed(seed)
    m = sdx.SubjectDiffusion(sd.unet, sd.text_encoder, vision.cfg)
    if perturb:  # leave the zero init: gates open, deltas and null features non-zero
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not name.startswith("text_encoder"):
                    p.add_(0.1 * torch.randn_like(p))
    return m


def records(root, sub="tars", **kw):
    cfg = sdx.TrainConfig(data=[str(root / sub)], min_box_area=0.01, **kw)
    return sdx.Records(cfg.data, cfg, 32, 16, 4, 32, 49407, verbose=False)


def test_fuser_is_the_identity_at_init():
    torch.manual_seed(0)
    f = sdx.GatedSelfAttentionDense(32, 16, 2, 16)
    x, objs = torch.randn(2, 10, 32), torch.randn(2, 6, 16)
    assert torch.equal(f(x, objs), x) and torch.equal(f(x, torch.zeros_like(objs)), x)
    with torch.no_grad():
        f.alpha_attn.fill_(0.7), f.alpha_dense.fill_(-0.3)
    assert not torch.allclose(f(x, objs), x)
    f.scale = 0.0
    assert torch.equal(f(x, objs), x)


def test_whole_unet_equals_the_base_model_at_init_and_the_backbone_is_never_changed(tiny):
    sd, vision, _ = tiny
    method = method_for(sd, vision)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    z, ctx, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g), torch.tensor([5, 900])
    plain = sd.unet(z, t, ctx)
    for m, objs in ((torch.rand(2, 1, 16, 16, generator=g), torch.randn(2, 32, 64, generator=g)),
                    (torch.zeros(2, 1, 16, 16), torch.zeros(2, 32, 64))):
        with sdx.install(method, sd.unet, {"objs": objs}):
            assert torch.equal(sd.unet(torch.cat([z, m], 1), t, ctx), plain)
        with sdx.install(method, sd.unet, {"objs": objs, "maps": {}}) as cond:  # explicit softmax on the loss layers
            assert_close(sd.unet(torch.cat([z, m], 1), t, ctx), plain, what="with attention maps")
        assert sorted(cond["maps"]) == sorted(method.loss_layers) and len(method.loss_layers) == 4
    with sdx.install(method, sd.unet, {"objs": objs}), pytest.raises(ValueError, match="1 location channel"):
        sd.unet(z, t, ctx)
    assert torch.equal(sd.unet(z, t, ctx), plain)  # hooks gone
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())


def test_widened_conv_in_and_the_official_layout_round_trip(tiny, tmp_path):
    sd, vision, _ = tiny
    base = sd.unet.state_dict()
    w = sdx.widened_state_dict(method_for(sd, vision), sd.unet)
    assert w["input_blocks.0.0.weight"].shape == (32, 5, 3, 3)
    assert torch.equal(w["input_blocks.0.0.weight"][:, :4], base["input_blocks.0.0.weight"])
    assert not w["input_blocks.0.0.weight"][:, 4:].any() and torch.equal(w["input_blocks.0.0.bias"], base["input_blocks.0.0.bias"])
    trained = method_for(sd, vision, perturb=True)
    w = sdx.widened_state_dict(trained, sd.unet)
    x = torch.randn(2, 5, 16, 16)
    with sdx.install(trained, sd.unet, {}):  # the hooked conv is exactly the widened conv
        assert_close(sd.unet.input_blocks[0][0](x), torch.nn.functional.conv2d(
            x, w["input_blocks.0.0.weight"], w["input_blocks.0.0.bias"], padding=1), what="widened conv_in")
    assert {k for k in w if ".fuser." in k} == {f"{b}.fuser.{k}" for b in trained.block_names for k in trained.fuser[sdx._key(b)].state_dict()}
    sdx.export_official(trained, sd.unet, tmp_path / "export", {"drop_objects": "True", "base_model": "m", "seed": "1"})
    back = method_for(sd, vision, seed=5)
    sdx.import_official(back, sd.unet, tmp_path / "export")
    for k, v in trained.state_dict().items():
        assert_close(back.state_dict()[k], v, rtol=1e-6, atol=1e-7, what=k)
    meta = sdx.official_metadata(tmp_path / "export")  # our export keeps how it was trained ...
    assert meta["drop_objects"] == "True" and meta["base_model"] == "m" and "seed" not in meta
    # ... and the official train.py's own saves (unet_{ep}_{step}/pytorch_model.bin, card §7.2): the latest
    # one loads, and its unconditional branch is the code's (objects never dropped in its training, §9.7)
    from safetensors.torch import load_file
    official = tmp_path / "official"
    for ep, step, src in ((0, 4999, back), (1, 449999, trained)):
        other = method_for(sd, vision, seed=9) if src is back else src
        sdx.export_official(other, sd.unet, tmp_path / f"tmp{step}")
        for part in sdx.OFFICIAL_PARTS:
            (official / f"{part}_{ep}_{step}").mkdir(parents=True)
            torch.save(load_file(str(tmp_path / f"tmp{step}" / part / "model.safetensors")),
                       official / f"{part}_{ep}_{step}" / "pytorch_model.bin")
    assert sdx.official_parts(official)["proj"] == official / "proj_1_449999"
    again = method_for(sd, vision, seed=5)
    sdx.import_official(again, sd.unet, official)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in back.state_dict().items())
    assert sdx.official_metadata(official) == {"drop_objects": "False"} and sdx.official_parts(tmp_path / "none") == {}


def test_official_layout_weights_that_do_not_fit_the_base_model_give_one_sentence(tiny, tmp_path):
    """An official-layout folder with a key missing or of another shape (another base model) is a ValueError,
    which the command line prints as one sentence, as it does for our own files; not a KeyError or RuntimeError."""
    from safetensors.torch import load_file, save_file

    sd, vision, root = tiny
    trained = method_for(sd, vision, perturb=True)
    for name, change in (("missing", lambda u: u.pop("input_blocks.0.0.bias")),
                         ("shape", lambda u: u.update({k: v[:, :-1].contiguous() for k, v in u.items() if k.endswith("attn2.to_k.weight")})),
                         ("fuser", lambda u: u.pop(next(k for k in u if ".fuser.alpha_attn" in k)))):
        folder = tmp_path / name
        sdx.export_official(trained, sd.unet, folder, {"base_model": str(root / "model")})
        unet = load_file(str(folder / "unet" / "model.safetensors"))
        change(unet)
        save_file(unet, str(folder / "unet" / "model.safetensors"))
        with pytest.raises(ValueError, match="do not fit this base model"):
            sdx.load_trained(folder)
    sdx.export_official(trained, sd.unet, tmp_path / "ok", {"base_model": str(root / "model")})
    assert sdx.load_trained(tmp_path / "ok")[2].conv_in.weight.abs().sum() > 0  # the unchanged export loads
    assert sdx.load_trained(tmp_path / "ok", precision="bf16")[2].conv_in.weight.abs().sum() > 0  # also on a rounded base
    # the same shapes, another base model's frozen weights: the deltas were put on this base silently
    other = copy.deepcopy(sd.unet)
    with torch.no_grad():
        other.output_blocks[-1][0].in_layers[0].weight.add_(0.01)
    sdx.export_official(trained, other, tmp_path / "other", {"base_model": str(root / "model")})
    with pytest.raises(ValueError, match=r"frozen weights \(output_blocks.*\) are not this base model's"):
        sdx.load_trained(tmp_path / "other")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_official_layout_weights_load_onto_a_base_on_the_gpu(tiny, tmp_path):
    """The file is read on the CPU, the base model sits on the GPU: the deltas were a device error, reported as
    weights that do not fit the base model."""
    sd, vision, root = tiny
    trained = method_for(sd, vision, perturb=True)
    sdx.export_official(trained, sd.unet, tmp_path / "ok", {"base_model": str(root / "model")})
    back = sdx.load_trained(tmp_path / "ok", device="cuda")[2]
    assert_close(back.conv_in.weight.cpu(), trained.conv_in.weight, what="conv_in delta")


def test_the_official_codes_diffusers_keyed_unet_loads(tiny, tmp_path):
    """train.py saves `self.unet.state_dict()` of its diffusers copy: diffusers block names, and each block's
    adapter as `...transformer_blocks.0.fuser.{linear, attn.to_q, ff.net.0.proj, norm1, alpha_attn, ...}`
    (third_party/attention.py). Such a save, with the other three parts, loads to the same weights."""
    from diffusers import UNet2DConditionModel

    sd, vision, _ = tiny
    trained = method_for(sd, vision, perturb=True)
    ucfg = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8, in_channels=5,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    with torch.device("meta"):
        names = list(UNet2DConditionModel(**ucfg).state_dict())
    to_diffusers = wc.diffusers_unet_to_ldm({k: k for k in names}, sd.unet.cfg)  # LDM name -> diffusers name
    widened, unet = sdx.widened_state_dict(trained, sd.unet), {}
    for k, v in widened.items():
        block, fuser, rest = k.partition(".fuser.")
        unet[to_diffusers[block + ".attn1.to_q.weight"].removesuffix("attn1.to_q.weight") + "fuser." + rest if fuser
             else to_diffusers[k]] = v
    assert len(unet) == len(widened) == len(names) + sum(len(f.state_dict()) for f in trained.fuser.values())
    folder = tmp_path / "run"
    for part, state in (("unet", unet), ("clip_text", trained.text_encoder.state_dict()), ("mlp", trained.mlp.state_dict()),
                        ("proj", trained.grounding.state_dict())):
        (folder / f"{part}_0_4999").mkdir(parents=True)
        torch.save(state, folder / f"{part}_0_4999" / "pytorch_model.bin")
    back = method_for(sd, vision, seed=5)
    sdx.import_official(back, sd.unet, folder)
    for k, v in trained.state_dict().items():
        assert_close(back.state_dict()[k], v, rtol=1e-6, atol=1e-7, what=k)


def test_fourier_layout():
    b = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]])
    g = sdx.fourier_embed(b)
    assert g.shape == (1, 2, 64)
    assert torch.allclose(g[0, 0, 0], torch.sin(b[0, 0, 0])) and torch.allclose(g[0, 0, 4], torch.cos(b[0, 0, 0]))
    assert torch.allclose(g[0, 1, 8 + 3], torch.sin(100 ** (1 / 8) * b[0, 1, 3]))  # frequency-major, sin then cos
    assert torch.allclose(g[0, 0, 56 + 4 + 2], torch.cos(100 ** (7 / 8) * b[0, 0, 2]))


def test_grounding_net_slots_are_independent():
    torch.manual_seed(0)
    net = sdx.GroundingNet(8, 16, 4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    tok, box = torch.randn(1, 2, 4, 8), torch.rand(1, 2, 4)
    tok2, box2 = tok.clone(), box.clone()
    tok2[:, 1], box2[:, 1] = torch.randn(4, 8), torch.rand(4)
    one = torch.tensor([[True, False]])
    assert net(tok, one, box).shape == (1, 8, 16)
    assert torch.equal(net(tok, one, box), net(tok2, one, box2))  # an absent slot is its null features only
    both = torch.tensor([[True, True]])
    a, b = net(tok, both, box), net(tok, both, box2)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4:], b[:, 4:])  # a box moves its own 256
    box3 = box.clone()
    box3[:, 0] = torch.rand(4)
    no_pos = one & False  # use_bbox=False with one subject: null position feature, box ignored
    assert torch.equal(net(tok, one, box, no_pos), net(tok, one, box3, no_pos))
    assert not torch.allclose(net(tok, one, box), net(tok, one, box3))


def test_text_injection_order_count_and_position(tiny):
    sd, vision, _ = tiny
    method, tok = method_for(sd, vision), sd.tokenizer
    assert tok.token_id("sks") == sdx.SKS_ID == 48136
    ids = tok(["a dog and a cat, the dog is sks, the cat is sks", "a cat, the cat is sks"])
    plain = tok(["a dog on the grass"])
    assert torch.equal(method.encode_text(plain), sd.text_encoder(plain)[0])  # the copy starts as the base encoder
    cls = torch.randn(2, 2, 64)
    valid = torch.tensor([[True, True], [False, True]])
    seen = {}
    h = method.text_encoder.text_model.encoder.layers[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    method.encode_text(ids, cls, valid)
    h.remove()
    pos = method.text_encoder.text_model.embeddings.position_embedding.weight
    sks = [(ids[r] == 48136).nonzero().flatten().tolist() for r in range(2)]
    for r, k, slot, word in ((0, 0, 0, "dog"), (0, 1, 1, "cat"), (1, 0, 1, "cat")):  # k-th "sks" of a row <- its k-th valid subject
        i = sks[r][k]
        assert_close(seen["x"][r, i], cls[r, slot] + pos[i], what=f"row {r} sks {k}")
        assert tok.decode([ids[r, i - 2].item()]) == word  # the entity word the localisation loss reads
    assert_close(seen["x"][0, 1], method.text_encoder.embed(ids)[0, 1] + pos[1], what="other tokens untouched")
    with pytest.raises(ValueError, match="1 'sks' token.*2 subject"):
        method.encode_text(ids, cls, torch.tensor([[True, True], [True, True]]))


def test_records_read_folders_and_shards_alike_and_index_the_prompt(tiny):
    _, _, root = tiny
    a, b = records(root, "tars"), records(root, "loose")
    assert len(a) == len(b) == 16 and len(a.shards) == 2 and len(b.shards) == 1
    for item in ((0, 0, 0), (5, 1, 7)):
        x, y = a[item], b[item]
        assert all(torch.equal(x[k], y[k]) for k in x)
    s = a[(3, 0, 3)]
    tokens = sdm.CLIPTokenizer()
    n = int(s["valid"].sum())
    for k in range(n):
        assert s["ids"][s["sks_idx"][k]] == 48136
        assert s["segmaps"][k].sum() > 0 and ((s["location"] == 0) | (s["location"] == 1)).all()
    assert (s["sks_idx"][n:] == 0).all() and not s["valid"][n:].any()
    text = tokens.decode(s["ids"].tolist())
    assert text.count(" is sks") == n and s["entity"].shape == (2, 3, 32, 32)


def test_bad_records_and_shards_are_skipped_and_counted(tiny, tmp_path, capsys):
    _, _, root = tiny
    src = root / "loose"
    good = json.loads((src / "000000.json").read_text())
    for key, rec in (("a_nobox", {**good, "objects": []}),
                     ("b_outside", {**good, "objects": [{**good["objects"][0], "box": [70, 70, 90, 90]}]}),
                     ("c_noword", {**good, "objects": [{**good["objects"][0], "label": "zebra"}]}),
                     ("d_good", good),
                     ("e_three", {**good, "objects": [{**good["objects"][0], "value": None, "box": b} for b in
                                                     ([0, 0, 16, 16], [40, 0, 56, 16], [0, 40, 16, 56])]}),
                     ("f_tall", {**good, "objects": [{**good["objects"][0], "value": None, "box": [10, 10, 26, 60]}]}),
                     ("g_tall_first", {**good, "objects": [{**good["objects"][0], "value": None, "box": b} for b in
                                                          ([10, 10, 26, 60], [40, 0, 56, 16], [40, 40, 56, 56])]})):
        (tmp_path / f"{key}.json").write_text(json.dumps(rec))
        (tmp_path / f"{key}.png").write_bytes((src / "000000.png").read_bytes())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "00000.tar").write_bytes(b"not a tar file at all" * 10)
    cfg = sdx.TrainConfig(data=[str(tmp_path), str(tmp_path / "broken")], min_box_area=0.01)
    data = sdx.Records(cfg.data, cfg, 32, 16, 4, 32, 49407)
    assert data.bad_shards == [str(tmp_path / "broken" / "00000.tar")] and len(data) == 7
    s = data[(0, 0, 0)]  # a_nobox hands over to b, c (no usable subject), then d
    counts = dict(zip(sdx.SKIPS, s["skips"].tolist()))
    assert counts["no_boxes"] == 1 and counts["box_outside"] == 1 and counts["entity_missing"] == 1 and counts["no_subject"] == 2
    assert s["valid"][0] and torch.equal(s["pixels"], data[(3, 0, 0)]["pixels"])
    three = data[(4, 0, 0)]  # three usable subjects: the first two are kept, the third is counted
    assert three["valid"].all() and dict(zip(sdx.SKIPS, three["skips"].tolist()))["extra_subjects"] == 1
    # w/h = 16/50 = 0.32 passes verify_keys' w/h in (0.3, 3) but not post_bbox_filter's h/w = 3.1 < 3 (card §7.4)
    tall = dict(zip(sdx.SKIPS, data[(5, 0, 0)]["skips"].tolist()))  # hands over to g, whose first box is as tall
    assert tall["no_subject"] == 1 and tall["box_filtered"] == 2
    first = data[(6, 0, 0)]  # post_verify keeps the first two that pass its checks, not the first two candidates
    counts = dict(zip(sdx.SKIPS, first["skips"].tolist()))
    assert first["valid"].all() and counts["box_filtered"] == 1 and counts["extra_subjects"] == 0
    assert torch.allclose(first["boxes"][0], torch.tensor([40, 0, 56, 16]) / 64)
    err = capsys.readouterr().err
    assert "not a readable tar file" in err and "no object boxes" in err and "outside its image" in err


def test_malformed_json_boxes_and_masks_are_skipped_and_counted_never_a_traceback(tiny, tmp_path):
    """A hand-written json can hold anything: boxes of strings, of 3 numbers or nested, objects that are not dicts,
    a json that is a list, an RGB or resized mask, a value that is no label. Each record is read or skipped and
    counted, both as a training record and as another record's background (which `subjects` never vetted)."""
    _, _, root = tiny
    src = root / "loose"
    good = json.loads((src / "000000.json").read_text())
    o, lab = good["objects"][0], np.asarray(Image.open(src / "000000.mask.png"))
    cases = {"a_strings": ({**good, "objects": [{**o, "box": ["a", "b", "c", "d"]}]}, lab),
             "b_nested": ({**good, "objects": [{**o, "box": [1, 2, [3], 4]}]}, lab),
             "c_short": ({**good, "objects": [o, {**o, "box": [1, 2, 3]}]}, None),
             "d_not_dict": ({**good, "objects": [o, 5]}, None),
             "e_list": ([1, 2], None),
             "f_rgb_mask": (good, np.stack([lab] * 3, -1)),
             "g_small_mask": (good, lab[:32, :32].copy()),
             "h_list_value": ({**good, "objects": [{**o, "value": [1, 2]}]}, lab),
             "i_good": (good, lab)}
    for key, (rec, mask) in cases.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(rec))
        (tmp_path / f"{key}.png").write_bytes((src / "000000.png").read_bytes())
        if mask is not None:
            Image.fromarray(mask).save(tmp_path / f"{key}.mask.png")
    cfg = sdx.TrainConfig(data=[str(tmp_path)], min_box_area=0.01)
    data = sdx.Records(cfg.data, cfg, 32, 16, 4, 32, 49407, verbose=False)
    samples = [data[(i, 0, i)] for i in range(len(cases))]  # a skipped record hands over to the next one
    counts = [{k: int(v) for k, v in zip(sdx.SKIPS, s["skips"].tolist()) if v} for s in samples]
    assert counts == [{"box_outside": 3, "no_subject": 2}, {"box_outside": 2, "no_subject": 1}, {"box_outside": 1},
                      {"box_outside": 1}, {"unreadable": 1, "bad_mask": 2}, {"bad_mask": 2}, {"bad_mask": 1}, {}, {}]
    assert all(s["valid"][0] for s in samples)
    a, b, c, d = (samples[7]["boxes"][0] * 32).round().int().tolist()  # a value that is no label: the box is the mask
    box_mask = torch.zeros(32, 32)
    box_mask[b:d, a:c] = 1
    assert torch.equal(samples[7]["segmaps"][0], box_mask)
    draws = {int(np.random.default_rng(s).integers(len(data))) for s in range(60)}  # background()'s first draw
    assert draws == set(range(len(cases)))
    assert all(data.background(np.random.default_rng(s)).shape == (32, 32, 3) for s in range(60))


def test_the_official_labellers_json_reads_as_it_is(tiny, tmp_path):
    """The official labeller writes {"caption", "mask": [{"value": 0, "label": "background"}, {"value", "label",
    "logit", "box"}, ...]} (card §7.4): its list is read as "objects", its background entry is no object (not a
    box outside the image), boxes at logit <= 0.3 are filtered, and candidates go by descending logit."""
    _, _, root = tiny
    src = root / "loose"
    good = json.loads((src / "000000.json").read_text())
    o = {**good["objects"][0], "value": None}
    boxes = {"low": [0, 0, 16, 16], "mid": [40, 0, 56, 16], "high": [0, 40, 16, 56]}
    official = {"caption": good["caption"], "mask": [{"value": 0, "label": "background"},
                                                      {**o, "box": boxes["low"], "logit": 0.25},
                                                      {**o, "box": boxes["mid"], "logit": 0.5},
                                                      {**o, "box": boxes["high"], "logit": 0.9}]}
    (tmp_path / "a.json").write_text(json.dumps(official))
    (tmp_path / "a.png").write_bytes((src / "000000.png").read_bytes())
    cfg = sdx.TrainConfig(data=[str(tmp_path)], min_box_area=0.01)
    s = sdx.Records(cfg.data, cfg, 32, 16, 4, 32, 49407, verbose=False)[(0, 0, 0)]
    counts = {k: int(v) for k, v in zip(sdx.SKIPS, s["skips"].tolist()) if v}
    assert counts == {"box_filtered": 1}  # the 0.25 box; the background entry is not counted
    assert s["valid"].all()
    for k, name in enumerate(("high", "mid")):  # "high" first although the json lists it last
        assert torch.allclose(s["boxes"][k], torch.tensor(boxes[name]) / 64)


def test_the_official_labellers_jpg_photo_and_png_label_map_read_like_our_png_and_mask(tiny, tmp_path):
    """The official labeller's record is `key.jpg` (the photo), `key.png` (the palettised label map) and
    `key.json` (card §7.4); loose or in a shard, it reads as our `key.png` + `key.mask.png` of the same pixels."""
    _, _, root = tiny
    src = root / "loose"
    photo = io.BytesIO()
    Image.open(src / "000000.png").convert("RGB").save(photo, format="JPEG", quality=90)
    ours, official = tmp_path / "ours", tmp_path / "official"
    ours.mkdir(), official.mkdir()
    Image.open(io.BytesIO(photo.getvalue())).save(ours / "a.png")
    for folder in (ours, official):
        (folder / "a.json").write_text((src / "000000.json").read_text())
    (ours / "a.mask.png").write_bytes((src / "000000.mask.png").read_bytes())
    (official / "a.JPG").write_bytes(photo.getvalue())  # an upper-case extension, as cameras write them
    (official / "a.png").write_bytes((src / "000000.mask.png").read_bytes())
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for name, ext in (("a.JPG", "jpg"), ("a.png", "png"), ("a.json", "json")):
            tf.add(official / name, arcname=f"a.{ext}")
    cfg = sdx.TrainConfig(data=[str(ours)], min_box_area=0.01)
    want = sdx.Records([str(ours)], cfg, 32, 16, 4, 32, 49407, verbose=False)[(0, 0, 0)]
    a, b, c, d = (want["boxes"][0] * 32).round().int().tolist()
    assert want["segmaps"][0][b:d, a:c].mean() < 1  # the label map's shape, not the box
    for data in ([str(official)], [str(tmp_path / "00000.tar")]):
        got = sdx.Records(data, cfg, 32, 16, 4, 32, 49407, verbose=False)[(0, 0, 0)]
        assert not got["skips"].any() and all(torch.equal(got[k], want[k]) for k in want), data


def test_16_bit_and_rgba_record_images_read_as_sd_model_reads_images(tiny, tmp_path):
    """16-bit scaled to 8 bits (PIL's convert would clip them to white), transparency on white (convert drops it)."""
    _, _, root = tiny
    src = root / "loose"
    rgb = np.asarray(Image.open(src / "000000.png").convert("RGB"))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:, :20] = 0
    on_white = np.where(alpha[..., None] > 0, rgb, 255).astype(np.uint8)
    pngs = {"gray8": Image.fromarray(gray), "gray16": Image.fromarray(gray.astype(np.uint16) * 257),
            "rgba": Image.fromarray(np.dstack([rgb, alpha])), "white": Image.fromarray(on_white)}
    pixels = {}
    for name, img in pngs.items():
        (tmp_path / name).mkdir()
        img.save(tmp_path / name / "r.png")
        for ext in ("json", "mask.png"):
            (tmp_path / name / f"r.{ext}").write_bytes((src / f"000000.{ext}").read_bytes())
        pixels[name] = records(tmp_path, name)[(0, 0, 0)]["pixels"]
    assert Image.open(tmp_path / "gray16" / "r.png").mode == "I;16"
    assert_close(pixels["gray16"], pixels["gray8"], rtol=0, atol=1.01 / 127.5, what="16-bit record image")
    assert torch.equal(pixels["rgba"], pixels["white"])


def test_location_mask_is_zero_on_the_union_of_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]])
    m = sdx.location_mask(boxes, torch.tensor([[True, True]]), (16, 16), (8, 8))[0, 0]
    want = torch.ones(8, 8)
    want[0:4, 0:4] = 0
    want[2:6, 2:6] = 0
    assert torch.equal(m, want)
    only_first = sdx.location_mask(boxes, torch.tensor([[True, False]]), (16, 16), (8, 8))[0, 0]
    assert only_first.sum() == 64 - 16
    assert sdx.location_mask(boxes, torch.tensor([[False, False]]), (16, 16), (4, 4)).eq(1).all()


def test_localization_loss_limits():
    side, b, heads = 4, 1, 2
    seg = torch.zeros(b, 2, side, side)
    seg[:, 0, :2], seg[:, 1, :, :2] = 1, 1
    idx, valid = torch.tensor([[10, 20]]), torch.tensor([[True, False]])

    def maps(fill):
        p = torch.full((b, heads, side * side, 77), 0.01)
        for k, j in ((0, 10), (0, 8)):  # the "sks" token and the entity word 2 before it
            p[..., j] = fill(seg[:, k].flatten(1))[:, None]
        return {"layer": p}

    inside = sdx.localization_loss(maps(lambda m: m), seg, idx, valid)
    outside = sdx.localization_loss(maps(lambda m: 1 - m), seg, idx, valid)
    const = sdx.localization_loss(maps(lambda m: torch.full_like(m, 0.3)), seg, idx, valid)
    assert abs(inside + 1) < 1e-4 and abs(outside - 1) < 1e-4 and abs(const) < 1e-4
    mixed = {"a": maps(lambda m: m)["layer"], "b": maps(lambda m: 1 - m)["layer"]}
    assert abs(sdx.localization_loss(mixed, seg, idx, valid)) < 1e-4  # the mean over layers
    assert sdx.localization_loss(maps(lambda m: m), seg, idx, valid & False) == 0  # invalid slots count 0


def test_dropout_frequencies_and_what_each_branch_gets(tiny, monkeypatch):
    r = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    text, loc = sdx.dropout_masks(r, sdx.TrainConfig())
    for got in ((text & ~loc).float().mean(), (text & loc).float().mean(), (~text & loc).float().mean()):
        assert abs(got - 0.05) < 0.004
    sd, vision, root = tiny
    method, data = method_for(sd, vision, perturb=True), records(root)
    batch = torch.utils.data.default_collate([data[(i, 0, i)] for i in range(4)])
    batch["r"] = torch.tensor([0.01, 0.07, 0.12, 0.5])  # text / text + location / location / nothing
    batch["valid"][:, 0] = True
    seen = {}
    monkeypatch.setattr(sdx, "localization_loss", lambda maps, seg, idx, valid: seen.update(valid=valid) or torch.tensor(0.0))
    h1 = sd.unet.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], ctx=a[2]))
    h2 = method.fuser[sdx._key(method.block_names[0])].register_forward_pre_hook(lambda m, a: seen.update(objs=a[1]))
    empty = sd.tokenize([""])
    for drop_objects in (True, False):
        with sdx.install(method, sd.unet, {}) as cond:
            sdx.training_loss(method, sd, vision, batch, sdx.TrainConfig(drop_objects=drop_objects), empty, cond)
        null = method.encode_text(empty)[0]
        assert [torch.equal(seen["ctx"][i], null) for i in range(4)] == [True, True, False, False]
        assert [bool(seen["x"][i, 4].eq(0).all()) for i in range(4)] == [False, True, True, False]
        assert not seen["valid"][:2].any() and seen["valid"][2:, 0].all()
        valid = batch["valid"] & torch.tensor([[1], [0], [0], [1]], dtype=torch.bool) if drop_objects else batch["valid"]
        tokens = vision(vision.preprocess(batch["entity"].flatten(0, 1)))[0].unflatten(0, (4, 2))
        assert_close(seen["objs"], method.grounding(tokens, valid, batch["boxes"]), what="objs")
    h1.remove(), h2.remove()


def test_guidance_algebra():
    c, i, u = torch.randn(3, 2, 4, 8, 8)
    assert_close(sdx.guide(c, i, u, 1.0, 1.0), c)
    assert_close(sdx.guide(c, i, u, 1.0, 0.0), u + c - i)
    assert_close(sdx.guide(c, i, u, 7.5, 1.5), u + 7.5 * (c - i) + 1.5 * (i - u))


def test_trainable_set_and_parameter_counts_on_sd2_base():
    with torch.device("meta"):
        unet, text = sdm.UNetModel(sdm.SD21_BASE.unet), sdm.CLIPTextModel(sdm.SD21_BASE.text)
        vit_h = sdm.CLIPVisionConfig(224, 14, 1280, 32, 16, 5120, "gelu", 1024)  # OpenCLIP ViT-H/14
        m = sdx.SubjectDiffusion(unet, text, vit_h)
    count = lambda prefix: sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))
    assert count("fuser.") == 211_213_152 and len(m.fuser) == 16
    assert count("grounding.") == 2_773_632 and count("mlp.") == 2_101_248 and count("conv_in.") == 14_720
    assert count("kv.") == 25_559_040 and all(k.endswith(("attn2_to_k", "attn2_to_v")) for k in m.kv)
    assert count("text_encoder.") == 340_387_840
    assert all(p.requires_grad for p in m.parameters())
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {"conv_in", "kv", "fuser", "grounding", "mlp", "text_encoder"}
    layers = {l.name: l.res for l in sdm.attention_layers(unet)}
    assert len(m.loss_layers) == 11 and [layers[n] for n in m.loss_layers] == [32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32]
    blocks = ["input_blocks.4", "input_blocks.5", "input_blocks.7", "input_blocks.8", "middle_block", *(f"output_blocks.{i}" for i in range(3, 9))]
    assert m.loss_layers == [f"{b}.1.transformer_blocks.0.attn2" for b in blocks]  # down_blocks.1-2, mid, up_blocks.1-2


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    sd, vision, root = tiny
    method, data = method_for(sd, vision, perturb=True), records(root)
    batch = torch.utils.data.default_collate([data[(i, 0, i)] for i in range(2)])
    batch["r"] = torch.tensor([0.5, 0.9])
    out = []
    for ckpt in (False, True):
        sd.unet.gradient_checkpointing = ckpt
        method.zero_grad()
        with sdx.install(method, sd.unet, {}) as cond:  # open over the backward: checkpointing re-runs the hooks
            loss, _, attn = sdx.training_loss(method, sd, vision, batch, sdx.TrainConfig(), sd.tokenize([""]), cond)
            loss.backward()
        out.append((loss.detach(), attn, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}))
    sd.unet.gradient_checkpointing = False
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] != 0
    assert out[0][2].keys() == out[1][2].keys() and any(k.startswith("kv.") for k in out[0][2])
    for k, g in out[0][2].items():
        assert_close(out[1][2][k], g, rtol=1e-5, atol=1e-8, what=k)


def train_cli(args, procs=1):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []),
           str(ROOT / "subject_diffusion.py"), "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(folder):
    from safetensors.torch import load_file

    return {**load_file(str(folder / "subject_diffusion.safetensors")), **load_file(str(folder / "text_encoder.safetensors"))}


def test_two_processes_under_torchrun_equal_one_process_with_the_same_global_batch(tiny, tmp_path):
    _, _, root = tiny
    common = ["--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "2",
              "--checkpointing-steps", "0", *FAST]
    train_cli([*common, "--output-dir", str(tmp_path / "two")], procs=2)  # 2 x 2
    train_cli([*common, "--output-dir", str(tmp_path / "one"), "--train-batch-size", "4"])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Float sums differ in order (an all-reduce of two means vs one mean), nothing else. Measured over the
    # 3.6M entries: max 1.2e-6, 1 entry above 1e-6. One process at batch 2 (a wrong global batch) differs by
    # max 4.0e-3 (= 2 steps x 2 x lr: any two runs are that close) in 477k entries, so both bounds can fail,
    # and the max also catches a few unsynchronised tensors (the 2 x 16 gate scalars) that the count would not.
    # And the runs did move: most K/V delta entries (zero at the start) are far above that 1e-6.
    assert (diffs > 1e-6).sum() <= 1e-4 * len(diffs) and diffs.max() < 2e-5
    kv = torch.cat([a[k].flatten() for k in a if k.startswith("kv.")])
    assert (kv.abs() > 1e-5).float().mean() > 0.5
    log = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    for x, y in zip(log("one"), log("two")):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["attn"] - y["attn"]) < 1e-6
    assert len(log("two")) == 2 and any(a[k].abs().sum() > 0 for k in a if k.startswith("kv."))
    (tmp_path / "nothing").mkdir()  # bad data under DDP: each process says so and exits (rank 0 used to raise alone)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "subject_diffusion.py"),
           "train", *common[:2], "--data", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "none"), *FAST]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode and "error: no training records in" in r.stderr
    # a record that fails on one process alone, at step 1: every process stops with its sentence (rank 0 waited in the
    # gradient all-reduce for a process that had gone: a gloo "Connection closed by peer" traceback; NCCL hangs)
    (tmp_path / "one_rank.py").write_text(
        "import os, sys\nsys.path.insert(0, sys.argv.pop(1))\nimport subject_diffusion as sdx\n"
        "def make(self, i, rng, skips):\n    raise ValueError('record 3 is unreadable on this node.')\n"
        "if os.environ['RANK'] == '1':\n    sdx.Records.make = make\nsdx.main(sys.argv[1:])\n")
    cmd = [*cmd[:5], str(tmp_path / "one_rank.py"), str(ROOT), "train", *common, "--output-dir", str(tmp_path / "one_rank")]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode and r.stderr.count("error: record 3 is unreadable on this node.") == 2, r.stderr[-3000:]
    assert "Connection closed by peer" not in r.stderr
    # an elastic resume: steps 1-2 on 2 processes x 2, then 3-4 on 1 x 4 (the global batch kept) continue the run:
    # each process starts at its share of the global order (it started at its own count: records were replayed)
    more = [*common[:4], "--max-train-steps", "4", *FAST]
    train_cli([*more, "--output-dir", str(tmp_path / "el"), "--max-train-steps", "2", "--checkpointing-steps", "2"], procs=2)
    r = subprocess.run([sys.executable, str(ROOT / "subject_diffusion.py"), "train", *more, "--output-dir", str(tmp_path / "el"),
                        "--resume", "latest"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode and "trained on 2 process(es) x --train-batch-size 2 and this run is 1 x 2" in r.stderr
    assert "(--train-batch-size 4)" in r.stderr
    train_cli([*more, "--output-dir", str(tmp_path / "el"), "--train-batch-size", "4", "--resume", "latest"])
    train_cli([*more, "--output-dir", str(tmp_path / "one4"), "--train-batch-size", "4", "--checkpointing-steps", "0"])
    a, b = weights(tmp_path / "one4"), weights(tmp_path / "el")
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-6).sum() <= 1e-4 * len(diffs) and diffs.max() < 2e-5
    # the checkpoint says its own layout: el/args.json is now the 1 x 4 start's, and checkpoint-2 still resumes on 1 x 4
    train_cli([*more, "--output-dir", str(tmp_path / "el2"), "--train-batch-size", "4", "--resume", str(tmp_path / "el" / "checkpoint-2")])
    assert all(torch.equal(x, y) for x, y in zip(weights(tmp_path / "el2").values(), b.values()))


def _two_processes(fn, tmp_path):
    """fn(rank) -> list on two forked processes joined by gloo; their lists, in rank order."""
    import torch.distributed as dist

    ctx, port = torch.multiprocessing.get_context("fork"), tmp_path / "rendezvous"
    q = ctx.Queue()

    def run(rank):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{port}", rank=rank, world_size=2)
        q.put((rank, fn(rank)))
        dist.destroy_process_group()

    procs = [ctx.Process(target=run, args=(r,)) for r in range(2)]
    [p.start() for p in procs]
    got = dict(q.get(timeout=60) for _ in procs)
    [p.join(timeout=60) for p in procs]
    return [got[0], got[1]]


def test_a_failure_on_one_process_stops_every_process_with_its_sentence(tmp_path):
    """`together`: a check or read that fails on one process alone is raised on all of them (a ValueError stays one,
    for main() to print), so no process is left waiting in its next collective; the collectives stay paired."""
    import torch.distributed as dist

    def steps(rank):
        said = []
        for fail, kind in ((None, None), (1, ValueError), (0, RuntimeError), (None, None)):
            try:
                with sdx.together(2, "cpu"):
                    if rank == fail:
                        raise kind("record 3 is unreadable.")
                said.append("ok")
            except Exception as e:  # noqa: BLE001
                said.append(f"{type(e).__name__}: {e}")
        x = torch.tensor([rank + 1.0])
        dist.all_reduce(x)  # still in step: 1 + 2
        return said + [x.item()]

    assert _two_processes(steps, tmp_path) == [
        ["ok", "ValueError: record 3 is unreadable.", "RuntimeError: record 3 is unreadable.", "ok", 3.0],
        ["ok", "ValueError: record 3 is unreadable.", "RuntimeError: process 0 stopped: RuntimeError: record 3 is unreadable.",
         "ok", 3.0]]


def test_an_sdxl_base_is_refused_before_anything_is_written(tiny, tmp_path):
    """The method is defined on SD 1.x/2.x UNets (no added vector condition, one text encoder): an SDXL base failed
    at train's step 1, after args.json was written, and sample/export failed late; now one sentence, nothing written."""
    _, _, root = tiny
    torch.manual_seed(0)
    xl = sdm.StableDiffusion(TINY_XL)
    wc.write_parts(tmp_path / "xl", TINY_XL, {p: getattr(xl, p).state_dict() for p in ("unet", "vae", "text_encoder", "text_encoder_2")})
    said = "is an SDXL model, and Subject-Diffusion runs on SD 1.x/2.x bases only"
    with pytest.raises(SystemExit, match=said):
        sdx.main(["train", "--pretrained-model", str(tmp_path / "xl"), "--data", str(root / "tars"), "--max-train-steps", "1",
                  *FAST, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    sd, vision, _ = tiny
    sdx.save_method(method_for(sd, vision), tmp_path / "w", {"base_model": str(root / "model")})
    ref = ROOT / "assets" / "readme" / "world.png"
    with pytest.raises(SystemExit, match=said):
        sdx.main(["sample", "--weights", str(tmp_path / "w"), "--pretrained-model", str(tmp_path / "xl"), "--subject", str(ref),
                  "--entity", "star", "--prompt", "a star", "--steps", "1", "--output-dir", str(tmp_path / "samples")])
    with pytest.raises(SystemExit, match=said):
        sdx.main(["export", "--weights", str(tmp_path / "w"), "--pretrained-model", str(tmp_path / "xl"), "--out", str(tmp_path / "exp")])
    assert not (tmp_path / "samples").exists() and not (tmp_path / "exp").exists()


def test_command_line_mistakes_found_by_use_are_one_sentence_and_write_nothing(tiny, tmp_path):
    """Each of these was a traceback, an unclear error, an error after args.json, or silently wrong output."""
    import shutil

    sd, vision, root = tiny
    train = ["train", "--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1", *FAST]
    (tmp_path / "file").write_text("x")
    for extra, said in ((["--output-dir", str(tmp_path / "file")], "is a file; choose another"),  # was '[Errno 17] File exists'
                        (["--output-dir", str(tmp_path / "t"), "--train-batch-size", "32"], r"fewer records \(16\) than one global batch")):
        with pytest.raises(SystemExit, match=said):
            sdx.main([*train, *extra])
    assert not (tmp_path / "t").exists()  # the batch check came after args.json, and the shard index was written before it
    w = tmp_path / "w"
    sdx.save_method(method_for(sd, vision), w / "checkpoint-3", {"base_model": str(root / "model"), "step": "3"})
    ref = ROOT / "assets" / "readme" / "world.png"
    sample = ["sample", "--subject", str(ref), "--entity", "star", "--prompt", "a star", "--steps", "1", "--output-dir", str(tmp_path / "s")]
    with pytest.raises(SystemExit, match="its run has not finished: pass its latest checkpoint, '.*checkpoint-3'"):
        sdx.main([*sample, "--weights", str(w)])
    shutil.copy(w / "checkpoint-3" / "subject_diffusion.safetensors", w)
    with pytest.raises(SystemExit, match="not text_encoder.safetensors"):  # was 'No such file or directory: ...'
        sdx.main([*sample, "--weights", str(w)])
    sdx.save_method(method_for(sd, vision), tmp_path / "other", {"base_model": str(root / "model"), "step": "5"})
    shutil.copy(tmp_path / "other" / "text_encoder.safetensors", w)  # a stop between save_method's two writes: two runs
    with pytest.raises(SystemExit, match=r"come from different runs or steps \(step 3 and 5\)"):
        sdx.main([*sample, "--weights", str(w)])
    (w / "text_encoder.safetensors").write_bytes((w / "checkpoint-3" / "text_encoder.safetensors").read_bytes()[:1000])
    with pytest.raises(SystemExit, match="not readable safetensors files"):  # was a SafetensorError traceback
        sdx.main([*sample, "--weights", str(w)])
    ok = ["--weights", str(w / "checkpoint-3")]
    Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    for extra, said in ((["--box", "0.25", "0.25", "0.75", "0.75"], r"under one latent cell \(2 px\).*not fractions"),  # drew no box
                        (["--mask", str(tmp_path / "black.png")], "is empty: white")):
        with pytest.raises(SystemExit, match=said):
            sdx.main([*sample, *ok, *extra])
    assert not (tmp_path / "s").exists()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "old").write_text("x")
    export = ["export", *ok, "--out", str(tmp_path / "e")]
    with pytest.raises(SystemExit, match="exists and is not empty"):
        sdx.main(export)
    sdx.main([*export, "--overwrite"])  # the refusal named --overwrite, which export did not have
    assert sorted(q.name for q in (tmp_path / "e").iterdir()) == sorted(sdx.OFFICIAL_PARTS)
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".e.tmp")]  # written beside, then renamed


def test_resume_equals_an_uninterrupted_run_and_sampling(tiny, tmp_path):
    _, _, root = tiny
    common = ["--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "4",
              "--checkpointing-steps", "2", "--gradient-accumulation-steps", "2", *FAST, "--min-box-area", "0.1"]
    sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "full")]))
    sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "half"), "--max-train-steps", "2"]))
    with open(tmp_path / "half" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.1')  # a line the stop cut: it would not parse
    sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "half"), "--resume", "latest"]))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = lambda d: json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[-1])
    assert last("full")["skipped"] and last("full")["skipped"] == last("half")["skipped"]  # the counts carry over the resume
    with pytest.raises(ValueError, match="is at step 4, past --max-train-steps 2"):  # no step, weights mislabelled
        sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "half"), "--resume", "latest",
                                                   "--max-train-steps", "2"]))
    # a model that fails to load leaves no output folder behind (a retry would meet "exists, not empty")
    bad_model = [*common[2:], "--pretrained-model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "bad")]
    with pytest.raises((FileNotFoundError, ValueError, SystemExit)):
        sdx.train(sdm.parse_args(sdx.TrainConfig, bad_model))
    assert not (tmp_path / "bad").exists()
    for extra, msg in ((["--validation-prompt", "a star"], "needs --validation-subject"),
                       (["--validation-prompt", "a star", "--validation-subject", str(tmp_path / "x.png"), "--validation-entity", " "],
                        "needs --validation-subject"),
                       (["--validation-prompt", "a star", "--validation-subject", str(tmp_path / "x.png"), "--validation-entity", "star"],
                        "does not exist"),
                       (["--validation-prompt", "a star", "--validation-subject", str(ROOT / "README.md"),
                         "--validation-entity", "star"], "README.md' is not a readable image"),  # was a traceback at step 1
                       (["--validation-prompt", "a star", "--validation-subject", str(ROOT / "assets" / "readme" / "world.png"),
                         "--validation-entity", "dog"], "--validation-prompt: the entity word 'dog' is not in the prompt"),
                       # these two failed at the first validation, after the steps before it had run
                       (["--validation-prompt", "a photo of sks star", "--validation-subject", str(ROOT / "assets" / "readme" / "world.png"),
                         "--validation-entity", "star"], "--validation-prompt: the prompt 'a photo of sks star' already contains 'sks'"),
                       (["--validation-prompt", "a star" + " very" * 72, "--validation-subject", str(ROOT / "assets" / "readme" / "world.png"),
                         "--validation-entity", "star"], "--validation-prompt: the prompt is too long"),
                       (["--backgrounds", str(tmp_path / "nowhere")], "is not a folder of background images"),
                       (["--resolution", "33"], "--resolution must be a multiple of")):
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "bad"), *extra]))
        assert not (tmp_path / "bad").exists()
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("fuser.") and "alpha" in k)
    # sampling from the trained weights: one and two subjects, maps, and the bad inputs
    ref = tmp_path / "ref.png"
    Image.fromarray(tw.concept_references(tw.CONCEPTS[0], n=1)[0][1]).save(ref)
    out = tmp_path / "samples"
    base = ["sample", "--weights", str(tmp_path / "full"), "--steps", "2", "--output-dir", str(out), "--overwrite"]
    sdx.main([*base, "--subject", str(ref), str(ref), "--entity", "star", "toy", "--prompt", "a star next to a toy",
              "--save-maps", "--box", "0", "0", "16", "16", "10", "10", "30", "30"])
    assert len(list((out / "maps").glob("*.png"))) == 4 and (out / "0000_00.png").exists()
    sdx.main([*base, "--subject", str(ref), "--entity", " star ", "--prompt", "a star", "--save-maps"])  # stripped
    assert (out / "maps" / "0000_00_0_star.png").exists()
    mask = tmp_path / "mask.png"  # a user mask instead of the automatic cut-out: only its pixels reach the encoder
    Image.fromarray(((np.mgrid[:32, :32] - 16) ** 2).sum(0) < 100).convert("L").save(mask)
    seen, real = [], sdx.subject_image
    sdx.subject_image = lambda subj, size: seen.append(subj.mask) or real(subj, size)
    try:
        sdx.main([*base, "--subject", str(ref), "--entity", "star", "--prompt", "a star", "--mask", str(mask)])
    finally:
        sdx.subject_image = real
    assert seen and np.array_equal(seen[0], np.asarray(Image.open(mask)) > 127)
    disc = np.asarray(Image.open(mask)) > 127  # a cut-out (white RGB, the subject in alpha) reads its alpha, not all-white
    Image.fromarray(np.dstack([np.full((32, 32, 3), 255, np.uint8), disc.astype(np.uint8) * 255])).save(tmp_path / "cut.png")
    assert np.array_equal(sdx.load_mask(tmp_path / "cut.png"), disc)
    Image.open(mask).convert("RGBA").save(tmp_path / "opaque.png")  # an editor's black-and-white mask saved as RGBA
    assert np.array_equal(sdx.load_mask(tmp_path / "opaque.png"), disc)
    vae = []  # --vae-precision, --vae and --clip-skip reach the model (the first was fixed by --precision alone)
    real_load = sdm.load_model
    sdx.sdm.load_model = lambda *a, **k: vae.append(a[2:3] + a[7:]) or real_load(*a, **k)
    try:
        sdx.main([*base, "--subject", str(ref), "--entity", "star", "--prompt", "a star", "--vae-precision", "bf16",
                  "--vae", str(root / "model"), "--clip-skip", "2"])
        sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "skip"), "--max-train-steps", "1",
                                                   "--vae", str(root / "model"), "--clip-skip", "2"]))
    finally:
        sdx.sdm.load_model = real_load
    assert vae == [("bf16", str(root / "model"), 2), ("", str(root / "model"), 2)]
    bad = ((["--subject", str(ref), str(ref), str(ref)], ["star"] * 3, "a star", "at most 2 subjects"),
           (["--subject", str(ref)], ["star"], "a dog on the snow", "entity word 'star' is not in the prompt"),
           (["--subject", str(ref), "--box", "0", "0", "40", "16"], ["star"], "a star", "lies outside the 32x32 image"),
           (["--subject", str(ref), "--box", "0", "0", "16", "16", "--no-location"], ["star"], "a star", "drop one of them"),  # was ignored
           (["--subject", str(ref)], [" "], "a star", "needs its entity word"),
           (["--subject", str(ref), str(ref), "--mask", str(tmp_path / "mask.png")], ["star", "toy"], "a star and a toy",
            "one --mask per --subject"),
           (["--subject", str(ref), "--height", "33"], ["star"], "a star", "height and width must be multiples of"),
           (["--subject", str(ROOT / "README.md")], ["star"], "a star", "README.md' is not a readable image"),
           (["--subject", str(tmp_path / "nope.png")], ["star"], "a star", "--subject '.*nope.png' does not exist"),  # [Errno 2] ...
           (["--subject", str(ref), "--mask", str(tmp_path / "nope.png")], ["star"], "a star", "--mask '.*nope.png' does not exist"),
           (["--subject", str(ref), "--negative-prompt", "blurry"], ["star"], "a star", "has no negative prompt"),  # was ignored
           (["--subject", str(ref), "--variant", "sd21"], ["star"], "a star", "model, not 'sd21'"))  # was ignored too
    for args, entities, prompt, msg in bad:
        with pytest.raises(SystemExit, match=msg):
            sdx.main([*base, *args, "--entity", *entities, "--prompt", prompt])
    fresh = [*base[:-3], "--output-dir", str(tmp_path / "fresh"), "--subject", str(ref)]  # a bad input leaves no empty output folder
    for args, msg in ((["--entity", "star", "--prompt", "a dog"], "not in the prompt"),
                      (["--entity", "star", "--prompt", "a star", "--weights", str(tmp_path / "nowhere")], "holds no"),
                      (["--entity", "star", "--prompt", "a sks star", "--weights", str(tmp_path / "nowhere")], "already contains 'sks'")):
        with pytest.raises(SystemExit, match=msg):
            sdx.main([*fresh, *args])
        assert not (tmp_path / "fresh").exists()


def test_automatic_cutout_finds_a_striped_subject_on_a_textured_background():
    rng = np.random.default_rng(0)
    img = (rng.integers(90, 140, (64, 64, 1)) * np.array([[[0.4, 1.0, 0.5]]])).astype(np.uint8)  # grass-like noise
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 24) ** 2 + (xx - 40) ** 2 < 14**2
    img[disc] = np.where((xx[disc] // 4 % 2)[:, None] == 0, [220, 30, 30], [245, 245, 245])
    m = sdx.cutout(Image.fromarray(img))
    assert (m & disc).sum() / (m | disc).sum() > 0.85


def test_shard_sampler_splits_one_order_across_ranks_and_resumes():
    """One global order for any world size: ranks read disjoint positions that together cover it, and
    `start` continues exactly (DistributedSampler semantics with shards as the shuffling unit)."""
    shards = [list(range(0, 5)), list(range(5, 12)), list(range(12, 16))]
    take = lambda it, n: [next(it) for _ in range(n)]
    one = take(iter(sdx.ShardSampler(shards, 1, 0, seed=3, global_batch=4)), 16)
    assert sorted(i for i, _, _ in one) == list(range(16)) and {e for _, e, _ in one} == {0}
    for world in (2, 4):
        per = [take(iter(sdx.ShardSampler(shards, world, r, seed=3, global_batch=4)), 16 // world) for r in range(world)]
        merged = sorted((pos, i) for rows in per for i, _, pos in rows)
        assert [i for _, i in merged] == [i for i, _, _ in one] and len({p for p, _ in merged}) == 16
    again = take(iter(sdx.ShardSampler(shards, 2, 1, seed=3, global_batch=4, start=3)), 6)  # epoch 0 tail, then epoch 1
    full = take(iter(sdx.ShardSampler(shards, 2, 1, seed=3, global_batch=4)), 9)
    assert again == full[3:] and again[-1][1] == 1
    assert take(iter(sdx.ShardSampler(shards, 1, 0, seed=4, global_batch=4)), 16) != one  # the seed matters
    with pytest.raises(ValueError, match="fewer records"):
        sdx.ShardSampler([[0, 1]], 2, 0, seed=0, global_batch=4)


def test_three_way_guidance_feeds_text_image_and_null_rows(tiny, monkeypatch):
    """card §8.2: one UNet call a step on [c ; i ; u]: the prompt with the image, "" with the image and the
    location, "" with no location (zeros) and the null objects (drop_objects) or zeros after GroundingNet."""
    sd, vision, _ = tiny
    method = method_for(sd, vision, perturb=True).eval()
    seen, real = [], sdx.install

    def spy(m, unet, cond):
        seen.append(cond)
        return real(m, unet, cond)

    monkeypatch.setattr(sdx, "install", spy)
    x_seen = []
    hook = sd.unet.register_forward_pre_hook(lambda mod, args: x_seen.append((args[0].clone(), args[2].clone())))
    subject = sdx.Subject(Image.fromarray(tw.concept_references(tw.CONCEPTS[0], n=1)[0][1]), "star", (0.25, 0.25, 0.75, 0.75))
    try:
        for drop in (True, False):
            seen.clear(), x_seen.clear()
            with torch.no_grad():
                sdx.generate(method, sd, vision, "a star on the snow", [subject], n=1, steps=1, drop_objects=drop, progress=False,
                             generator=torch.Generator().manual_seed(0))
            x, ctx = x_seen[0]
            objs = seen[0]["objs"]
            assert x.shape[0] == 3 and torch.equal(x[0, :4], x[1, :4]) and torch.equal(x[0, :4], x[2, :4])
            assert torch.equal(x[0, 4], x[1, 4]) and (x[0, 4] == 0).any() and (x[2, 4] == 0).all()  # m, m, dropped
            assert torch.equal(ctx[1], ctx[2]) and not torch.allclose(ctx[0], ctx[1])  # c, "", ""
            with torch.no_grad():
                assert torch.equal(ctx[1], method.encode_text(sd.tokenize([""]))[0])
            assert torch.equal(objs[0], objs[1]) and not torch.allclose(objs[0], objs[2])
            if drop:  # the null features of training's dropped objects
                with torch.no_grad():
                    side = vision.cfg.image_size // vision.cfg.patch_size
                    null = method.grounding(torch.zeros(1, 2, side * side, vision.cfg.width), torch.zeros(1, 2, dtype=torch.bool),
                                            torch.zeros(1, 2, 4))
                assert_close(objs[2:3], null, what="null objects")
            else:
                assert (objs[2] == 0).all()
    finally:
        hook.remove()


def test_default_boxes_keep_their_shape_on_a_canvas_that_is_not_square(tiny):
    """Without a box, one subject's is a square in pixels on a 64 x 32 canvas too: the centred square's half-size box
    (it was scaled per axis, a 2:1 box for any subject); a square canvas keeps the boxes as they were."""
    sd, vision, _ = tiny
    method = method_for(sd, vision, perturb=True).eval()
    seen = []
    hook = sd.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0, 4].clone()))
    image = Image.fromarray(tw.concept_references(tw.CONCEPTS[0], n=1)[0][1])
    try:
        sdx.generate(method, sd, vision, "a star", [sdx.Subject(image, "star")], steps=1, height=32, width=64,
                     progress=False, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    ys, xs = torch.nonzero(seen[0] == 0, as_tuple=True)  # latent 16 x 32: the box is x 12-19, y 4-11
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 11, 12, 19) and len(ys) == 64
    assert sdx.default_boxes(2, 512, 512) == sdx.DEFAULT_BOXES[2] and sdx.default_boxes(1, 64, 64) == sdx.DEFAULT_BOXES[1]
    left, right = sdx.default_boxes(2, 512, 1024)  # test.py's layout, 150 x 300 px boxes, in the middle square
    assert [round(v * 1024) for v in left[::2]] == [306, 456] and [round(v * 1024) for v in right[::2]] == [556, 756]


def test_a_bf16_model_reads_the_box_at_full_precision(tiny):
    """The location channel of a bf16 (or fp16) model is the fp32 one: the box was rounded to bf16 before it was
    drawn, and x2 = 259 of 320 became 258.75, which moved the box's edge by a latent column."""
    sd, vision, _ = tiny
    sd16, vision16 = copy.deepcopy(sd).to(torch.bfloat16), copy.deepcopy(vision).to(torch.bfloat16)
    method = method_for(sd, vision, perturb=True).eval().to(torch.bfloat16)
    box = (10 / 320, 0.0, 259 / 320, 1.0)
    seen = []
    hook = sd16.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0, 4].float().clone()))
    image = Image.fromarray(tw.concept_references(tw.CONCEPTS[0], n=1)[0][1])
    try:
        sdx.generate(method, sd16, vision16, "a star", [sdx.Subject(image, "star", box)], steps=1, height=16, width=320,
                     progress=False, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    want = sdx.location_mask(torch.tensor([[box, (0, 0, 0, 0)]]), torch.tensor([[True, False]]), (16, 320), (8, 160))[0, 0]
    assert torch.equal(seen[0], want)


def test_no_use_bbox_gives_one_subject_the_null_position_feature(tiny, monkeypatch):
    """test.py's use_bbox=False (card §4.1, §8.2): one subject's object tokens do not depend on its box; with
    --use-bbox (the default) they do."""
    sd, vision, _ = tiny
    method = method_for(sd, vision, perturb=True).eval()
    seen, real = [], sdx.install
    monkeypatch.setattr(sdx, "install", lambda m, unet, cond: seen.append(cond["objs"]) or real(m, unet, cond))
    image = Image.fromarray(tw.concept_references(tw.CONCEPTS[0], n=1)[0][1])
    objs = {}
    for use_bbox in (True, False):
        for box in ((0.1, 0.1, 0.5, 0.5), (0.4, 0.3, 0.9, 0.8)):
            seen.clear()
            sdx.generate(method, sd, vision, "a star", [sdx.Subject(image, "star", box)], steps=1, use_bbox=use_bbox,
                         progress=False, generator=torch.Generator().manual_seed(0))
            objs[use_bbox, box[0]] = seen[0][0]
    assert torch.equal(objs[False, 0.1], objs[False, 0.4]) and not torch.allclose(objs[True, 0.1], objs[True, 0.4])


def test_generate_weighs_the_three_rows_with_the_text_and_image_scales(tiny, monkeypatch):
    """The sampler sees eps_u + s_T (eps_c - eps_i) + s_I (eps_i - eps_u) with the rows in the order the UNet
    got them ([c ; i ; u], checked above): the UNet's output is replaced by known rows, the loop by one call."""
    sd, vision, _ = tiny
    method = method_for(sd, vision, perturb=True).eval()
    rows, got = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1)), []
    hook = sd.unet.register_forward_hook(lambda mod, args, out: rows.to(out.dtype))
    monkeypatch.setattr(sdm, "sample_loop", lambda fn, x, *a, **k: got.append(fn(x, 500, 0)) or x)
    subject = sdx.Subject(Image.fromarray(tw.concept_references(tw.CONCEPTS[0], n=1)[0][1]), "star")
    try:
        sdx.generate(method, sd, vision, "a star", [subject], steps=1, text_scale=3.0, image_scale=0.5, progress=False)
    finally:
        hook.remove()
    c, i, u = rows
    assert_close(got[0][0], u + 3.0 * (c - i) + 0.5 * (i - u), what="guided eps")


def test_the_training_target_follows_the_base_models_prediction_type(tiny, monkeypatch):
    """The official run trains an eps-model (card §2.1); on a v-prediction base (SD2.x 768-v) the target must
    be v = sqrt(a) eps - sqrt(1 - a) z0, or the new weights would fight the backbone. A UNet that outputs 0
    makes the MSE the mean square of the target, computed here from the batch's own draws."""
    sd, vision, root = tiny
    method, data = method_for(sd, vision, perturb=True), records(root)
    batch = torch.utils.data.default_collate([data[(i, 0, i)] for i in range(2)])
    batch["r"] = torch.tensor([0.5, 0.9])
    hook = sd.unet.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    with torch.no_grad():
        d = sd.vae.encode(batch["pixels"])
        z0 = (d.mean + d.std * batch["vae_noise"]) * sd.vae.scale_factor
    got = {}
    try:
        for pred in ("eps", "v"):
            monkeypatch.setattr(sd, "schedule", sdm.NoiseSchedule(sdm.ScheduleConfig(prediction=pred)))
            with torch.no_grad(), sdx.install(method, sd.unet, {}) as cond:
                got[pred] = sdx.training_loss(method, sd, vision, batch, sdx.TrainConfig(), sd.tokenize([""]), cond)[1]
    finally:
        hook.remove()
    a = sd.schedule.alphas_cumprod[batch["t"]].float()[:, None, None, None]
    v = a.sqrt() * batch["noise"] - (1 - a).sqrt() * z0
    assert_close(got["eps"], batch["noise"].pow(2).mean(), what="eps target")
    assert_close(got["v"], v.pow(2).mean(), what="v target")
    assert abs(got["v"] - got["eps"]) > 0.01


def test_clip_skip_reaches_the_fused_text_encoder_and_sample_warns_when_it_differs(tiny, tmp_path, monkeypatch):
    """--clip-skip sets the text encoder's skip in load_model; the method's fused encoder is a deep copy made after it,
    so it must carry the skip, the weights' header records it, and sample says when its --clip-skip is another.
    args.json goes through atomic_write (it was a plain write_text), the shard index once the data passed."""
    _, _, root = tiny
    written = []
    real = sdm.atomic_write
    monkeypatch.setattr(sdm, "atomic_write", lambda path, write: written.append(Path(path).name) or real(path, write))
    method = sdx.train(sdm.parse_args(sdx.TrainConfig, [
        "--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1",
        "--checkpointing-steps", "0", *FAST, "--clip-skip", "2", "--output-dir", str(tmp_path / "run")]))
    assert method.text_encoder.skip == 2
    from safetensors import safe_open
    for name in ("subject_diffusion", "text_encoder"):
        with safe_open(str(tmp_path / "run" / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["clip_skip"] == "2"
    assert "args.json" in written and json.loads((tmp_path / "run" / "args.json").read_text())["clip_skip"] == 2
    assert (tmp_path / "run" / "records_index.npz").is_file()
    sd, _, back, meta = sdx.load_trained(tmp_path / "run", clip_skip=2)
    assert sd.text_encoder.skip == back.text_encoder.skip == 2 and meta["clip_skip"] == "2"
    sdx.export_official(back, sd.unet, tmp_path / "export", meta)  # the official layout keeps it too
    assert sdx.official_metadata(tmp_path / "export")["clip_skip"] == "2"
    ref = ROOT / "assets" / "readme" / "world.png"
    sample = ["sample", "--weights", str(tmp_path / "run"), "--subject", str(ref), "--entity", "star", "--prompt", "a star", "--steps", "1"]
    with pytest.warns(UserWarning, match="^--clip-skip 1 differs from the 2 these weights were trained with; pass --clip-skip 2"):
        sdx.main([*sample, "--output-dir", str(tmp_path / "s1")])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="--clip-skip")
        sdx.main([*sample, "--clip-skip", "2", "--output-dir", str(tmp_path / "s2")])
    assert len(list((tmp_path / "s2").glob("*.png"))) == 1


def test_the_variant_is_recorded_and_reaches_the_model_in_sample_and_export(tiny, tmp_path, monkeypatch):
    """An SD 2.x single file does not say whether it predicts v or eps, and the loader's refusal says to pass the variant.
    train records --variant beside base_model, so that sample and export load the base as trained; export takes the
    flag too (it had none, so such a run could not be exported), and the official layout keeps it."""
    _, _, root = tiny
    sdx.train(sdm.parse_args(sdx.TrainConfig, ["--pretrained-model", str(root / "model"), "--variant", "tiny", "--data",
                                               str(root / "tars"), "--max-train-steps", "1", "--checkpointing-steps", "0", *FAST,
                                               "--output-dir", str(tmp_path / "run")]))
    seen, real = [], sdm.load_model
    monkeypatch.setattr(sdm, "load_model", lambda path="", *a, **kw: seen.append(a[3]) or real(path, *a, **kw))
    assert sdx.load_trained(tmp_path / "run")[3]["variant"] == "tiny" and seen == ["tiny"]
    sdx.main(["export", "--weights", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    sdx.main(["export", "--weights", str(tmp_path / "run"), "--variant", "tiny", "--out", str(tmp_path / "export2")])
    assert seen[1:] == ["tiny", "tiny"] and sdx.official_metadata(tmp_path / "export")["variant"] == "tiny"
    sdx.load_trained(tmp_path / "run", str(root / "model"))  # another --pretrained-model: the recorded variant was its base's
    assert seen[-1] == ""


def test_a_run_refused_at_the_data_step_leaves_the_folder_as_it_was(tiny, tmp_path):
    """The shard index was written before the sampler's check, and --overwrite removed the earlier run's files before
    the data checks: a refused run left a new folder with records_index.npz, or an old one emptied."""
    _, _, root = tiny
    old = tmp_path / "old"
    old.mkdir()
    (old / "log.jsonl").write_text('{"step": 1}\n')
    (old / "args.json").write_text("{}")
    for out, extra in ((tmp_path / "new", []), (old, ["--overwrite"])):
        with pytest.raises(SystemExit, match=r"fewer records \(16\) than one global batch"):
            sdx.main(["train", "--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1",
                      *FAST, "--train-batch-size", "32", "--output-dir", str(out), *extra])
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in old.iterdir()) == ["args.json", "log.jsonl"] and (old / "args.json").read_text() == "{}"


def test_training_labels_follow_the_samplers_whole_word_rule(tiny, tmp_path):
    """A label is kept when it is one word the caption holds by has_word's rule (the one sampling uses), so 'c++' and
    'r2-d2' are kept (a findall of \\w+ split them); a word inside a longer one or a label of two words is not (the card)."""
    _, _, root = tiny
    good = json.loads((root / "loose" / "000000.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "a.png").write_bytes((root / "loose" / "000000.png").read_bytes())
    cfg = sdx.TrainConfig(data=[str(tmp_path)], min_box_area=0.01)
    data = sdx.Records(cfg.data, cfg, 32, 16, 4, 32, 49407)
    obj = {**good["objects"][0], "value": None, "box": [8, 8, 40, 40]}
    for caption, label, kept in (("a c++ book on a desk", "c++", True), ("r2-d2 in the desert", "r2-d2", True),
                                 ("A Star, at night", "star", True), ("stars at night", "star", False),
                                 ("a teddy bear on a bed", "teddy bear", False), ("a star", " ", False)):
        skips = dict.fromkeys(sdx.SKIPS, 0)
        rec = {**good, "caption": caption, "objects": [{**obj, "label": label}]}
        if kept:
            assert [lab for _, lab, _ in data.subjects(rec, 64, 64, skips)] == [label], caption
        else:
            with pytest.raises(sdx.Skip):
                data.subjects(rec, 64, 64, skips)
            assert skips["entity_missing"] == 1, caption


def test_entity_words_match_as_whole_words_also_with_punctuation(tiny):
    """A \\b boundary never matched after 'c++' (two non-word characters); words with letters at both ends keep the rule:
    not inside a longer word, beside punctuation yes."""
    tok = tiny[0].tokenize
    for prompt, word in (("a c++ book on a desk", "c++"), ("r2-d2 in the desert", "r2-d2"), ("a C++ mug", "c++"),
                         ("a star, at night", "star"), ("a star-shaped cookie", "star"), ("A STAR", "star")):
        assert (sdx.fused_prompt(prompt, [word], tok) == sdx.SKS_ID).sum() == 1, (prompt, word)
    for prompt, word in (("stars at night", "star"), ("a c++x book", "c++"), ("xr2-d2 robot", "r2-d2"), ("a superstar", "star")):
        with pytest.raises(ValueError, match=f"the entity word '{re.escape(word)}' is not in the prompt"):
            sdx.fused_prompt(prompt, [word], tok)
    with pytest.raises(ValueError, match="already contains 'sks'"):
        sdx.fused_prompt("a photo of (sks) star", ["star"], tok)
    assert (sdx.fused_prompt("the sksx star", ["star"], tok) == sdx.SKS_ID).sum() == 1


def test_a_bf16_mixed_precision_step_runs_on_cpu(tiny, tmp_path):
    """--mixed-precision bf16: the frozen backbone and image tower in bf16 under autocast, the trainables in
    fp32 (no gradient scaler). One step on CPU gives a finite loss and finite, fp32, updated weights."""
    _, _, root = tiny
    sdx.train(sdm.parse_args(sdx.TrainConfig, [
        "--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1",
        "--checkpointing-steps", "0", *FAST, "--mixed-precision", "bf16", "--device", "cpu", "--output-dir", str(tmp_path)]))
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(log["loss"]) and np.isfinite(log["attn"]) and log["loss"] > 0
    w = weights(tmp_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())
    assert any(w[k].abs().sum() > 0 for k in w if k.startswith("kv."))  # zero at the start: the step moved them


def test_a_non_finite_loss_stops_the_command_line_with_one_sentence(tiny, tmp_path, monkeypatch):
    """DESIGN: a non-finite loss stops training with a clear message (not a traceback) and writes no final weights."""
    _, _, root = tiny
    real = sdx.training_loss
    monkeypatch.setattr(sdx, "training_loss", lambda *a: (lambda loss, mse, attn: (loss * float("nan"), mse, attn))(*real(*a)))
    with pytest.raises(SystemExit, match="^error: the loss became nan at step 0"):
        sdx.main(["train", "--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1",
                  "--checkpointing-steps", "0", *FAST, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "subject_diffusion.safetensors").exists()


@pytest.mark.parametrize("flags, said", [(["--p-drop-text", "0.7", "--p-drop-both", "0.5"], r"must sum to at most 1 \(got 1.25\)"),
                                         (["--min-box-area", "0.9", "--max-box-area", "0.2"], "the box limits leave no box")])
def test_dropout_shares_and_box_limits_that_cannot_hold_are_one_sentence(tiny, tmp_path, flags, said):
    """Shares over 1 dropped the text of every sample (an unconditional model, trained silently); limits with min >= max
    filtered every box, reported only as a DataLoader worker's traceback. Both are refused before any file is written."""
    _, _, root = tiny
    with pytest.raises(SystemExit, match=said):
        sdx.main(["train", "--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1",
                  *FAST, *flags, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_entity_images_paste_the_masked_subject_on_a_background(tiny, tmp_path):
    """synthesize() (card §2.3): only the masked box crop reaches the canvas, scaled to about half of it,
    over the background; backgrounds are --backgrounds images or other records emptied of their objects."""
    _, _, root = tiny
    data, R = records(root), 32
    img = np.zeros((R, R, 3), np.uint8)
    img[..., 1] = 255  # green around the subject: must never be pasted
    img[4:28, 8:24] = (255, 0, 0)
    box, seg = np.array([8, 4, 24, 28]) / R, np.zeros((R, R), np.float32)
    seg[4:28, 8:24] = 1
    half = seg.copy()
    half[:, 16:] = 0  # a mask over the left half of the box only
    bg = np.zeros((32, 32, 3), np.uint8)
    bg[..., 2] = 255
    share = {}
    for name, m in (("full", seg), ("half", half)):
        out = [np.asarray(data.entity_image(img, m, box, bg, np.random.default_rng(s))).astype(int) for s in range(30)]
        assert all(a.shape == (32, 32, 3) and not ((a[..., 1] > 200) & (a[..., 0] < 60)).any() for a in out)
        red = [((a[..., 0] > 200) & (a[..., 2] < 60)).sum() for a in out]
        blue = [((a[..., 2] > 200) & (a[..., 0] < 60)).sum() for a in out]
        share[name] = np.mean([r / (r + b) for r, b in zip(red, blue)])  # the subject's share of what is left
        assert len({a.tobytes() for a in out}) > 25  # flip, rotation, perspective, position: all drawn
    assert 0.42 < share["full"] < 0.58 and 0.18 < share["half"] < 0.32  # measured 0.50 and 0.24
    one = tmp_path / "one"  # a record: colour A on the left, its object (label 1) colour B on the right
    one.mkdir()
    pic = np.zeros((64, 64, 3), np.uint8)
    pic[:, :32], pic[:, 32:] = (30, 120, 200), (250, 250, 0)
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 32:] = 1
    Image.fromarray(pic).save(one / "r.png")
    Image.fromarray(lab).save(one / "r.mask.png")
    (one / "r.json").write_text(json.dumps({"caption": "a ball", "objects": [{"value": 1, "label": "ball", "box": [32, 0, 64, 64]}]}))
    for s in range(10):  # no object pixel survives: they take the crop's background colour
        assert (records(tmp_path, "one").background(np.random.default_rng(s)) == (30, 120, 200)).all()
    (tmp_path / "bgs").mkdir()
    Image.new("RGB", (50, 40), (7, 80, 9)).save(tmp_path / "bgs" / "a.png")
    assert (records(tmp_path, "one", backgrounds=str(tmp_path / "bgs")).background(np.random.default_rng(0)) == (7, 80, 9)).all()
    (tmp_path / "bgs" / "a.png").write_text("not an image")  # an unreadable background: another record's crop, said once
    (tmp_path / "bgs" / "sub").mkdir()  # folders are no backgrounds
    data = records(tmp_path, "one", backgrounds=str(tmp_path / "bgs"))
    assert data.bg_files == [tmp_path / "bgs" / "a.png"]
    assert (data.background(np.random.default_rng(0)) == (30, 120, 200)).all()


def test_a_corrupt_image_inside_a_readable_shard_is_skipped_and_counted(tiny, tmp_path):
    import io
    import tarfile

    _, _, root = tiny
    src = root / "loose"
    files = {"a_bad.json": (src / "000000.json").read_bytes(), "a_bad.png": b"\x89PNG not really" * 4,
             "b_good.json": (src / "000000.json").read_bytes(), "b_good.png": (src / "000000.png").read_bytes()}
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = records(tmp_path, "shards", seed=0)
    assert len(data) == 2 and not data.bad_shards
    s = data[(0, 0, 0)]  # the corrupt record hands over to the next one
    assert dict(zip(sdx.SKIPS, s["skips"].tolist()))["unreadable"] == 1 and s["valid"][0]
    assert torch.equal(s["pixels"], data[(1, 0, 0)]["pixels"])


def test_gradient_accumulation_equals_the_bigger_batch(tiny, tmp_path):
    """2 micro-batches of 2 with --gradient-accumulation-steps 2 = one batch of 4: the same records, noise and
    dropout draws (seeded by position), and the step's loss is the mean over the 4 samples."""
    _, _, root = tiny
    common = ["--pretrained-model", str(root / "model"), "--data", str(root / "tars"), "--max-train-steps", "1",
              "--checkpointing-steps", "0", *FAST]
    sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "big"), "--train-batch-size", "4"]))
    sdx.train(sdm.parse_args(sdx.TrainConfig, [*common, "--output-dir", str(tmp_path / "acc"), "--gradient-accumulation-steps", "2"]))
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # float order only (see the torchrun test): measured max 8.4e-7, none above 1e-6; batch 2 without
    # accumulation gives max 2.0e-3 (= lr) in 40k entries
    assert (diffs > 1e-6).sum() <= 1e-4 * len(diffs) and diffs.max() < 2e-5
    log = lambda d: json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[-1])
    assert log("big")["loss"] == pytest.approx(log("acc")["loss"], abs=1e-5)


def test_the_shard_index_is_written_once_and_read_instead_of_the_tars(tiny, tmp_path, monkeypatch):
    """The member tables of every shard go to one .npz (train writes it into the output folder, rank 0 first):
    the next Records reads no tar header and gives the same samples; a shard that changed is scanned again."""
    import shutil
    from pathlib import Path

    _, _, root = tiny
    shards = tmp_path / "tars"
    shutil.copytree(root / "tars", shards)
    index = tmp_path / "out" / "records_index.npz"
    cfg = sdx.TrainConfig(data=[str(shards)], min_box_area=0.01)
    make = lambda: sdx.Records(cfg.data, cfg, 32, 16, 4, 32, 49407, verbose=False, index=index)
    first = make()
    assert index.is_file()
    scans = []
    real = sdx.scan_tar
    monkeypatch.setattr(sdx, "scan_tar", lambda t: scans.append(Path(t).name) or real(t))
    again = make()
    assert scans == [] and np.array_equal(again.offsets, first.offsets) and again.shards == first.shards
    assert torch.equal(again[(3, 0, 3)]["pixels"], first[(3, 0, 3)]["pixels"])
    tars = sorted(shards.glob("*.tar"))
    tars[1].write_bytes(tars[1].read_bytes()[:-2048])  # changed (here: truncated): scanned again, the rest still cached
    third = make()
    assert scans == [tars[1].name] and len(third) <= len(first)
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])  # cut mid-shard: it was skipped whole ("not a readable tar file")
    with pytest.warns(UserWarning, match="is cut short; the records before the cut are used"):
        half = make()
    kept = len(half) - len(first.shards[0])
    assert 0 < kept < len(first.shards[1]) and not half.bad_shards
    assert all(not half[(i, 0, i)]["skips"].any() for i in range(len(first.shards[0]), len(half)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # cut exactly at a member's header: tarfile reads that as the end
        at, names = [m.offset for m in tf.getmembers()][5], [m.name for m in tf.getmembers()][:6]
    (tmp_path / "boundary.tar").write_bytes(data[:at])
    with pytest.warns(UserWarning, match="is cut short"):
        rows = sdx.scan_tar(tmp_path / "boundary.tar")
    assert names[5].endswith(".mask.png") and len(rows) == 1 and (rows >= 0).all()  # the record the cut went through is
    # dropped, not kept without its label map
    scans.clear()
    make()
    assert scans == []  # the rescan went into the index too


def test_an_error_inside_a_dataloader_worker_is_its_own_sentence(monkeypatch):
    """With --num-workers, PyTorch re-raises a worker's error with the worker's whole traceback in its message."""
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError("none of the training records has a usable subject; check the boxes and labels.")

    monkeypatch.setattr(sdx, "train", lambda cfg: next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1))))
    with pytest.raises(SystemExit) as e:
        sdx.main(["train", "--data", "x"])
    assert str(e.value) == "error: none of the training records has a usable subject; check the boxes and labels."
