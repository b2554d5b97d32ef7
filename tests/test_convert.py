"""weights_convert.py: full-size configs, key sets, round trips, and bad input."""

import json
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import sd_model as sdm
import weights_convert as wc

# The published diffusers configs of the released models (only the fields that shape the UNet).
SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], in_channels=4, out_channels=4,
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32, sample_size=64)
SD21_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
             "sample_size": 96}
SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4, out_channels=4,
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TEXT = {"sd15": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu"),
        "sd21": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"),
        "sdxl2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu",
                      projection_dim=1280)}
PUBLISHED = {"sd15": (859_520_964, 83_653_863, 123_060_480, None), "sd21": (865_910_724, 83_653_863, 340_387_840, None),
             "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)}


def meta_model(cfg):
    with torch.device("meta"):
        return sdm.StableDiffusion(cfg)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_full_size_configs_match_published_counts_and_diffusers_keys(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = sdm.PRESETS[name]
    ours = meta_model(cfg)
    counts = (n_params(ours.unet), n_params(ours.vae), n_params(ours.text_encoder),
              n_params(ours.text_encoder_2) if ours.text_encoder_2 else None)
    assert counts == PUBLISHED[name]
    ucfg = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}[name]
    assert wc.diffusers_unet_config(ucfg) == cfg.unet, "the diffusers config reads back as our preset"
    with torch.device("meta"):
        ref = {"unet": wc.diffusers_unet_to_ldm(UNet2DConditionModel(**ucfg).state_dict(), cfg.unet),
               "vae": wc.diffusers_vae_to_ldm(AutoencoderKL(**VAE).state_dict(), cfg.vae),
               "text_encoder": wc.hf_clip_layout(CLIPTextModel(CLIPTextConfig(**TEXT["sd21" if name == "sd21" else "sd15"])).state_dict(), "text_model.")}
        if name == "sdxl":
            ref["text_encoder_2"] = wc.hf_clip_layout(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT["sdxl2"])).state_dict(), "text_model.")
    for part, sd in ref.items():
        wc.check_keys(getattr(ours, part).state_dict(), sd, f"{name} {part}")  # same keys and shapes


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_single_file_layout_is_what_diffusers_reads(name):
    """Independent check of the original-checkpoint naming at full size: diffusers' own single-file
    converters consume our `to_ldm` output and produce exactly their models' key sets."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ours = meta_model(sdm.PRESETS[name])
    parts = {p: getattr(ours, p).state_dict() for p in wc.PARTS[:4] if getattr(ours, p, None) is not None}
    ldm = wc.to_ldm(ours.cfg, parts)
    ucfg = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}[name]
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(**TEXT["sd21" if name == "sd21" else "sd15"]))
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT["sdxl2"]))
    assert set(sfu.convert_ldm_unet_checkpoint(ldm, ucfg)) == set(unet.state_dict())
    assert set(sfu.convert_ldm_vae_checkpoint(ldm, VAE)) == set(vae.state_dict())
    hf = lambda sd: set(wc.hf_clip_layout(sd, "text_model."))  # transformers 5 drops the text_model. level
    if name == "sd21":
        assert hf(sfu.convert_open_clip_checkpoint(text, ldm, "cond_stage_model.model.")) == hf(text.state_dict())
    else:
        te = {k: v for k, v in ldm.items() if not k.startswith("conditioner.embedders.1.")}
        assert hf(sfu.convert_ldm_clip_checkpoint(te)) == hf(text.state_dict())
    if name == "sdxl":
        assert set(sfu.convert_open_clip_checkpoint(text2, ldm, "conditioner.embedders.1.model.")) == set(text2.state_dict())
    # and the LDM -> ours split recovers every part bit for bit (key names and shapes)
    back, family = wc.split_single_file(ldm, quiet=True)
    assert family == {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[name]
    for p in parts:
        wc.check_keys(parts[p], back[p], p)


def test_infer_config_names_presets_and_refuses_mismatches():
    for name in ("sd15", "sdxl", "tiny"):
        m = meta_model(sdm.PRESETS[name])
        parts = {p: getattr(m, p).state_dict() for p in wc.PARTS[:4] if getattr(m, p, None) is not None}
        assert sdm.infer_config(parts) == sdm.PRESETS[name]
    sd21 = meta_model(sdm.SD21)
    parts = {p: getattr(sd21, p).state_dict() for p in ("unet", "vae", "text_encoder")}
    with pytest.raises(ValueError, match="v \\(768-v\\) or eps"):
        sdm.infer_config(parts)
    assert sdm.infer_config(parts, "sd21").schedule.prediction == "v"
    assert sdm.infer_config(parts, "sd21-base").schedule.prediction == "eps"
    with pytest.raises(ValueError, match="not a 'sd15' model"):
        sdm.infer_config(parts, "sd15")
    with pytest.raises(ValueError, match="unknown variant"):
        sdm.infer_config(parts, "sd3")


@pytest.fixture
def tiny_ldm(tmp_path):
    """A TINY model as an original single file, with the extras real files carry."""
    torch.manual_seed(0)
    model = sdm.StableDiffusion(sdm.TINY)
    parts = {p: getattr(model, p).state_dict() for p in ("unet", "vae", "text_encoder")}
    ldm = wc.to_ldm(sdm.TINY, parts)
    extras = {"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              **{"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in ldm.items() if k.startswith("model.diffusion_model.")}}
    torch.save({"state_dict": {**ldm, **extras}, "global_step": 1}, tmp_path / "tiny.ckpt")
    return model, parts, tmp_path / "tiny.ckpt"


def test_single_file_round_trip_is_bit_exact(tiny_ldm, tmp_path, capsys):
    model, parts, ckpt = tiny_ldm
    wc.main([str(ckpt), str(tmp_path / "ours")])
    err = capsys.readouterr().err
    n_unet = len(parts["unet"])
    assert f"dropped {n_unet} key(s): EMA copy of the UNet" in err
    assert "dropped 2 key(s): noise-schedule buffers" in err and "dropped 1 key(s): position-id buffers" in err
    cfg, back = wc.load_any(tmp_path / "ours")
    assert cfg == sdm.TINY and back.keys() == parts.keys()
    assert all(torch.equal(back[p][k], parts[p][k]) for p in parts for k in parts[p])
    wc.main([str(tmp_path / "ours"), str(tmp_path / "again.safetensors"), "--to", "ldm"])
    again = wc.read_state_dict(tmp_path / "again.safetensors")
    original = {k: v for k, v in wc.read_state_dict(ckpt).items() if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))
                and not k.endswith("position_ids")}
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)
    # the EMA weights instead of the trained ones
    wc.main([str(ckpt), str(tmp_path / "ema"), "--ema"])
    _, ema = wc.load_any(tmp_path / "ema")
    assert all(torch.equal(ema["unet"][k], parts["unet"][k] + 1) for k in parts["unet"])
    # a v-prediction zero-terminal-SNR model: the schedule is not in a single file, so the flag puts it in config.json
    wc.main([str(ckpt), str(tmp_path / "zsnr"), "--zero-terminal-snr"])
    sched = sdm.StableDiffusion.from_pretrained(tmp_path / "zsnr").schedule
    assert (sched.cfg.prediction, sched.cfg.timestep_spacing, sched.alphas_cumprod[-1].item()) == ("v", "trailing", 0.0)
    # and the converted folder samples
    loaded = sdm.StableDiffusion.from_pretrained(tmp_path / "ours")
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(loaded.sample("a cat", steps=2, generator=g(), progress=False),
                       model.eval().sample("a cat", steps=2, generator=g(), progress=False))


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        wc.main([str(a) for a in args])
    msg = str(e.value.code)  # sys.exit(message): exit status 1, message on stderr
    assert msg.startswith("error: ") and msg.count(". ") == 0, msg
    return msg


def test_bad_input_gets_one_clear_sentence_and_nothing_half_written(tiny_ldm, tmp_path, capsys):
    _, _, ckpt = tiny_ldm
    out = tmp_path / "out"
    assert "does not exist" in run_cli([tmp_path / "nope.ckpt", out], capsys)
    (tmp_path / "notes.ckpt").write_text("these are not weights")
    assert "not a readable checkpoint" in run_cli([tmp_path / "notes.ckpt", out], capsys)
    data = (ckpt).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in run_cli([tmp_path / "cut.ckpt", out], capsys)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert "not a Stable Diffusion single-file checkpoint" in run_cli([tmp_path / "other.pt", out], capsys)
    refiner = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}
    torch.save(refiner, tmp_path / "sd_xl_refiner_1.0.ckpt")  # its keys say so: one bigG text tower at embedders.0
    assert "an SDXL refiner, which this project does not run" in run_cli([tmp_path / "sd_xl_refiner_1.0.ckpt", out], capsys)
    assert "not a 'sdxl' model" in run_cli([ckpt, out, "--variant", "sdxl"], capsys)
    for flags in (["--zero-terminal-snr"], ["--vae", ckpt], ["--to", "ldm"]):
        assert "belong to a Stable Diffusion model, not a lone CLIP image tower" in run_cli([ckpt, out, "--clip-vision", *flags], capsys)
    sd = wc.read_state_dict(ckpt)
    torch.save({**sd, "model.diffusion_model.extra.weight": torch.zeros(1)}, tmp_path / "odd.ckpt")
    assert "0 missing key(s) [], 1 unexpected [extra.weight]" in run_cli([tmp_path / "odd.ckpt", out], capsys)
    torch.save({**sd, "control_model.zero_convs.0.weight": torch.zeros(1)}, tmp_path / "odd2.ckpt")
    assert "unexpected key 'control_model.zero_convs.0.weight'" in run_cli([tmp_path / "odd2.ckpt", out], capsys)
    (tmp_path / "diffusers" / "unet").mkdir(parents=True)
    (tmp_path / "diffusers" / "unet" / "config.json").write_text("{}")
    (tmp_path / "diffusers" / "model_index.json").write_text("{}")
    assert "has no 'vae/' part" in run_cli([tmp_path / "diffusers", out], capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*")), "a failed conversion left files behind"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists" in run_cli([ckpt, out], capsys)
    assert (out / "keep.txt").read_text() == "mine"


def test_long_prompt_warns_and_says_what_was_cut():
    tok = sdm.CLIPTokenizer()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = tok("a photo of " + "red " * 80 + "END")
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_id
    assert len(w) == 1 and "over CLIP's 77" in str(w[0].message) and "end" in str(w[0].message)


def test_checkpoints_as_people_have_them(tiny_ldm, tmp_path, capsys, monkeypatch):
    """Original LDM .ckpt files pickle Lightning's ModelCheckpoint and numpy scalars (v1-5-pruned-emaonly.ckpt);
    some carry the VAE's training loss; --ema says which weights it dropped; --to ldm refuses a name that would
    lie about the format; transformers' pytorch_model.bin and diffusers' sharded-variant index are found."""
    import sys
    import types

    import numpy as np

    _, parts, ckpt = tiny_ldm
    sd = wc.read_state_dict(ckpt)
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mod.__name__})
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    torch.save({"state_dict": sd, "global_step": np.int64(840000), "callbacks": {ModelCheckpoint: ModelCheckpoint()}},
               tmp_path / "lightning.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)  # the converting machine has no pytorch_lightning
    assert wc.read_state_dict(tmp_path / "lightning.ckpt").keys() == sd.keys()
    torch.save({**sd, "first_stage_model.loss.logvar": torch.zeros(()),
                "first_stage_model.loss.discriminator.main.0.weight": torch.zeros(2)}, tmp_path / "vae_loss.ckpt")
    wc.main([str(tmp_path / "vae_loss.ckpt"), str(tmp_path / "a")])
    assert "dropped 2 key(s): VAE training-loss weights" in capsys.readouterr().err
    wc.main([str(ckpt), str(tmp_path / "ema"), "--ema"])
    err = capsys.readouterr().err
    assert "replaced by their EMA copy" in err and "EMA copy of the UNet (use --ema" not in err
    assert "name it so ('back.safetensors')" in run_cli([ckpt, tmp_path / "back.ckpt", "--to", "ldm"], capsys)
    assert not (tmp_path / "back.ckpt").exists()
    te = {k: v.clone() for k, v in list(parts["text_encoder"].items())[:4]}
    (tmp_path / "bin").mkdir()
    torch.save(te, tmp_path / "bin" / "pytorch_model.bin")
    assert wc.folder_weights(tmp_path / "bin", "model").keys() == te.keys()
    (tmp_path / "shards").mkdir()
    keys, weight_map = list(te), {}
    for i, chunk in enumerate((keys[:2], keys[2:])):
        name = f"model.fp16-0000{i + 1}-of-00002.safetensors"
        sdm.save_safetensors({k: te[k] for k in chunk}, tmp_path / "shards" / name)
        weight_map.update({k: name for k in chunk})
    (tmp_path / "shards" / "model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": weight_map}))
    got = wc.folder_weights(tmp_path / "shards", "model")
    assert got.keys() == te.keys() and all(torch.equal(got[k], te[k]) for k in te)


def test_single_files_that_say_their_schedule(tiny_ldm, tmp_path):
    """ComfyUI marks v-prediction files with empty `v_pred` / `ztsnr` tensors (NoobAI-XL V-Pred), kohya and
    Stability's ModelSpec with a header; converted as eps, such a model samples noise-shaped garbage."""
    _, _, ckpt = tiny_ldm
    sd = {k: v.contiguous() for k, v in wc.read_state_dict(ckpt).items()}
    cases = {"plain": ({}, {}, ("eps", False, "leading")),
             "comfy_v": ({"v_pred": torch.tensor([])}, {}, ("v", False, "leading")),
             "comfy_ztsnr": ({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, {}, ("v", True, "trailing")),
             "modelspec_v": ({}, {"modelspec.prediction_type": "v"}, ("v", False, "leading")),
             "kohya_v": ({}, {"ss_v_parameterization": "True"}, ("v", False, "leading"))}
    for name, (extra, header, want) in cases.items():
        sdm.save_safetensors({**sd, **extra}, tmp_path / f"{name}.safetensors", header)
        cfg, _ = wc.load_any(tmp_path / f"{name}.safetensors")
        s = cfg.schedule
        assert (s.prediction, s.rescale_betas_zero_snr, s.timestep_spacing) == want, name


def test_to_ldm_writes_the_schedule_markers_so_the_file_reads_back_as_the_same_model(tiny_ldm, tmp_path, monkeypatch):
    """--to ldm of a v-prediction or zero-terminal-SNR model used to write bare weights, which read back as eps:
    the markers (ComfyUI's tensors and the ModelSpec header) carry the schedule out and back in. An SD 2.x file
    that says its prediction then needs no --variant."""
    _, parts, ckpt = tiny_ldm
    for flags, want in (([], ("eps", False, "leading")), (["--zero-terminal-snr"], ("v", True, "trailing"))):
        wc.main([str(ckpt), str(tmp_path / "m"), "--overwrite", *flags])
        wc.main([str(tmp_path / "m"), str(tmp_path / "m.safetensors"), "--to", "ldm", "--overwrite"])
        with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
            assert f.metadata()["modelspec.prediction_type"] == {"v": "v", "eps": "epsilon"}[want[0]]
            assert ("v_pred" in f.keys(), "ztsnr" in f.keys()) == (want[0] == "v", want[1])
        s = wc.load_any(tmp_path / "m.safetensors")[0].schedule
        assert (s.prediction, s.rescale_betas_zero_snr, s.timestep_spacing) == want
    # SD 2.x's 768-v and base models share every shape; two tiny presets of SD2's layout stand in for them
    sd2 = replace(sdm.TINY, text=sdm.CLIPTextConfig(vocab_size=1000, width=1024, layers=2, heads=16, mlp_dim=64, act="gelu", pad_id=0),
                  unet=replace(sdm.TINY.unet, model_channels=64, context_dim=1024, num_heads=None, num_head_channels=64))
    monkeypatch.setattr(sdm, "PRESETS", {**sdm.PRESETS, "sd21": replace(sd2, name="sd21", image_size=768), "sd21-base": sd2})
    torch.manual_seed(0)
    m2 = sdm.StableDiffusion(sd2)
    p2 = {p: getattr(m2, p).state_dict() for p in ("unet", "vae", "text_encoder")}
    for pred, variant in (("v", "sd21"), ("eps", "sd21-base")):
        cfg = replace(sd2, schedule=replace(sd2.schedule, prediction=pred))
        sdm.save_safetensors(wc.to_ldm(cfg, p2), tmp_path / "sd2.safetensors", {"modelspec.prediction_type": pred.replace("eps", "epsilon")})
        got = wc.load_any(tmp_path / "sd2.safetensors")[0]
        assert got.schedule.prediction == pred and got.image_size == sdm.PRESETS[variant].image_size, pred
    sdm.save_safetensors(wc.to_ldm(sd2, p2), tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="pass the variant"):  # a file that says nothing still needs it
        wc.load_any(tmp_path / "bare.safetensors")


def test_a_single_file_without_a_part_is_one_sentence(tiny_ldm, tmp_path, capsys):
    _, _, ckpt = tiny_ldm
    sd = {k: v for k, v in wc.read_state_dict(ckpt).items() if not k.startswith("first_stage_model.")}
    torch.save(sd, tmp_path / "no_vae.ckpt")
    assert "has no vae weights (no 'first_stage_model.*' keys)" in run_cli([tmp_path / "no_vae.ckpt", tmp_path / "o"], capsys)


def test_models_this_project_cannot_run_are_one_sentence(tiny_ldm, tmp_path, capsys, hf_tokenizer_dir):
    """An inpainting UNet (9 input channels) used to convert, then crash mid-sampling on a shape mismatch; an SDXL
    diffusers folder without text_encoder_2/ converted into a UNet that cannot read its text; one without tokenizer/
    padded an SD 2.x prompt the SD 1.x way, silently."""
    from test_pipeline import build_pipeline

    _, _, ckpt = tiny_ldm
    sd = wc.read_state_dict(ckpt)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]  # latents + mask + masked-image latents
    torch.save({**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.cat([w, w, w[:, :1]], 1)}, tmp_path / "inpaint.ckpt")
    assert "inpainting or depth model (its UNet takes 9 input channels)" in run_cli([tmp_path / "inpaint.ckpt", tmp_path / "o"], capsys)
    for kind, part, want in (("sdxl", "text_encoder_2", "UNet reads 64-wide text states and its text encoder(s) give 32"),
                             ("sd2", "tokenizer", "has no 'tokenizer/' part")):
        build_pipeline(kind, hf_tokenizer_dir).save_pretrained(tmp_path / kind)
        shutil.rmtree(tmp_path / kind / part)
        assert want in run_cli([tmp_path / kind, tmp_path / "o"], capsys), kind
    assert not (tmp_path / "o").exists()


