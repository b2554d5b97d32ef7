"""Parity with the reference implementations, fp32 on fixed inputs: build a small model of each kind
in diffusers / transformers / open_clip with random weights, save it the way that library saves it,
convert it with weights_convert.py, load it strictly into sd_model.py, and compare outputs."""

import json
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import assert_close, diffusers_unet, diffusers_vae, hf_text_model, hf_tokenizer, import_open_clip, randomize

import sd_model as sdm
import weights_convert as wc

PROMPTS = [
    "a photo of a cat",
    "A PHOTO   of a Cat!!",
    "an astronaut riding a horse on mars, trending on artstation, 8k, highly detailed",
    "it's a dog's life; they're here, we've been, I'm sure you'll see, he'd go",
    "numbers 2024 and 3.14159, 1st 22nd",
    "unicode: café naïve Zürich, 日本の猫, emoji 🐱🚀",
    "html &amp; entities &lt;b&gt; and   tabs\tand\nnewlines",
    "symbols ~!@#$%^&*()_+-={}[]|:;\"'<>,.?/ and ...",
    "",
    "word " * 100,  # over 77 tokens: cut
]


def load_strict(module, sd):
    wc.check_keys(module.state_dict(), sd, type(module).__name__)
    module.load_state_dict(sd, strict=True)
    return module.eval()


def tokens(prompts, pad_id=49407):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sdm.CLIPTokenizer()(prompts, pad_id=pad_id)


# ---- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_matches_open_clip_and_transformers(hf_tokenizer_dir):
    SimpleTokenizer = import_open_clip().tokenizer.SimpleTokenizer  # openai/CLIP's pure-Python BPE, with ftfy

    assert torch.equal(tokens(PROMPTS, pad_id=0), SimpleTokenizer()(PROMPTS))
    # transformers' fast tokenizer skips CLIP's HTML unescaping ("&amp;" stays 5 characters); we follow CLIP.
    plain = [p for p in PROMPTS if "&" not in p]
    hf = hf_tokenizer(hf_tokenizer_dir)(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tokens(plain), hf.input_ids)


# ---- CLIP text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,projection", [("quick_gelu", None), ("gelu", 24)])
def test_clip_text_matches_transformers(tmp_path, act, projection):
    ref = hf_text_model(act=act, projection=projection)
    ref.save_pretrained(tmp_path)
    sd = wc.hf_clip_layout(wc.folder_weights(tmp_path, "model"), "text_model.")
    cfg = sdm.CLIPTextConfig(width=32, layers=3, heads=4, mlp_dim=69, act=act, projection_dim=projection)
    ours, ours_pen = (load_strict(sdm.CLIPTextModel(c), sd) for c in (cfg, replace(cfg, penultimate=True)))
    ids = tokens(PROMPTS[:4])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
        assert_close(hidden, out.last_hidden_state, what="last layer + final LayerNorm")
        assert_close(pooled, out.text_embeds if projection else out.pooler_output, what="pooled")
        assert_close(ours_pen(ids)[0], out.hidden_states[-2], what="penultimate layer (SDXL)")
        for skip in (2, 3):  # kohya's --clip_skip (train_util.get_hidden_states): final_layer_norm(hidden_states[-skip])
            ours.skip = skip
            assert_close(ours(ids)[0], getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-skip]), what=f"clip skip {skip}")
            assert_close(ours(ids)[1], out.text_embeds if projection else out.pooler_output, what="pooled under clip skip")
        ours.skip = 1
        # token_embeds replaces lookups before the position embeddings: the same as editing the
        # table row of a token that occurs once ("photo" at position 2 of the first prompt)
        v = torch.randn(32)
        emb = ours.token_embedding(ids[:1]).clone()
        emb[:, 2] = v
        ref.get_input_embeddings().weight[ids[0, 2]] = v
        assert_close(ours(ids[:1], emb)[0], ref(ids[:1]).last_hidden_state, what="token_embeds")


def openclip_text(width=64, layers=3, heads=2, output_dim=24):
    TextTransformer = import_open_clip().transformer.TextTransformer

    torch.manual_seed(0)
    model = TextTransformer(width=width, heads=heads, layers=layers, output_dim=output_dim, output_tokens=True).eval()
    randomize(model)
    return model


def test_openclip_text_sd2_and_sdxl_layouts():
    """SD2: OpenCLIP-H keeps 23 of 24 layers (conditions on the penultimate, then the final LN);
    SDXL's second encoder: all layers, penultimate hidden state, projected pooled output."""
    ref = openclip_text()
    ids = tokens(PROMPTS[:4], pad_id=0)
    with torch.no_grad():
        pooled_ref, tokens_ref = ref(ids)
        x = ref.token_embedding(ids) + ref.positional_embedding
        for blk in ref.transformer.resblocks[:-1]:
            x = blk(x, attn_mask=ref.attn_mask)
        sd2_ref = ref.ln_final(x)

        full, _ = wc.openclip_to_hf(ref.state_dict(), "text")
        xl = load_strict(sdm.CLIPTextModel(sdm.CLIPTextConfig(width=64, layers=3, heads=2, mlp_dim=256, act="gelu",
                                                              projection_dim=24, pad_id=0)), full)
        hidden, pooled = xl(ids)
        assert_close(hidden, tokens_ref, what="OpenCLIP tokens")
        assert_close(pooled, pooled_ref, what="OpenCLIP pooled + projection")
        xl_pen = load_strict(sdm.CLIPTextModel(replace(xl.cfg, penultimate=True)), full)
        assert_close(xl_pen(ids)[0], x, what="SDXL penultimate")

        cut, dropped = wc.openclip_to_hf(ref.state_dict(), "text", keep_layers=2)
        assert "text_projection" in dropped and any(k.startswith("transformer.resblocks.2.") for k in dropped)
        sd2 = load_strict(sdm.CLIPTextModel(sdm.CLIPTextConfig(width=64, layers=2, heads=2, mlp_dim=256, act="gelu", pad_id=0)), cut)
        assert_close(sd2(ids)[0], sd2_ref, what="SD2 text conditioning")
        # and back: our HF layout -> OpenCLIP names is exact
        back = wc.hf_to_openclip(full, "text")
        ref_sd = {k: v for k, v in ref.state_dict().items() if k != "attn_mask"}
        assert back.keys() == ref_sd.keys() and all(torch.equal(back[k], ref_sd[k]) for k in back)


