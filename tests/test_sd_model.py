"""Tokenizer placeholders, image loading, the sampling command line, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import sd_model as sdm


def test_placeholder_tokens():
    tok = sdm.CLIPTokenizer()
    assert tok.token_id("dog") == 1929 and tok.token_id("*") == 265
    with pytest.raises(ValueError, match="'sculptures of' is 2 CLIP tokens"):
        tok.token_id("sculptures of")
    ids = tok.add_tokens(["S*", "<cat-toy>"])
    assert ids == [49408, 49409] and len(tok) == 49410
    row = tok("a photo of S* next to a <cat-toy>")[0].tolist()
    assert row[:9] == [49406, 320, 1125, 539, 49408, 1131, 531, 320, 49409] and row[9] == tok.eos_id
    assert tok.token_id("S*") == 49408
    assert tok("a photo of s*")[0, 4].item() != 49408  # placeholders match verbatim, case included
    with pytest.raises(ValueError, match="already a token"):
        tok.add_tokens(["dog"])
    with pytest.raises(ValueError, match="already a token"):
        tok.add_tokens(["S*"])


def test_added_tokens_take_extra_rows_and_leave_the_table_alone(tmp_path):
    torch.manual_seed(0)
    te = sdm.CLIPTextModel(sdm.TINY.text)
    tok = sdm.CLIPTokenizer()
    (sks,) = tok.add_tokens(["<sks>"])
    extra = torch.nn.Parameter(torch.randn(1, 64))
    ids = tok(["a photo of <sks> dog", "a photo of a dog"])
    emb = te.embed(ids, extra)
    assert torch.equal(emb[0, 4], extra[0].detach()) and torch.equal(emb[1], te.token_embedding(ids[1]))
    te(ids, emb)[0].sum().backward()
    assert extra.grad.abs().sum() > 0 and te.token_embedding.weight.grad.shape == (49408, 64)
    # round trips through the formats other tools read
    for fmt, key in (("diffusers", "<sks>"), ("a1111", "emb_params")):
        sdm.save_embeddings(tmp_path / f"{fmt}.safetensors", {"<sks>": extra.detach()}, fmt, {"method": "test"})
        assert torch.equal(sdm.load_embeddings(tmp_path / f"{fmt}.safetensors")[key], extra.detach())
    torch.save({"string_to_param": {"*": extra.detach()}, "name": "sks", "step": 3}, tmp_path / "a1111.pt")
    assert torch.equal(sdm.load_embeddings(tmp_path / "a1111.pt")["*"], extra.detach())


def test_image_loading_converts_modes_and_skips_non_images(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "b_gray.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 0, np.uint8)])).save(tmp_path / "c_rgba.png")  # fully transparent
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "d_16bit.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning, match="skipping 'broken.jpg'"):
        images = dict(sdm.load_image_folder(tmp_path))
    assert sorted(images) == ["a.png", "b_gray.png", "c_rgba.png", "d_16bit.png"]
    assert all(im.mode == "RGB" and im.size == (8, 8) for im in images.values())
    assert np.array_equal(np.asarray(images["c_rgba.png"]), np.full((8, 8, 3), 255))  # transparent -> white
    assert np.array_equal(np.asarray(images["d_16bit.png"])[..., 0], rgb[..., 0])  # 16 bit scaled, not clipped
    t = sdm.image_to_tensor(images["a.png"], 4)
    assert t.shape == (3, 4, 4) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(sdm.tensor_to_images(sdm.image_to_tensor(images["a.png"])[None])[0]), rgb)


def test_a_photos_exif_orientation_is_applied_unless_asked_not_to(tmp_path):
    """A phone photo stores its pixels sideways and says so in EXIF tag 274 (Orientation); 6 = turn 90 degrees clockwise."""
    stored = np.random.default_rng(0).integers(0, 256, (4, 8, 3), dtype=np.uint8)  # 8 wide, 4 high as stored
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright, raw = sdm.load_image(tmp_path / "phone.jpg"), sdm.load_image(tmp_path / "phone.jpg", exif=False)
    assert upright.size == (4, 8) and raw.size == (8, 4)
    assert np.array_equal(np.asarray(upright), np.rot90(np.asarray(raw), k=-1))  # the viewer's picture
    assert dict(sdm.load_image_folder(tmp_path))["phone.jpg"].size == (4, 8)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="'.*notes.jpg' is not a readable image"):  # PIL's own error, with a traceback
        sdm.load_image(tmp_path / "notes.jpg")
    with pytest.raises(FileNotFoundError):
        sdm.load_image(tmp_path / "missing.jpg")


def test_empty_or_missing_image_folder(tmp_path):
    with pytest.raises(ValueError, match="no readable images"):
        sdm.load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sdm.load_image_folder(tmp_path / "missing")


def test_safetensors_writes_are_atomic(tmp_path):
    sdm.save_safetensors({"a": torch.ones(2)}, tmp_path / "x.safetensors", {"method": "test", "steps": 3})
    from safetensors import safe_open

    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"method": "test", "steps": "3"}
    with pytest.raises(RuntimeError):
        sdm.atomic_write(tmp_path / "y.bin", lambda tmp: (open(tmp, "w").write("half"), (_ for _ in ()).throw(RuntimeError())))
    assert list(tmp_path.iterdir()) == [tmp_path / "x.safetensors"]


def test_sdxl_prompt_encoding_layout():
    """SDXL: context = [enc1 penultimate | enc2 penultimate]; y = [pooled enc2 | 6 size ids x 256 sinusoids]."""
    cfg = sdm.SDConfig("xl-tiny", sdm.UNetConfig(), sdm.VAEConfig(), sdm.CLIPTextConfig(width=64, layers=2, heads=1, mlp_dim=64, penultimate=True),
                       sdm.CLIPTextConfig(width=64, layers=2, heads=1, mlp_dim=64, projection_dim=32, pad_id=0, penultimate=True),
                       image_size=64)
    cfg = sdm.replace(cfg, unet=sdm.replace(cfg.unet, adm_in_channels=32 + 6 * 256))
    torch.manual_seed(0)
    te1, te2 = sdm.CLIPTextModel(cfg.text), sdm.CLIPTextModel(cfg.text2)
    model = sdm.StableDiffusion.__new__(sdm.StableDiffusion)
    torch.nn.Module.__init__(model)
    model.cfg, model.text_encoder, model.text_encoder_2, model.tokenizer = cfg, te1, te2, sdm.CLIPTokenizer()
    model.unet = sdm.UNetModel(sdm.TINY.unet)  # only for .device
    c = model.encode_prompt(["a cat", "a dog"], size=(48, 64))
    assert c.context.shape == (2, 77, 128) and c.y.shape == (2, 32 + 1536)
    ids2 = model.tokenize(["a cat", "a dog"], second=True)
    assert ids2[0, -1] == 0  # the second tokenizer pads with "!"
    assert torch.equal(c.context[..., 64:], te2(ids2)[0]) and torch.equal(c.y[:, :32], te2(ids2)[1])
    assert torch.allclose(c.y[0, 32 : 32 + 256], sdm.timestep_embedding(torch.tensor([48.0]), 256)[0])
    u = model.uncond(["", ""], size=(48, 64))
    assert u.context.abs().max() == 0 and u.y[:, :32].abs().max() == 0 and torch.equal(u.y[:, 32:], c.y[:, 32:])


def test_sample_cli_on_a_random_tiny_model(tmp_path, capsys):
    out = tmp_path / "out"
    sdm.main(["sample", "--random-tiny", "--prompt", "a red star", "--output-dir", str(out), "--steps", "2", "--batch-size", "2",
              "--sampler", "euler", "--seed", "3"])
    assert "random weights" in capsys.readouterr().err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0003_00.png", "0003_01.png"] and Image.open(out / files[0]).size == (32, 32)
    with pytest.raises(SystemExit, match="exists and is not empty"):
        sdm.main(["sample", "--random-tiny", "--prompt", "x", "--output-dir", str(out)])
    with pytest.raises(SystemExit, match="does not exist"):
        sdm.main(["sample", "--pretrained-model", str(tmp_path / "nope"), "--prompt", "x", "--output-dir", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="multiples of 4 for this model"):
        sdm.main(["sample", "--random-tiny", "--prompt", "x", "--output-dir", str(tmp_path / "o3"), "--height", "33"])
    assert not (tmp_path / "o3").exists()  # the bad size is found before anything is written
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="is a file"):  # was NotADirectoryError's traceback, --overwrite or not
        sdm.main(["sample", "--random-tiny", "--prompt", "x", "--output-dir", str(tmp_path / "a_file"), "--overwrite"])
    if not torch.cuda.is_available():  # was an AssertionError traceback from torch
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            sdm.main(["sample", "--random-tiny", "--prompt", "x", "--output-dir", str(tmp_path / "o4"), "--device", "cuda"])


def test_speed_switches_change_the_speed_not_the_result():
    """--channels-last gives the same images; --compile compiles in place (lazily), so checkpoints keep
    their keys. Compiling for real takes minutes on a CPU: the slow test below runs it on a GPU."""
    plain, fast = sdm.load_model(""), sdm.load_model("", channels_last=True, compile=True)
    assert fast.unet._compiled_call_impl is not None and fast.unet.state_dict().keys() == plain.unet.state_dict().keys()
    fast.unet._compiled_call_impl = None  # eager from here: channels-last alone
    assert fast.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = (m.sample(["a red star"], steps=2, latents=latents, progress=False) for m in (plain, fast))
    assert torch.allclose(a, b, atol=1e-4)  # other convolution kernels: rounding differs


@pytest.mark.parametrize("linear", [False, True])
def test_attention_inputs_are_contiguous(monkeypatch, linear):
    """Layout is speed here: a LayerNorm fed a transposed view copies it first (and a residual sum keeps the
    view), and CPU SDPA given q/k/v whose last dimension is strided falls back to the full attention matrix
    (the VAE's single head: 1 GiB at 1024 px). README "Performance" has what fixing them gained."""
    from dataclasses import replace

    torch.manual_seed(0)
    unet = sdm.UNetModel(replace(sdm.TINY.unet, use_linear_in_transformer=linear))
    seen = []
    for m in unet.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 77, sdm.TINY.unet.context_dim)).sum().backward()
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} LayerNorm inputs were transposed views"
    sdpa, qkv = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: qkv.append([t.is_contiguous() for t in (q, k, v)]) or sdpa(q, k, v, *a, **kw))
    vae = sdm.AutoencoderKL(sdm.TINY.vae)
    with torch.no_grad():
        vae.decode(vae.encode(torch.randn(1, 3, 32, 32)).mean)
    assert qkv == [[True] * 3] * 2  # the encoder's and the decoder's mid-block attention