def test_another_vae_in_every_naming_people_have_it(tmp_path, hf_tokenizer_dir, capsys):
    """--vae (diffusers' --pretrained_vae_model_name_or_path, kohya's --vae): SD1's ft-mse and SDXL's fp16-fix come as
    diffusers VAE folders, and as single files in LDM naming (A1111's), or inside a whole checkpoint; convert bakes one in."""
    from conftest import assert_close, diffusers_vae
    from test_pipeline import build_pipeline

    build_pipeline("sd1", hf_tokenizer_dir).save_pretrained(tmp_path / "pipe")
    torch.manual_seed(1)
    other = diffusers_vae()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        other.save_pretrained(tmp_path / "vae")
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        want = other.decode(other.encode(x).latent_dist.mean).sample
    pipe = str(tmp_path / "pipe")
    ours = sdm.load_model(pipe, vae=str(tmp_path / "vae")).vae
    assert_close(ours.decode(ours.encode(x).mean), want, rtol=1e-4, what="the model's decode with the diffusers VAE folder")
    assert not torch.equal(sdm.load_model(pipe).vae.encoder.conv_in.weight, ours.encoder.conv_in.weight)
    sdm.save_safetensors(ours.state_dict(), tmp_path / "a1111.vae.safetensors")
    wc.main([pipe, str(tmp_path / "whole.safetensors"), "--to", "ldm", "--vae", str(tmp_path / "vae")])  # baked in
    wc.main([pipe, str(tmp_path / "baked"), "--vae", str(tmp_path / "a1111.vae.safetensors")])
    for vae in ("a1111.vae.safetensors", "whole.safetensors", "baked", "pipe"):
        got = sdm.load_model(pipe, vae=str(tmp_path / vae)).vae.state_dict()
        same = all(torch.equal(got[k], v) for k, v in (sdm.load_model(pipe).vae if vae == "pipe" else ours).state_dict().items())
        assert same, vae
    assert torch.equal(sdm.load_model(str(tmp_path / "baked")).vae.decoder.conv_out.weight, ours.decoder.conv_out.weight)
    deeper = type(other)(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match="not a VAE of this model's shape"):
        sdm.load_model(pipe, vae=str(tmp_path / "deeper"))
    assert "not a VAE of this model's shape" in run_cli([pipe, tmp_path / "o", "--vae", tmp_path / "deeper"], capsys)
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit, match="error: --vae .*deeper"):
        sdm.main(["sample", "--pretrained-model", pipe, "--vae", str(tmp_path / "deeper"), "--output-dir", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()
    with pytest.raises(FileNotFoundError, match="--vae '.*nowhere' does not exist"):
        sdm.load_model(pipe, vae=str(tmp_path / "nowhere"))