# ---- CLIP vision ----------------------------------------------------------------------------------


def test_clip_vision_matches_transformers(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    hcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
                            image_size=28, patch_size=7, projection_dim=16, hidden_act="quick_gelu")
    ref = CLIPVisionModelWithProjection(hcfg).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path)
    cfg, sd = wc.load_clip_vision(tmp_path)
    assert cfg == sdm.CLIPVisionConfig(28, 7, 32, 2, 4, 48, "quick_gelu", 16)
    ours = load_strict(sdm.CLIPVisionModel(cfg), sd)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = ref(px)
        patches, emb = ours(px)
    assert_close(patches, out.last_hidden_state[:, 1:], what="patch tokens")
    assert_close(emb, out.image_embeds, what="projected image embedding")


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_openclip_vision_converts(tmp_path, quick_gelu):
    """An OpenCLIP image tower (ViT-H/14 layout at toy width) saved as an OpenCLIP state dict; a "-quickgelu" model
    (DFN, MetaCLIP) says so only in the hub's open_clip_config.json beside the weights, and used to be read as GELU."""
    oc = import_open_clip()
    torch.manual_seed(0)
    ref = oc.transformer.VisionTransformer(image_size=28, patch_size=7, width=768, layers=2, heads=12, mlp_ratio=0.25, output_dim=16,
                                           output_tokens=True, act_layer=oc.transformer.QuickGELU if quick_gelu else torch.nn.GELU).eval()
    randomize(ref)
    torch.save({"visual." + k: v for k, v in ref.state_dict().items()}, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "quick_gelu": quick_gelu}}))
    cfg, sd = wc.load_clip_vision(tmp_path / "open_clip_pytorch_model.bin")
    assert (cfg.heads, cfg.width, cfg.image_size, cfg.act) == (12, 768, 28, "quick_gelu" if quick_gelu else "gelu")
    ours = load_strict(sdm.CLIPVisionModel(cfg), sd)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        pooled_ref, tokens_ref = ref(px)
        x = ref.transformer(ref._embeds(px))
        patches, emb = ours(px)
    assert_close(emb, pooled_ref, what="pooled, projected")
    # open_clip >= 3 returns tokens after ln_post; 2.x (Subject-Diffusion's) and HF return them before.
    assert_close(patches, x[:, 1:], what="patch tokens before ln_post")
    assert_close(ours.vision_model.post_layernorm(patches), tokens_ref, what="patch tokens after ln_post")


# ---- UNet -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_matches_diffusers(tmp_path, kind):
    ref = diffusers_unet(kind)
    ref.save_pretrained(tmp_path)
    cfg = wc.diffusers_unet_config(ref.config)
    sd = wc.diffusers_unet_to_ldm(wc.folder_weights(tmp_path, "diffusion_pytorch_model"), cfg)
    ours = load_strict(sdm.UNetModel(cfg), sd)
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, ref.config.cross_attention_dim)
    t = torch.tensor([10, 873])
    kw, y = {}, None
    if kind == "sdxl":
        pooled, time_ids = torch.randn(2, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 3, 5, 64, 64]])
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = torch.cat([pooled, sdm.timestep_embedding(time_ids.flatten(), 8).reshape(2, -1)], dim=1)
    with torch.no_grad():
        assert_close(ours(x, t, ctx, y), ref(x, t, ctx, **kw).sample, what=f"{kind} UNet")


def test_unet_ldm_names_match_diffusers_own_single_file_converter():
    """Independent check of the LDM naming: diffusers' own LDM -> diffusers converter accepts our
    state dict and gives its UNet the same function."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ref = diffusers_unet("sd1")
    ours = load_strict(sdm.UNetModel(wc.diffusers_unet_config(ref.config)),
                       wc.diffusers_unet_to_ldm(ref.state_dict(), wc.diffusers_unet_config(ref.config)))
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    other = UNet2DConditionModel(**ref.config).eval()
    other.load_state_dict(converted, strict=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert_close(other(x, 500, ctx).sample, ours(x, 500, ctx), what="diffusers(LDM->diffusers(ours))")


# ---- VAE ------------------------------------------------------------------------------------------


def test_vae_matches_diffusers(tmp_path):
    ref = diffusers_vae()
    ref.save_pretrained(tmp_path)
    cfg = sdm.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    ours = load_strict(sdm.AutoencoderKL(cfg), wc.diffusers_vae_to_ldm(wc.folder_weights(tmp_path, "diffusion_pytorch_model"), cfg))
    img, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        dist, ref_dist = ours.encode(img), ref.encode(img).latent_dist
        assert_close(dist.mean, ref_dist.mean, what="posterior mean")
        assert_close(dist.logvar, ref_dist.logvar, what="posterior log-variance")
        assert_close(dist.sample(torch.Generator().manual_seed(3)), ref_dist.sample(torch.Generator().manual_seed(3)), what="sample")
        assert_close(ours.decode(z), ref.decode(z).sample, what="decode")