def test_the_vae_encodes_in_chunks_with_the_same_posterior():
    """encode(x, chunk=8), what the methods' latent caches use: the encoder sees 8 images a pass, and the posterior
    is the whole batch's (to float rounding); chunk 0 is one pass."""
    torch.manual_seed(0)
    vae, x, seen = sdm.AutoencoderKL(sdm.TINY.vae).eval(), torch.randn(10, 3, 16, 16), []
    vae.encoder.register_forward_pre_hook(lambda mod, args: seen.append(len(args[0])))
    with torch.no_grad():
        whole, parts = vae.encode(x), vae.encode(x, chunk=8)
    assert seen == [10, 8, 2]
    torch.testing.assert_close(parts.mean, whole.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.std, whole.std, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_unet_matches_eager_on_gpu():
    plain, fast = sdm.load_model("", device="cuda"), sdm.load_model("", device="cuda", compile=True)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).cuda()
    a, b = (m.sample(["a red star", "a blue moon"], steps=3, latents=latents, progress=False) for m in (plain, fast))
    assert torch.allclose(a, b, atol=1e-3)


def test_sdxl_keeps_its_vae_in_fp32_at_fp16_unless_asked(tmp_path):
    """SDXL's VAE overflows in fp16 (NaN or black images; diffusers' SDXL pipelines upcast it, `force_upcast`), so an
    fp16 SDXL loads with an fp32 VAE unless --vae-precision says otherwise; SD1/SD2 and bf16 keep one dtype."""
    import weights_convert as wc
    from conftest import TINY_XL

    for name, cfg in (("sd1", sdm.TINY), ("sdxl", TINY_XL)):
        model = sdm.StableDiffusion(cfg)
        wc.write_parts(tmp_path / name, cfg, {p: getattr(model, p).state_dict() for p in ("unet", "vae", "text_encoder", "text_encoder_2")
                                              if getattr(model, p) is not None})
    vae = lambda name, *a: sdm.load_model(str(tmp_path / name), *a).vae.quant_conv.weight.dtype
    assert vae("sdxl", "fp16") == torch.float32 and vae("sdxl", "fp16", "fp16") == torch.float16
    assert vae("sdxl", "bf16") == torch.bfloat16 and vae("sd1", "fp16") == torch.float16
    assert sdm.load_model(str(tmp_path / "sdxl"), "fp16").unet.out[2].weight.dtype == torch.float16


def test_clip_skip_reaches_the_prompt_encoding_and_is_refused_where_it_cannot_apply(tmp_path):
    """--clip-skip 2 (A1111's "Clip skip", kohya's --clip_skip) conditions SD 1.x on the penultimate text layer after the
    final LayerNorm (the layer math is pinned to transformers in test_parity); SDXL already reads penultimate layers."""
    import weights_convert as wc
    from conftest import TINY_XL

    model = sdm.StableDiffusion(TINY_XL)
    wc.write_parts(tmp_path / "sdxl", TINY_XL, {p: getattr(model, p).state_dict() for p in ("unet", "vae", "text_encoder", "text_encoder_2")})
    with pytest.raises(ValueError, match="--clip-skip 2: SDXL already conditions on its text towers' penultimate layers"):
        sdm.load_model(str(tmp_path / "sdxl"), clip_skip=2)
    plain, skipped = sdm.load_model(""), sdm.load_model("", clip_skip=2)
    te, ids = plain.text_encoder, plain.tokenize(["a red star"])
    states = []
    with torch.no_grad():
        handle = te.text_model.encoder.layers[-1].register_forward_pre_hook(lambda m, a: states.append(a[0]))
        te(ids)
        handle.remove()
    want = te.text_model.final_layer_norm(states[0])
    assert torch.equal(skipped.encode_prompt(["a red star"]).context, want)
    assert not torch.allclose(plain.encode_prompt(["a red star"]).context, want)
    layers = plain.cfg.text.layers
    with pytest.raises(SystemExit, match=f"--clip-skip {layers + 1}: this text encoder has {layers} layers"):
        sdm.main(["sample", "--clip-skip", str(layers + 1), "--prompt", "x", "--output-dir", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()
