"""ViCo (vico.py): the method card's section-14 checks, on tiny random models."""

import inspect
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_XL, assert_close
from PIL import Image
from safetensors import safe_open

import sd_model as sdm
import vico

T = torch.tensor([10, 700])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sdm.StableDiffusion(sdm.TINY).eval().requires_grad_(False)


def make_vico(model, placeholders=("S*",), **kw):
    torch.manual_seed(1)
    ids = vico.add_placeholders(model, list(placeholders))
    init = model.text_encoder.token_embedding.weight[[model.tokenizer.token_id("dog")] * len(ids)]
    return vico.ViCo(model.unet, list(placeholders), ids, init, **kw)


def inputs(model, v, prompts=("a photo of a S*", "S* on the grass"), seed=2):
    g = torch.Generator().manual_seed(seed)
    ctx = model.encode_prompt(list(prompts), extra=(v.text_rows(49408), None)).context
    ids = model.tokenize(list(prompts))
    cols = vico.token_columns(ids, v.token_ids[0], "S*")
    x, r = torch.randn(2, len(prompts), 4, 16, 16, generator=g)
    return x, r, ctx, cols, (ids == 49407).int().argmax(-1)


# ---- placement, parameter count and the official key names (card 2, 4.4)


def test_image_layers_and_parameter_count_on_sd15_and_the_toy_model():
    import toy_world

    with torch.device("meta"):
        unet = sdm.UNetModel(sdm.SD15.unet)
        v = vico.ViCo(unet, ["S*"], [49408], torch.zeros(1, 768))
    assert v.layers == [f"output_blocks.{i}.1" for i in (4, 6, 8, 10)]
    sizes = [sum(p.numel() for p in v.image_blocks[k].parameters()) for k in v.image_blocks]
    assert sizes == [32_789_760, 8_202_880, 8_202_880, 2_053_440] and sum(sizes) == 51_248_960
    assert [v.image_blocks[k].attn2.to_k.in_features for k in v.image_blocks] == [1280, 640, 640, 320]  # C, not 768
    keys = vico.official_state_dict(v)
    assert len(keys) == 80 and "diffusion_model.output_blocks.4.1.image_cross_attention.ff.net.0.proj.weight" in keys
    assert keys["diffusion_model.output_blocks.4.1.image_cross_attention.ff.net.0.proj.weight"].shape == (8 * 1280, 1280)
    with torch.device("meta"):
        assert vico.image_layers(sdm.UNetModel(toy_world.TOY_SD.unet)) == v.layers


# ---- the two streams (card 3) and the identity of zeroed blocks (card 14.2-3)


def test_zeroed_blocks_give_exactly_the_plain_unet_and_default_init_does_not(model):
    v = make_vico(model, zero_init=True)
    x, r, ctx, cols, eot = inputs(model, v)
    plain = model.unet(x, T, ctx)
    with v.install(model.unet):
        eps, _ = v.denoise(model.unet, x, T, ctx, r[None], cols[None])
        eps2, _ = v.denoise(model.unet, x, T, ctx, 5 * torch.randn_like(r)[None], cols[None])
    assert_close(eps, plain, what="zeroed blocks")
    assert_close(eps2, plain, what="zeroed blocks, another reference")
    v = make_vico(model)
    with v.install(model.unet):
        eps, _ = v.denoise(model.unet, x, T, ctx, r[None], cols[None])
    assert (eps - plain).abs().max() > 1e-3


def test_reference_stream_is_the_plain_unet_and_ignores_the_noisy_latent(model):
    v = make_vico(model)
    x, r, ctx, cols, _ = inputs(model, v)
    seen = {}
    hooks = [model.unet.get_submodule(f"{layer}.transformer_blocks.0").register_forward_hook(
        lambda mod, inp, out, layer=layer: seen.__setitem__(layer, out)) for layer in v.layers]
    try:
        plain_out = model.unet(r, T, ctx)
        plain = dict(seen)
        runs = []
        with v.install(model.unet):
            for xx in (x, x + 3 * torch.randn_like(x)):
                v.denoise(model.unet, xx, T, ctx, r[None], cols[None])
                runs.append({k: o[len(x):] for k, o in seen.items()})
                # past the last image layer the reference rows are dropped (card 15): the output is the noisy rows'
                out = model.unet(torch.cat([xx, r]), T.repeat(2), ctx.repeat(2, 1, 1))
                assert out.shape == xx.shape and not torch.allclose(out, plain_out[: len(xx)])
    finally:
        for h in hooks:
            h.remove()
    for layer in v.layers:
        assert_close(runs[0][layer], plain[layer], what=f"r̂ at {layer}")
        assert torch.equal(runs[0][layer], runs[1][layer])


def test_hooks_leave_nothing_behind_and_unet_state_dict_is_the_checkpoint(model):
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    v = make_vico(model)
    x, r, ctx, cols, _ = inputs(model, v)
    with v.install(model.unet):
        v.denoise(model.unet, x, T, ctx, r[None], cols[None])
    assert all(m.processor is None for m in model.unet.modules() if isinstance(m, sdm.Attention))
    assert all(b.after_block is None for b in model.unet.modules() if isinstance(b, sdm.BasicTransformerBlock))
    assert model.unet.state_dict().keys() == before.keys() and all(torch.equal(before[k], t) for k, t in model.unet.state_dict().items())


def test_one_image_block_per_layer_after_its_last_transformer_block(monkeypatch):
    """SDXL-like depth 2: the image block sits once per layer, after the layer's whole text transformer (card 3),
    and the mask is read from that last block's attn2."""
    torch.manual_seed(0)
    unet = sdm.UNetModel(sdm.replace(sdm.TINY.unet, transformer_depth=(2, 2), transformer_depth_middle=2)).requires_grad_(False)
    v = vico.ViCo(unet, ["S*"], [49408], torch.zeros(1, 64))
    assert v.layers == ["output_blocks.1.1", "output_blocks.3.1"]
    calls, image_attention = [], v.image_attention
    monkeypatch.setattr(v, "image_attention", lambda layer, *a: calls.append(layer) or image_attention(layer, *a))
    g = torch.Generator().manual_seed(0)
    x, r, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    with v.install(unet):
        hooked = [b.name for b in unet.modules() if isinstance(b, sdm.BasicTransformerBlock) and b.after_block is not None]
        probed = [a.name for a in unet.modules() if isinstance(a, sdm.Attention) and a.processor is not None]
        _, reg = v.denoise(unet, x, T, ctx, r[None], torch.tensor([[5, 1]]), torch.tensor([6, 3]))
    assert hooked == [f"{layer}.transformer_blocks.1" for layer in v.layers]
    assert probed == [f"{layer}.transformer_blocks.1.attn2" for layer in v.layers]
    assert calls == v.layers and reg > 0




def test_sdxl_is_refused_when_loading(tmp_path):
    xl = sdm.StableDiffusion(TINY_XL).eval().requires_grad_(False)
    args = vico.ViCoArgs(images=[str(write_images(tmp_path / "imgs", 1))], init_word=["dog"], output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="not SDXL"):
        vico.train(args, xl)
    with pytest.raises(ValueError, match="not SDXL"):
        vico.load_concept(xl, tmp_path)
    assert not (tmp_path / "run").exists()


# ---- the mask (card 5) and the regulariser (card 6)


def otsu_loop(a):
    """attention.py l.66-97 of the official code, line by line (the reference for the vectorised one)."""
    norm = (a - a.min(-1, keepdim=True)[0]) / (a.max(-1, keepdim=True)[0] - a.min(-1, keepdim=True)[0])
    N, h, out = 10, a.shape[1], []
    for i in range(a.shape[0]):
        thr, max_g = 0.0, 0.0
        for t in range(N):
            m = norm[i]
            low, high = m[m < t / N], m[m >= t / N]
            g = low.shape[0] / h * high.shape[0] / h * ((low.mean() - high.mean()) ** 2)
            if g > max_g:
                max_g, thr = g, t / N
        m = norm[i].clone()
        m[m < thr] = 0
        m[m > thr] = 1
        out.append(m)
    return torch.stack(out).bool()


def test_otsu_hand_values_and_the_official_loop():
    a = torch.tensor([[2.0, 3, 4.5, 6, 15, 17, 20]])
    assert vico.otsu_mask(a).tolist() == [[False] * 4 + [True] * 3]  # ties at 0.3 .. 0.7: 0.3 wins
    assert vico.otsu_mask(torch.arange(10.0)[None]).tolist() == [[False] * 5 + [True] * 5]  # k/9: τ = 0.5
    assert vico.otsu_mask(torch.full((1, 6), 0.3)).all()  # constant: NaN in the code, all foreground
    a = torch.tensor([[0.0] * 4 + [0.05] * 4 + [0.41, 0.5, 0.55] + [0.95] * 4 + [1.0] * 4])  # τ = 0.5 = a[9] ...
    assert vico.otsu_mask(a).tolist() == otsu_loop(a).tolist() == [[False] * 9 + [True] * 10]  # ... u == τ stays foreground
    g = torch.Generator().manual_seed(0)
    for shape in ((64, 16), (8, 256), (4, 1024)):
        a = torch.rand(shape, generator=g) ** 3
        m = vico.otsu_mask(a)
        assert torch.equal(m, otsu_loop(a))
        assert m[torch.arange(len(a)), a.argmax(-1)].all() and not m.all(-1).any()


def test_regulariser_hand_value_and_where_its_gradient_goes(model):
    a_s = torch.tensor([[0.1, 0.2, 0.4, 0.2]], requires_grad=True)
    a_e = torch.tensor([[0.2, 0.2, 0.2, 0.4]], requires_grad=True)
    loss = vico.attention_regularizer(a_s, a_e)
    assert abs(loss.item() - 0.140625) < 1e-7  # mean([.0625, 0, .25, .25])
    loss.backward()
    assert a_e.grad is None and a_s.grad.abs().sum() > 0
    v = make_vico(model)
    x, r, ctx, cols, eot = inputs(model, v)
    v.embeddings.requires_grad_(True)
    with v.install(model.unet):
        ctx = model.encode_prompt(["a photo of a S*", "S* on the grass"], extra=(v.text_rows(49408), None)).context
        _, reg = v.denoise(model.unet, x, T, ctx, r[None], cols[None], eot)
        assert set(v.call.reg) == set(v.layers) and reg > 0
        reg.backward()
    assert v.embeddings.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in v.image_blocks.parameters())


def test_masked_attention_zero_on_background_sums_to_one_and_only_on_attn2():
    g = torch.Generator().manual_seed(0)
    q, k, v_ = (torch.randn(2, 4, n, 8, generator=g) for n in (5, 12, 12))
    mask = torch.rand(2, 12, generator=g) > 0.5
    mask[:, 0] = True
    attn = sdm.Attention(32, heads=4, dim_head=8)
    out = vico.masked_attention(attn, q, k, v_, mask)
    logits = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~mask[:, None, None], -torch.finfo(torch.float32).max)
    assert_close(out, logits.softmax(-1) @ v_, what="masked softmax")
    v2 = torch.where(mask[:, None, :, None], v_, 1e3 * torch.randn_like(v_))  # background values change ...
    assert_close(vico.masked_attention(attn, q, k, v2, mask), out, atol=1e-6, what="background")  # ... nothing else
    assert_close(vico.masked_attention(attn, q, k, torch.ones_like(v_), mask), torch.ones_like(q), what="rows sum to 1")
    full = torch.ones_like(mask)
    assert_close(vico.masked_attention(attn, q, k, v_, full), F.scaled_dot_product_attention(q, k, v_), what="all-true")
    p = sdm.attention_probs(attn, q, k)
    assert_close(vico.masked_attention(attn, q, k, v_, mask, "multiply"), (p * mask[:, None, None]) @ v_, what="Eq. 5")
    # inside A_I the mask reaches the cross-attention only: rebuild the block by hand
    torch.manual_seed(0)
    with torch.no_grad():
        unet = sdm.UNetModel(sdm.TINY.unet)
        vc = vico.ViCo(unet, ["S*"], [49408], torch.zeros(1, 64))
        layer = vc.layers[0]
        b = vc.image_blocks[layer.replace(".", "_")]
        x, ref = torch.randn(2, 6, 64, generator=g), torch.randn(2, 12, 64, generator=g)
        h1 = x + b.attn1(b.norm1(x))
        qq, kk, vv = (t.view(2, -1, b.attn2.heads, 8).transpose(1, 2) for t in (b.attn2.to_q(b.norm2(h1)), b.attn2.to_k(ref), b.attn2.to_v(ref)))
        lg = (qq @ kk.transpose(-1, -2) * 8**-0.5).masked_fill(~mask[:, None, None], -torch.finfo(torch.float32).max)
        h2 = h1 + b.attn2.to_out((lg.softmax(-1) @ vv).transpose(1, 2).reshape(2, 6, 64))
        assert_close(vc.image_attention(layer, x, ref, mask), h2 + b.ff(b.norm3(h2)), what="A_I by hand")
        assert b.attn2.processor is None and b.attn1.processor is None


def test_token_columns_and_the_per_sample_gather(model):
    v = make_vico(model)
    ids = model.tokenize(["a photo of a S*", "", "S* on the grass"])
    assert vico.token_columns(ids[:1], v.token_ids[0], "S*").tolist() == [5]
    assert (ids[:1] == 49407).int().argmax(-1).tolist() == [6]
    assert ids[1].tolist() == [49406] + [49407] * 76
    with pytest.raises(ValueError, match="has no 'S\\*'"):
        vico.token_columns(ids, v.token_ids[0], "S*")
    # batch of two prompts with S* at different columns: each sample's mask is its own (card 5.7)
    x, r, ctx, cols, eot = inputs(model, v)
    assert cols.tolist() == [5, 1]
    with v.install(model.unet):
        v.denoise(model.unet, x, T, ctx, r[None], cols[None], eot)
        both = dict(v.call.masks)
        for b in range(2):
            v.denoise(model.unet, x[b : b + 1], T[b : b + 1], ctx[b : b + 1], r[None, b : b + 1], cols[None, b : b + 1])
            for layer, m in v.call.masks.items():
                assert torch.equal(both[layer][b], m[0]), (layer, b)
    assert any(not torch.equal(m[0], m[1]) for m in both.values())


# ---- guidance and several references (card 9, App. C)


def test_cfg_limits_and_the_unconditional_mask(model):
    v = make_vico(model)
    x, r, ctx, cols, _ = inputs(model, v)
    uc = model.encode_prompt(["", ""]).context
    with v.install(model.unet):
        cond_only, _ = v.denoise(model.unet, x, T, ctx, r[None], cols[None])
        masks_c = dict(v.call.masks)
        uncond_only, _ = v.denoise(model.unet, x, T, uc, r[None], cols[None])
        masks_u = dict(v.call.masks)
        for s in (0.0, 1.0, 7.5):
            seen = {}
            fn = vico.model_fn(model, v, ctx, uc, r[None], cols[None], s + 1e-9 if s == 1.0 else s,
                               on_step=lambda i, m: seen.update(m))
            out = fn(x, T, 0)
            assert_close(out, uncond_only + s * (cond_only - uncond_only), what=f"scale {s}")
            for layer in v.layers:  # rows [x_u; x_c | r_u; r_c]: the uncond rows use column i of the "" map
                assert torch.equal(seen[layer][:2], masks_u[layer]) and torch.equal(seen[layer][2:], masks_c[layer])
        assert_close(vico.model_fn(model, v, ctx, uc, r[None], cols[None], 1.0)(x, T, 0), cond_only, what="scale 1")


def test_two_identical_references_equal_one(model):
    v = make_vico(model)
    x, r, ctx, cols, _ = inputs(model, v)
    with v.install(model.unet):
        one, _ = v.denoise(model.unet, x, T, ctx, r[None], cols[None])
        two, _ = v.denoise(model.unet, x, T, ctx, torch.stack([r, r]), torch.stack([cols, cols]))
        other, _ = v.denoise(model.unet, x, T, ctx, torch.stack([r, torch.randn_like(r)]), torch.stack([cols, cols]))
    assert_close(two, one, what="two identical references")
    assert (other - one).abs().max() > 1e-4


# ---- training: data, optimizer, trainable set, gradient checkpointing, resume (card 8, 14.8-10)


def test_templates_and_reference_draws():
    t = vico.IMAGENET_TEMPLATES
    assert len(t) == 81 and len(set(t)) == 57
    assert t[0] == "a photo of a {}" and t[27] == "an illustration of a {}" and t[-1] == "a depiction of a small {}"
    g = torch.Generator().manual_seed(0)
    assert all(i == j for _, i, j, _ in vico.draw_batch(g, [1], 81, 50))  # one image: it is its own reference
    draws = vico.draw_batch(g, [4, 3], 81, 400)
    assert all(i != j for _, i, j, _ in draws)
    assert {(c, i, j) for c, i, j, _ in draws} == {(c, i, j) for c, n in enumerate((4, 3)) for i in range(n) for j in range(n) if i != j}


def write_images(folder, n=2, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def run_train(model, out, steps, **kw):
    args = vico.ViCoArgs(images=[str(kw.pop("images"))], init_word=["dog"], output_dir=str(out), max_train_steps=steps,
                         checkpointing_steps=kw.pop("checkpointing_steps", steps), **kw)
    return vico.train(args, model)


def test_only_the_tokens_and_the_blocks_change_and_the_optimizer_groups(model, tmp_path, capsys):
    before = {p: {k: t.clone() for k, t in getattr(model, p).state_dict().items()} for p in ("unet", "vae", "text_encoder")}
    v = run_train(model, tmp_path / "a", 1, images=write_images(tmp_path / "imgs", 1))
    assert f"'{tmp_path / 'imgs'}' holds one image: it is also its own reference" in capsys.readouterr().err
    init = model.text_encoder.token_embedding.weight[model.tokenizer.token_id("dog")]
    assert not torch.equal(v.embeddings[0], init)
    for p in ("unet", "vae", "text_encoder"):
        assert all(torch.equal(before[p][k], t) for k, t in getattr(model, p).state_dict().items()), p
    args = vico.ViCoArgs(train_batch_size=2, gradient_accumulation_steps=3)
    groups = vico.make_optimizer(v, args).param_groups
    assert [g["lr"] for g in groups] == [5e-3 * 6, 1e-5] and [g["weight_decay"] for g in groups] == [0.01, 0.01]
    assert groups[0]["params"] == [v.embeddings] and len(groups[1]["params"]) == len(list(v.image_blocks.parameters()))
    saved = sdm.load_embeddings(tmp_path / "a" / "learned_embeds.safetensors")
    assert torch.equal(saved["S*"], v.embeddings.detach()[:1])
    assert torch.equal(sdm.load_embeddings(tmp_path / "a" / "a1111" / "Sstar.safetensors")["emb_params"], saved["S*"])


def test_blocks_change_after_a_step(model, tmp_path, capsys):
    v = run_train(model, tmp_path / "a", 1, images=write_images(tmp_path / "imgs", 2), seed=1)
    assert "its own reference" not in capsys.readouterr().err
    init = make_vico(model).image_blocks.state_dict()  # train() seeds before building the blocks, as make_vico does
    changed = [k for k, t in v.image_blocks.state_dict().items() if not torch.equal(t, init[k])]
    assert len(changed) == len(init)  # every block tensor moved


def test_gradient_checkpointing_gives_the_same_gradients(model, monkeypatch):
    v = make_vico(model)
    v.embeddings.requires_grad_(True)
    x, r, ctx, cols, eot = inputs(model, v)
    grads, calls, checkpoint = [], [], sdm.checkpoint
    monkeypatch.setattr(sdm, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    for ckpt in (False, True):
        calls.clear()
        model.unet.gradient_checkpointing = ckpt
        v.zero_grad()
        with torch.enable_grad(), v.install(model.unet):
            ctx = model.encode_prompt(["a photo of a S*", "S* on the grass"], extra=(v.text_rows(49408), None)).context
            eps, reg = v.denoise(model.unet, x, T, ctx, r[None], cols[None], eot)
            (eps.square().mean() + 5e-4 * reg).backward()
        grads.append([v.embeddings.grad.clone()] + [p.grad.clone() for p in v.image_blocks.parameters()])
        # every input, middle and output block ran through torch.utils.checkpoint, and only when asked
        assert len(calls) == (len(model.unet.input_blocks) + 1 + len(model.unet.output_blocks)) * ckpt
    model.unet.gradient_checkpointing = False
    for a, b in zip(*grads):
        assert_close(b, a, rtol=1e-4, what="gradient with checkpointing")


def test_resume_equals_an_uninterrupted_run(model, tmp_path):
    images = write_images(tmp_path / "imgs", 3)
    full = run_train(model, tmp_path / "a", 4, images=images, checkpointing_steps=2, train_batch_size=2)
    run_train(model, tmp_path / "b", 2, images=images, checkpointing_steps=2, train_batch_size=2)
    resumed = run_train(model, tmp_path / "b", 4, images=images, checkpointing_steps=2, train_batch_size=2, resume="latest")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    logs = lambda d: [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert logs("a")[2:] == logs("b")[2:] and all(r["reg"] > 0 for r in logs("a"))


def test_logged_loss_is_the_mse_plus_the_weighted_regulariser(model, tmp_path):
    """Card 14.7 / Eq. 7: loss = eps-MSE + 5e-4 x (the regulariser summed over the image layers), read back from log.jsonl."""
    run_train(model, tmp_path / "a", 3, images=write_images(tmp_path / "imgs", 2), train_batch_size=2)
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3
    for r in logs:
        assert r["reg"] > 0 and r["mse"] > 0
        assert abs(r["loss"] - (r["mse"] + 5e-4 * r["reg"])) <= 1e-6 * r["loss"], r


def test_metadata_has_the_learning_rates_and_export_keeps_the_training_facts(model, model_dir, tmp_path):
    run_train(model, tmp_path / "run", 1, images=write_images(tmp_path / "imgs", 2), train_batch_size=2, seed=7)
    vico.main(["export", "--pretrained-model", str(model_dir), "--concept", str(tmp_path / "run"), "--format", "vico",
               "--output-dir", str(tmp_path / "back")])
    with safe_open(str(tmp_path / "run" / "vico.safetensors"), "pt") as a, safe_open(str(tmp_path / "back" / "vico.safetensors"), "pt") as b:
        src, dst = a.metadata(), b.metadata()
    assert json.loads(src["learning_rates"]) == {"tokens": pytest.approx(5e-3 * 2), "image_blocks": 1e-5}  # S* scaled by the batch
    assert (json.loads(src["init_words"]), json.loads(src["seed"]), json.loads(src["step"])) == (["dog"], 7, 1)
    for k in ("init_words", "seed", "step", "learning_rates"):
        assert dst[k] == src[k], k
    assert dst["converted_from"] == str(tmp_path / "run")


def test_cached_latents_train_as_encoding_every_step(model, tmp_path, monkeypatch):
    """The cache is exact: the same draws from the same posterior, so --no-cache-latents trains the same way (to
    float rounding: one image encoded alone against all at once; Adam's first steps are sign-like, hence the losses)."""
    images, calls, encode = write_images(tmp_path / "imgs", 10), [], model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x, chunk=0: calls.append((len(x), chunk)) or encode(x, chunk))
    run_train(model, tmp_path / "a", 3, images=images, train_batch_size=2)
    assert calls == [(10, 8)]  # the ten images, once, 8 a pass (the peak of a large folder stays small)
    calls.clear()
    run_train(model, tmp_path / "b", 3, images=images, train_batch_size=2, cache_latents=False)
    assert calls == [(1, 0)] * 12  # 3 steps x 2 samples x (training image + reference)
    calls.clear()
    run_train(model, tmp_path / "ti", 3, images=images, train_batch_size=2, cache_latents=False, visual_condition=False)
    assert calls == [(1, 0)] * 6  # textual inversion has no reference to encode
    logs = lambda d: [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert len(logs("a")) == len(logs("b")) == 3
    for a, b in zip(logs("a"), logs("b")):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) and abs(a["reg"] - b["reg"]) <= 1e-4 * abs(a["reg"]), (a, b)


def test_textual_inversion_mode_has_no_blocks_and_trains_the_token(model, tmp_path):
    v = run_train(model, tmp_path / "a", 1, images=write_images(tmp_path / "imgs", 2), visual_condition=False)
    assert not v.layers and len(v.image_blocks) == 0 and len(vico.make_optimizer(v, vico.ViCoArgs()).param_groups) == 1
    w = vico.load_concept(model, tmp_path / "a")
    assert not w.visual_condition and torch.equal(w.embeddings, v.embeddings.detach())
    images = vico.generate(model, w, ["a S* on the grass"], steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (1, 3, 32, 32)


# ---- files: ours and the official release's (card 4.4, 10)


def test_official_release_files_load_strictly_sample_and_round_trip(model, tmp_path):
    v = make_vico(model)
    with torch.no_grad():
        v.embeddings.normal_()
    folder = tmp_path / "release"
    folder.mkdir()
    # what on_save_checkpoint writes: the 80-tensor (here 40) state dict and the EmbeddingManager pickle
    torch.save({k: t.clone() for k, t in vico.official_state_dict(v).items()}, folder / "cross_attention-399.pt")
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": nn.ParameterDict({"*": nn.Parameter(v.embeddings.detach().clone())})}, folder / "embeddings_gs-399.pt")
    torch.save({}, folder / "cross_attention-99.pt")  # an earlier checkpoint, broken on purpose
    (folder / "embeddings_gs-99.pt").write_bytes((folder / "embeddings_gs-399.pt").read_bytes())
    w = vico.load_concept(model, folder, step="399")
    assert w.placeholders == ["S*"] and torch.equal(w.embeddings, v.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(w.state_dict().values(), v.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit"):
        vico.load_concept(model, folder, step="99")
    (folder / "embeddings_gs-499.pt").write_bytes((folder / "embeddings_gs-399.pt").read_bytes())  # no blocks of step 499
    assert torch.equal(vico.load_official(folder)[1]["*"], v.embeddings)  # the highest step with both files: 399
    with pytest.raises(FileNotFoundError, match="no cross_attention-499.pt with its embeddings_gs .* with both: 99, 399"):
        vico.load_official(folder, "499")
    pair = tmp_path / "unnumbered"  # the latest step's copies on_save_checkpoint also writes, alone
    pair.mkdir()
    (pair / "cross_attention.pt").write_bytes((folder / "cross_attention-399.pt").read_bytes())
    (pair / "embeddings.pt").write_bytes((folder / "embeddings_gs-399.pt").read_bytes())
    assert torch.equal(vico.load_official(pair)[1]["*"], v.embeddings) and vico.load_official(pair)[2] == -1
    # the official log folder (what vico_txt2img.py takes as --ft_path): the files are in its checkpoints/
    logdir = tmp_path / "logs" / "dog"
    (logdir / "configs").mkdir(parents=True)
    folder.rename(logdir / "checkpoints")
    assert vico.load_concept(model, logdir, step="399").metadata == {"step": "400"}  # file -399 = the weights after 400 steps
    with pytest.raises(ValueError, match=r"--placeholder '\*' is already a CLIP token, .* 'a photo of S\* on the beach'"):
        vico.load_concept(model, logdir, "*")  # what the official prompts write
    path = vico.save_official(w, tmp_path / "out", 399, model.tokenizer.token_id("*"))
    assert path == tmp_path / "out" / "checkpoints"  # the log-folder layout: --ft_path out --load_step 399
    blocks, rows, step = vico.load_official(tmp_path / "out")
    assert blocks.keys() == vico.official_state_dict(v).keys() and torch.equal(rows["*"], v.embeddings) and step == 399
    vico.save_concept(w, tmp_path / "ours", {"base_model": "tiny"})
    u = vico.load_concept(model, tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(u.state_dict().values(), v.state_dict().values()))
    vico.save_concept(make_vico(model), tmp_path / "ours" / "checkpoint-5", {"base_model": "tiny"})  # --step of our run folder
    assert not torch.equal(vico.load_concept(model, tmp_path / "ours", step="5").embeddings, u.embeddings)
    with pytest.raises(FileNotFoundError, match="no checkpoint-7 in .* \\(checkpoints: 5\\)"):
        vico.load_concept(model, tmp_path / "ours", step="7")
    (tmp_path / "stopped").mkdir()  # a run stopped before its end has checkpoints only
    (tmp_path / "ours" / "checkpoint-5").rename(tmp_path / "stopped" / "checkpoint-5")
    assert vico.load_concept(model, tmp_path / "stopped", step="5").placeholders == ["S*"]
    with pytest.raises(FileNotFoundError, match="holds no finished concept, only checkpoints 5; pick one with --step"):
        vico.load_concept(model, tmp_path / "stopped")
    ti = make_vico(model, visual_condition=False)
    with pytest.raises(ValueError, match="trained without the visual condition"):
        vico.save_official(ti, tmp_path / "ti", 1, model.tokenizer.token_id("*"))
    seen = []
    images = vico.generate(model, u, ["a photo of S* on the grass"], [torch.rand(3, 40, 24) * 2 - 1], steps=2, guidance_scale=3.0,
                           sampler="dpmpp_2m", generator=torch.Generator().manual_seed(0), on_step=lambda i, m: seen.append((i, dict(m))), progress=False)
    assert images.shape == (1, 3, 32, 32) and [i for i, _ in seen] == [0, 1] and all(m.keys() == set(v.layers) for _, m in seen)


# ---- the command line and bad input


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import weights_convert as wc

    torch.manual_seed(0)
    m = sdm.StableDiffusion(sdm.TINY)
    folder = tmp_path_factory.mktemp("tiny")
    wc.write_parts(folder, sdm.TINY, {p: getattr(m, p).state_dict() for p in ("unet", "vae", "text_encoder")})
    return folder


def test_command_line_train_and_sample_with_masks_and_bad_input(model_dir, tmp_path, monkeypatch):
    import weights_convert
    read, load_vae = [], weights_convert.load_vae  # --vae must reach the model of train and of sample
    monkeypatch.setattr(weights_convert, "load_vae", lambda path, like: read.append(str(path)) or load_vae(path, like))
    imgs = write_images(tmp_path / "imgs", 2)
    Image.new("L", (40, 30), 128).save(imgs / "gray.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 100)).save(imgs / "rgba.png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(imgs / "deep.png")
    (imgs / "notes.txt").write_text("not an image")
    base = ["--pretrained-model", str(model_dir), "--images", str(imgs), "--output-dir", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match="skipping 'notes.txt'"):
        vico.main(["train", *base, "--vae", str(model_dir), "--init-word", "dog", "--max-train-steps", "2", "--checkpointing-steps", "1",
                   "--validation-prompt", "a S*", "--validation-steps", "2", "--num-validation-images", "1"])
    run = tmp_path / "run"
    for f in ("vico.safetensors", "learned_embeds.safetensors", "a1111/Sstar.safetensors", "checkpoint-1/vico.safetensors",
              "checkpoint-2/training_state.safetensors", "validation/step-000002.png", "log.jsonl", "args.json"):
        assert (run / f).exists(), f
    out = tmp_path / "samples"
    sample = ["sample", "--pretrained-model", str(model_dir), "--concept", str(run), "--output-dir", str(out), "--steps", "2"]
    vico.main([*sample, "--reference", str(imgs / "0.png"), str(imgs / "gray.png"), "--prompt", "a photo of S* on the beach",
               "--save-masks", "--sampler", "euler", "--batch-size", "2", "--vae", str(model_dir)])
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_00.png", "0000_01.png"] and read == [str(model_dir)] * 2
    assert len(list((out / "masks").glob("step*_output_blocks.*.png"))) == 2 * 2  # steps x layers
    assert Image.open(out / "masks" / "step001_output_blocks.3.1.png").size == (256, 128)  # two references side by side
    exp = ["export", "--pretrained-model", str(model_dir)]
    vico.main([*exp, "--concept", str(run), "--format", "official", "--output-dir", str(tmp_path / "official")])
    # named by the run's last global step, as the official ModelCheckpoint names them (400 steps -> 399), in the log
    # folder's checkpoints/ where vico_txt2img.py --ft_path looks
    assert sorted(p.name for p in (tmp_path / "official" / "checkpoints").iterdir()) == ["cross_attention-1.pt", "embeddings_gs-1.pt"]
    # --step reads a checkpoint (it named the files, and the final weights went out as that step's)
    vico.main([*exp, "--concept", str(run), "--step", "1", "--format", "official", "--output-dir", str(tmp_path / "official1")])
    blocks, rows, step = vico.load_official(tmp_path / "official1")
    first = vico.load_concept(sdm.load_model(str(model_dir)), run, step="1")
    assert step == 0 and torch.equal(rows["*"], first.embeddings) and not torch.equal(rows["*"], vico.load_official(tmp_path / "official")[1]["*"])
    vico.main([*exp, "--concept", str(tmp_path / "official"), "--format", "vico", "--output-dir", str(tmp_path / "back")])
    with safe_open(str(run / "vico.safetensors"), "pt") as a, safe_open(str(tmp_path / "back" / "vico.safetensors"), "pt") as b:
        assert a.keys() == b.keys() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert json.loads(a.metadata()["init_words"]) == ["dog"] and a.metadata()["method"] == "vico"
        assert b.metadata()["step"] == a.metadata()["step"] == "2"  # -1 back to step 2: a round trip keeps the number
    errors = {
        "empty folder": (["train", *base[:2], "--images", str(tmp_path), "--init-word", "dog", "--output-dir", str(tmp_path / "x")], "no readable images"),
        "init word": (["train", *base, "--init-word", "qwertyuiopasdf", "--overwrite"], "not one"),
        "no S*": ([*sample, "--reference", str(imgs / "0.png"), "--prompt", "a photo of a dog", "--overwrite"], "has no concept token"),
        "missing reference": ([*sample, "--reference", str(tmp_path / "nope.png"), "--prompt", "a S*", "--overwrite"], "nope.png' does not exist"),
        "no reference": ([*sample, "--prompt", "a S*", "--overwrite"], "give at least one reference"),
        "reference not an image": ([*sample, "--reference", str(imgs / "notes.txt"), "--prompt", "a S*", "--overwrite"],
                                   "reference image '.*notes.txt' is not a readable image"),
        "unknown reference token": ([*sample, "--reference", str(imgs / "0.png"), "--reference-tokens", "X*", "--prompt", "a S*",
                                     "--overwrite"], r"unknown reference token 'X\*'; this concept's tokens are: S\*\.$"),
        "no concept": ([*sample[:-4], "--concept", str(imgs), "--prompt", "a S*", "--overwrite"], "holds no ViCo concept"),
        "size": ([*sample, "--reference", str(imgs / "0.png"), "--prompt", "a S*", "--height", "33", "--overwrite"],
                 "height and width must be multiples of"),
        "resolution": (["train", *base, "--init-word", "dog", "--resolution", "33", "--overwrite"], "--resolution must be a multiple of"),
    }
    for what, (argv, msg) in errors.items():
        with pytest.raises(SystemExit, match=msg), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vico.main(argv)


def test_bad_concept_files_get_one_sentence(model, tmp_path):
    """A truncated or foreign file is a ValueError naming it, not a SafetensorError/UnpicklingError/KeyError traceback."""
    from safetensors.torch import save_file

    v = make_vico(model)
    ours = tmp_path / "ours"
    vico.save_concept(v, ours, {})
    good = (ours / "vico.safetensors").read_bytes()
    (ours / "vico.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="vico.safetensors' is not a readable ViCo concept"):
        vico.load_concept(model, ours)
    save_file({k: t.contiguous() for k, t in vico.official_state_dict(v).items()}, str(ours / "vico.safetensors"))  # no header
    with pytest.raises(ValueError, match="not a readable ViCo concept"):
        vico.load_concept(model, ours)
    release = tmp_path / "release"
    release.mkdir()
    torch.save(vico.official_state_dict(v), release / "cross_attention-399.pt")
    (release / "embeddings_gs-399.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not readable official ViCo files"):
        vico.load_concept(model, release)
    torch.save({"string_to_token": {"*": torch.tensor(265)}}, release / "embeddings_gs-399.pt")  # no string_to_param
    with pytest.raises(ValueError, match="not readable official ViCo files"):
        vico.load_concept(model, release)
    torch.save({"string_to_param": {"*": torch.zeros(2, 64)}}, release / "embeddings_gs-399.pt")  # two vectors per token
    with pytest.raises(ValueError, match="2 token vectors for its 1 placeholder"):
        vico.load_concept(model, release)


@pytest.mark.filterwarnings("ignore:prompt is")  # the long template
def test_bad_templates_and_repeated_placeholders_are_refused_before_the_output_folder_is_made(model, tmp_path):
    images = write_images(tmp_path / "imgs", 1)
    for t in ("a {} and {}", "a photo of {name}", "a {} {", "a {.x}", "a photo"):  # str.format would fail at step 1
        with pytest.raises(ValueError, match="caption template .* needs one '{}'"):
            run_train(model, tmp_path / "run", 1, images=images, templates=["a {}", t])
        assert not (tmp_path / "run").exists(), t
    with pytest.raises(ValueError, match=r"the placeholders \['A\*', 'A\*'\] repeat"):
        vico.train(vico.ViCoArgs(images=[str(images)] * 2, init_word=["dog"] * 2, placeholder=["A*", "A*"],
                                 output_dir=str(tmp_path / "run")), model)
    assert not (tmp_path / "run").exists()
    long = "a photo of " + "very " * 80 + "{}"  # cut at 77 tokens before the placeholder
    for ph, t, said in (("", "a {}", "is empty"), ("zq9 ", "a photo of {}", "'zq9 ' is not one token of the caption 'a photo of zq9 '"),
                        ("S*", long, "'S\\*' is not one token of the caption 'a photo of very")):
        with pytest.raises(ValueError, match=said):  # the token would be read at column 0 (BOS) and never train
            run_train(model, tmp_path / "run", 1, images=images, placeholder=[ph], templates=[t])
        assert not (tmp_path / "run").exists(), ph
    assert run_train(model, tmp_path / "run", 1, images=images, templates=["a {{literal}} {}"]).layers
    # a validation prompt whose S* is past its 75 tokens failed at the first validation, with the run's folder written
    with pytest.raises(ValueError, match="validation prompt has no concept token"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tokenizer's warning about the cut
        vico.train(vico.ViCoArgs(images=[str(images)], init_word=["dog"], validation_prompt="a " * 80 + "S*",
                                 output_dir=str(tmp_path / "val")), model)
    assert not (tmp_path / "val").exists()


def test_command_line_refusals_leave_no_output_folder(model, model_dir, tmp_path, capsys):
    vico.save_concept(make_vico(model), tmp_path / "one", {})
    vico.save_concept(make_vico(model, ("S1*", "S2*")), tmp_path / "two", {})
    ref = write_images(tmp_path / "imgs", 1) / "0.png"
    sample = ["sample", "--pretrained-model", str(model_dir), "--concept", str(tmp_path / "one"), "--reference", str(ref), "--steps", "1"]
    export = ["export", "--pretrained-model", str(model_dir), "--format", "official"]
    cases = {
        "no S*": ([*sample, "--prompt", "a photo of a dog"], "has no concept token"),
        "sampler": ([*sample, "--prompt", "a S*", "--sampler", "plms"], "invalid choice: 'plms'"),  # at parse time
        "step": ([*export, "--concept", str(tmp_path / "one"), "--step", "last"], "--step must be a checkpoint number"),
        "two placeholders": ([*export, "--concept", str(tmp_path / "two")], "holds one placeholder"),
        "non-finite loss": (["train", "--pretrained-model", str(model_dir), "--images", str(ref.parent), "--init-word", "dog",
                             "--reg-weight", "inf", "--max-train-steps", "1"], "the loss became inf at step 0"),
    }
    for i, (what, (argv, msg)) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        with pytest.raises(SystemExit) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vico.main([*argv, "--output-dir", str(out)])
        assert msg in f"{e.value} {capsys.readouterr().err}", what
        assert not out.exists() or what == "non-finite loss", what  # training keeps its args.json and log (DESIGN)


def test_export_overwrite_removes_an_earlier_official_export_and_refuses_files_it_did_not_write(model, model_dir, tmp_path):
    late, early = make_vico(model), make_vico(model)
    with torch.no_grad():
        early.embeddings.add_(1.0)
    vico.save_concept(late, tmp_path / "late", {"step": 6})
    vico.save_concept(early, tmp_path / "early", {"step": 3})
    out, ck = tmp_path / "out", tmp_path / "out" / "checkpoints"
    export = ["export", "--pretrained-model", str(model_dir), "--output-dir", str(out)]
    vico.main([*export, "--concept", str(tmp_path / "late"), "--format", "official"])
    (ck / "last.ckpt").write_bytes(b"a user's file")
    vico.main([*export, "--concept", str(tmp_path / "early"), "--format", "official", "--overwrite"])
    # step 5 would have been the highest, so sample --concept read the later concept; now only step 2 is there
    assert sorted(p.name for p in ck.iterdir()) == ["cross_attention-2.pt", "embeddings_gs-2.pt", "last.ckpt"]
    assert torch.equal(vico.load_concept(sdm.load_model(str(model_dir)), out).embeddings, early.embeddings)
    # official files no export of ours wrote (a training log's, unmarked): refused before anything is written
    blocks, emb = vico.load_official(out)[:2]
    torch.save(blocks, ck / "cross_attention-9.pt")
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": emb}, ck / "embeddings_gs-9.pt")
    with pytest.raises(SystemExit) as e:
        vico.main([*export, "--concept", str(tmp_path / "late"), "--format", "official", "--overwrite"])
    assert "holds checkpoints/cross_attention-9.pt, checkpoints/embeddings_gs-9.pt, which no earlier official export" in str(e.value)
    assert sorted(p.name for p in ck.iterdir()) == ["cross_attention-2.pt", "cross_attention-9.pt", "embeddings_gs-2.pt",
                                                  "embeddings_gs-9.pt", "last.ckpt"]
    # --format vico over it: our official files go (the official scripts would still read them), the others stay
    vico.main([*export, "--concept", str(tmp_path / "late"), "--format", "vico", "--overwrite"])
    assert sorted(p.name for p in ck.iterdir()) == ["cross_attention-9.pt", "embeddings_gs-9.pt", "last.ckpt"]
    # a vico.safetensors there is read before official files: an official export over it is refused
    with pytest.raises(SystemExit, match="vico.safetensors, which no earlier official export wrote"):
        vico.main([*export, "--concept", str(tmp_path / "late"), "--format", "official", "--overwrite"])
    # in place (its own folder): the concept it reads is not stale, and what it was read from stays
    vico.main([*export, "--concept", str(tmp_path / "late"), "--format", "official", "--output-dir", str(tmp_path / "late"),
               "--overwrite"])
    vico.main([*export, "--concept", str(tmp_path / "late"), "--format", "vico", "--output-dir", str(tmp_path / "late"),
               "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "late" / "checkpoints").iterdir()) == ["cross_attention-5.pt", "embeddings_gs-5.pt"]


def test_two_concepts_share_the_blocks_and_sample_together(model, tmp_path, monkeypatch, hf_tokenizer_dir):
    a, b = write_images(tmp_path / "a", 2), write_images(tmp_path / "b", 1, size=24)
    args = vico.ViCoArgs(images=[str(a), str(b)], init_word=["dog", "cat"], output_dir=str(tmp_path / "run"), max_train_steps=2,
                         validation_prompt="S1* next to S2*", validation_steps=2, num_validation_images=1)
    seen, generate = [], vico.generate
    def spy(*a, **kw):  # validation: each concept token in the prompt gets its own concept's first image as reference
        seen.append(inspect.signature(generate).bind(*a, **kw).arguments)
        return generate(*a, **kw)
    monkeypatch.setattr(vico, "generate", spy)
    v = vico.train(args, model)
    assert v.placeholders == ["S1*", "S2*"] and v.embeddings.shape == (2, 64)
    assert (tmp_path / "run" / "validation" / "step-000002.png").exists() and len(seen) == 1
    refs = [sdm.image_to_tensor(sdm.load_image_folder(d)[0][1], 32) for d in (a, b)]
    assert seen[0]["ref_tokens"] == ["S1*", "S2*"] and all(torch.equal(x, y) for x, y in zip(seen[0]["references"], refs, strict=True))
    monkeypatch.undo()
    # diffusers reads one token per file: each concept its own file, both loaded in one call
    from conftest import hf_text_model, hf_tokenizer
    from diffusers.loaders import TextualInversionLoaderMixin

    files = [tmp_path / "run" / f"{n}.learned_embeds.safetensors" for n in ("S1star", "S2star")]
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()

    class Pipe(TextualInversionLoaderMixin):
        hf_device_map, components = None, {}

    pipe = Pipe()
    pipe.tokenizer, pipe.text_encoder = hf_tokenizer(hf_tokenizer_dir), hf_text_model(width=64)
    pipe.load_textual_inversion([str(f) for f in files])
    ids = pipe.tokenizer.convert_tokens_to_ids(["S1*", "S2*"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), v.embeddings.detach())
    refs = [torch.rand(3, 32, 32) * 2 - 1, torch.rand(3, 32, 32) * 2 - 1]
    with pytest.raises(ValueError, match="several concept tokens"):
        vico.generate(model, v, ["S1* next to S2*"], refs, steps=1, progress=False)
    masks = []
    vico.generate(model, v, ["S1* next to S2*"], refs, ["S1*", "S2*"], steps=1, on_step=lambda i, m: masks.append(m), progress=False)
    assert masks[0].keys() == set(v.layers) and all(m.shape[0] == 2 * 2 for m in masks[0].values())  # 2 refs x (uncond, cond)


def test_references_for_a_textual_inversion_concept_are_named_unused(model_dir, tmp_path):
    imgs = write_images(tmp_path / "imgs", 1)
    run = tmp_path / "ti"
    vico.main(["train", "--pretrained-model", str(model_dir), "--images", str(imgs), "--init-word", "dog",
               "--output-dir", str(run), "--max-train-steps", "1", "--no-visual-condition"])
    with pytest.warns(UserWarning, match="references? images are not used"):
        vico.main(["sample", "--pretrained-model", str(model_dir), "--concept", str(run), "--reference", str(imgs / "0.png"),
                   "--prompt", "a photo of S*", "--steps", "1", "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "0000_00.png").exists()
    with pytest.warns(UserWarning, match="it has no object masks; --save-masks writes none"):  # it wrote none, silently
        vico.main(["sample", "--pretrained-model", str(model_dir), "--concept", str(run), "--save-masks",
                   "--prompt", "a photo of S*", "--steps", "1", "--output-dir", str(tmp_path / "out2")])
    assert (tmp_path / "out2" / "0000_00.png").exists() and not (tmp_path / "out2" / "masks").exists()


def test_the_concepts_in_a_prompt_are_found_by_token_not_by_substring(model):
    """'S*' is a substring of 'XS*': a prompt with XS* alone has one concept token, so one reference needs no --reference-tokens."""
    v = make_vico(model, ("S*", "XS*"))
    seen = []
    vico.generate(model, v, ["a XS* on the grass"], torch.rand(1, 3, 32, 32) * 2 - 1, steps=1, progress=False,
                  on_step=lambda i, m: seen.append(m))
    assert seen and all(m.shape[0] == 2 for m in seen[0].values())  # 1 reference x (uncond, cond)


def test_toy_masks_scores_each_layer_against_the_rendered_object(model_dir, tmp_path):
    import toy_world as tw

    run = tmp_path / "runs" / "vico" / "candy_star"
    m = sdm.load_model(str(model_dir))
    run_train(m, run, 1, images=write_images(tmp_path / "imgs"), pretrained_model=str(model_dir))
    vico.toy_masks(["--out", str(tmp_path), "--pretrained-model", str(model_dir), "--concepts", "candy_star", "--timesteps", "500"])
    rows = [json.loads(line) for line in (tmp_path / "mask_quality.jsonl").read_text().splitlines()]
    layers = vico.image_layers(m.unet)
    assert len(rows) == 5 * len(layers) * 3 and {r["column"] for r in rows} == {"S*", "init word", "<|endoftext|>"}
    assert all(0 <= r["iou"] <= 1 and 0 <= r["recall"] <= 1 and 0 < r["kept"] <= 1 for r in rows)
    # every layer's side divides 64: the pooled object share is the rendered label map's, per reference
    for i, (scene, image) in enumerate(tw.concept_references(tw.find_concept("candy_star"))):
        share = float((tw.render(scene, image.shape[0])[1] == 1).mean())
        assert {round(r["object"], 6) for r in rows if r["ref"] == i} == {round(share, 6)}
    with pytest.raises(FileNotFoundError, match="toy-benchmark"):
        vico.toy_masks(["--out", str(tmp_path), "--pretrained-model", str(model_dir), "--concepts", "polka_heart"])


def test_toy_benchmark_runs_of_other_methods_into_one_out_keep_each_others_rows(model_dir, tmp_path):
    """The README's second toy-benchmark (--methods vico vico-nomask into the first run's --out) rewrote the manifest
    with its own rows only, so `toy_world.py eval` lost textual inversion's; a rerun of the same method replaces its rows."""
    run = ["--out", str(tmp_path), "--pretrained-model", str(model_dir), "--concepts", "candy_star", "--steps", "1",
           "--per-prompt", "1", "--sample-steps", "1"]
    rows = lambda: [json.loads(line) for line in (tmp_path / "images" / "manifest.jsonl").read_text().splitlines()]
    vico.toy_benchmark([*run, "--methods", "ti"])
    n = len(rows())
    vico.toy_benchmark([*run, "--methods", "vico", "ti"])
    assert n > 0 and len(rows()) == 2 * n and {r["method"] for r in rows()} == {"ti", "vico"}
    vico.toy_benchmark([*run, "--methods", "vico-nomask"])
    assert len(rows()) == 3 * n and len({r["file"] for r in rows()}) == 3 * n
    assert all((tmp_path / "images" / r["file"]).is_file() for r in rows())


def test_the_reference_rows_stop_after_the_last_image_layer_exactly(model, monkeypatch):
    """card 15: what follows the last image layer (here `out`: the tiny UNet's last image layer is in its last
    output block; SD1.5's is output_blocks.11 and `out`) runs on the noisy rows only, and eps and the
    regulariser are what the whole batch gives; gradient checkpointing still trains S*."""
    v = make_vico(model)
    x, r, ctx, cols, eot = inputs(model, v)
    rows = []
    hook = model.unet.out.register_forward_hook(lambda m, a, o: rows.append(len(o)))
    try:
        two_refs = torch.stack([r, torch.randn_like(r)]), torch.stack([cols, cols])
        with v.install(model.unet):
            fast, reg = v.denoise(model.unet, x, T, ctx, *two_refs, eot)
        monkeypatch.setattr(vico.ViCo, "_drop_reference_rows", lambda self, block, args: None)  # the whole batch
        with v.install(model.unet):
            full, reg_full = v.denoise(model.unet, x, T, ctx, *two_refs, eot)
    finally:
        hook.remove()
    assert rows == [len(x), 3 * len(x)]  # the early stop, then the whole doubled batch
    assert_close(fast, full, rtol=1e-6, atol=1e-6, what="eps")
    assert torch.equal(reg, reg_full)  # its own assert: assert_close returns None, so an `and` after it never runs
    monkeypatch.undo()
    model.unet.gradient_checkpointing = True
    try:
        with v.install(model.unet), torch.enable_grad():
            v.embeddings.requires_grad_(True)
            out, reg = v.denoise(model.unet, x, T, ctx, r[None], cols[None], eot)
            (out.square().mean() + reg).backward()
        assert out.shape == x.shape and v.embeddings.grad.abs().sum() > 0
    finally:
        model.unet.gradient_checkpointing = False
        v.embeddings.grad = None


def test_a_reference_keeps_its_aspect_at_another_output_shape():
    """z_r takes z_t's size; a 2:1 reference for a square image is centre-cropped, not squashed."""
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, 8:24] = 255  # a white square in the middle of a black band
    t = vico.fit_reference(Image.fromarray(wide), 16, 16)
    assert t.shape == (3, 16, 16) and (t > 0.9).all()  # only the square: squashed, half of it would be black
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert torch.equal(vico.fit_reference(square, 8, 8), sdm.image_to_tensor(square, 8))  # as before for square ones
    c = vico.cover(sdm.image_to_tensor(Image.fromarray(wide)), 16, 16)  # generate()'s tensors from Python: the same rule
    assert c.shape == (3, 16, 16) and (c > 0.9).all()
    tall = vico.cover(torch.rand(3, 40, 24) * 2 - 1, 32, 32)
    assert tall.shape == (3, 32, 32) and tall.abs().max() <= 1


def test_variant_reaches_the_model_loader_in_train_and_export(model, tmp_path, monkeypatch):
    """An SD 2.x single file does not say whether it predicts v or eps, and the loader's refusal says to pass the
    variant: train and export take --variant as sample does (train refused the flag)."""
    seen = []
    monkeypatch.setattr(sdm, "load_model", lambda path="", *a, variant="", **kw: seen.append(a[3] if len(a) > 3 else variant) or model)
    base = ["--pretrained-model", "v2-1_768-ema-pruned.safetensors", "--variant", "sd21"]
    vico.main(["train", *base, "--images", str(write_images(tmp_path / "imgs", 1)), "--init-word", "dog", "--max-train-steps", "1",
               "--output-dir", str(tmp_path / "run")])
    vico.main(["export", *base, "--concept", str(tmp_path / "run"), "--format", "vico", "--output-dir", str(tmp_path / "out")])
    assert seen == ["sd21", "sd21"]


def test_export_to_official_names_a_mask_mode_the_official_code_does_not_use(model, model_dir, tmp_path):
    vico.save_concept(make_vico(model, mask_mode="none"), tmp_path / "nomask", {"step": 400})
    with pytest.warns(UserWarning, match="trained with --mask-mode none; the official code samples it with its own mask"):
        vico.main(["export", "--pretrained-model", str(model_dir), "--concept", str(tmp_path / "nomask"), "--format", "official",
                   "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "checkpoints" / "cross_attention-399.pt").exists()


def test_clip_skip_reaches_the_model_in_train_and_sample_and_is_recorded(model_dir, tmp_path, monkeypatch):
    seen, load = [], sdm.load_model  # --clip-skip was parsed and stored for resume, but never given to the model
    monkeypatch.setattr(sdm, "load_model", lambda *a, **kw: seen.append(m := load(*a, **kw)) or m)
    run, imgs = tmp_path / "run", write_images(tmp_path / "imgs", 1)
    vico.main(["train", "--pretrained-model", str(model_dir), "--images", str(imgs), "--init-word", "dog", "--output-dir", str(run),
               "--max-train-steps", "1", "--clip-skip", "2"])
    with safe_open(str(run / "vico.safetensors"), "pt") as f:
        assert f.metadata()["clip_skip"] == "2"
    sample = ["sample", "--pretrained-model", str(model_dir), "--concept", str(run), "--reference", str(imgs / "0.png"),
              "--prompt", "a S*", "--steps", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training's layer: no warning
        vico.main([*sample, "--clip-skip", "2", "--output-dir", str(tmp_path / "a")])
    with pytest.warns(UserWarning, match="trained with --clip-skip 2; sampling with --clip-skip 1"):
        vico.main([*sample, "--output-dir", str(tmp_path / "b")])
    assert [m.text_encoder.skip for m in seen] == [2, 2, 1]


def test_a_placeholder_typed_another_way_is_named_in_the_refusal(model):
    v = vico.ViCo(model.unet, ["S*"], vico.add_placeholders(model, ["S*"]), torch.zeros(1, model.cfg.text.width), False)
    for prompt, hint in (("a photo of s*", r"\('S\*' is matched as typed"), ("a photo of S *", r"\('S\*' is matched as typed"),
                         ("a photo of *", r"the official code's '\*' is called S\* here"), ("a photo of a dog", r"\(S\*\); e\.g\."),
                         ("a " * 80 + "S*", r"\('S\*' is past the 75 tokens")):
        with pytest.raises(ValueError, match=hint), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tokenizer's own warning about the cut
            vico.generate(model, v, prompt, steps=1, progress=False)


def test_train_overwrite_removes_the_earlier_runs_concept_files(model, tmp_path):
    """A two-concept run over a one-concept one left the old S*'s learned_embeds.safetensors and a1111/Sstar beside its
    own. As in every method, the earlier run's final files stay until the new run replaces them (a new run that stops
    early leaves them whole), and then the ones it did not rewrite go; the user's files stay."""
    images, run = write_images(tmp_path / "imgs", 2), tmp_path / "run"
    run_train(model, run, 1, images=images)
    (run / "notes.txt").write_text("the user's")
    before = {p: p.read_bytes() for p in [run / "vico.safetensors", run / "learned_embeds.safetensors", run / "a1111" / "Sstar.safetensors"]}
    with pytest.raises(FloatingPointError):  # the new run stops at its first step
        run_train(model, run, 1, images=images, reg_weight=float("inf"), overwrite=True)
    assert {p: p.read_bytes() for p in before} == before and (run / "notes.txt").exists()
    vico.train(vico.ViCoArgs(images=[str(images)] * 2, init_word=["dog"] * 2, output_dir=str(run), max_train_steps=1,
                             checkpointing_steps=1, overwrite=True), model)
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["S1star.learned_embeds.safetensors",
                                                                 "S2star.learned_embeds.safetensors", "vico.safetensors"]
    assert sorted(p.name for p in (run / "a1111").iterdir()) == ["S1star.safetensors", "S2star.safetensors"]


def test_export_overwrite_replaces_an_earlier_vico_export_whole(model, model_dir, tmp_path):
    """--format vico over a one-concept export kept that concept's learned_embeds.safetensors and a1111/Sstar beside
    the two new tokens' files; the user's own files stay."""
    vico.save_concept(make_vico(model), tmp_path / "one", {})
    vico.save_concept(make_vico(model, ("S1*", "S2*")), tmp_path / "two", {})
    out = tmp_path / "out"
    export = ["export", "--pretrained-model", str(model_dir), "--format", "vico", "--output-dir", str(out)]
    vico.main([*export, "--concept", str(tmp_path / "one")])
    (out / "a1111" / "mine.pt").write_bytes(b"a user's file")
    vico.main([*export, "--concept", str(tmp_path / "two"), "--overwrite"])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["S1star.learned_embeds.safetensors",
                                                                 "S2star.learned_embeds.safetensors", "vico.safetensors"]
    assert sorted(p.name for p in (out / "a1111").iterdir()) == ["S1star.safetensors", "S2star.safetensors", "mine.pt"]


def test_sample_names_a_missing_concept_flag_a_missing_concept_and_a_reference_folder(model_dir, tmp_path):
    """No --concept read as '.' ("'.' holds no ViCo concept"), a missing folder as one holding nothing, and a folder
    given as --reference as a file that does not exist."""
    refs = write_images(tmp_path / "imgs", 2)
    sample = ["sample", "--pretrained-model", str(model_dir), "--prompt", "a S*", "--output-dir", str(tmp_path / "out")]
    cases = {"no --concept": ([*sample, "--reference", str(refs / "0.png")], r"give the trained concept with --concept DIR"),
             "missing": ([*sample, "--concept", str(tmp_path / "nope"), "--reference", str(refs / "0.png")],
                         r"--concept '.*nope' does not exist"),
             "folder": ([*sample, "--concept", str(tmp_path), "--reference", str(refs)],
                        r"reference image '.*imgs' is a folder; give its image files \(--reference .*0.png .*1.png\)")}
    vico.save_concept(make_vico(sdm.load_model(str(model_dir))), tmp_path / "c", {})
    cases["a file"] = ([*sample, "--concept", str(tmp_path / "c" / "vico.safetensors"), "--reference", str(refs / "0.png")],
                       f"--concept takes the concept's folder, not a file: --concept {tmp_path / 'c'}$")
    for what, (argv, msg) in cases.items():
        with pytest.raises(SystemExit, match=msg):
            vico.main(argv)
    with pytest.raises(SystemExit, match=r"--concept '.*nope' does not exist"):
        vico.main(["export", "--concept", str(tmp_path / "nope"), "--format", "vico", "--output-dir", str(tmp_path / "e")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "e").exists()


def test_an_init_word_of_several_tokens_is_refused_with_advice_that_fits_it(model, tmp_path):
    """The tokenizer's advice, "or add it as a new token", does not fit an init word: a new token has no pretrained
    embedding for S* to start from."""
    images = write_images(tmp_path / "imgs", 1)
    for word, said in (("teddy bear", r"--init-word 'teddy bear' is 2 CLIP tokens, not one; .*one of its words \('teddy' or 'bear'\)"),
                       ("qwertyuiopasdf", r"--init-word 'qwertyuiopasdf' is \d+ CLIP tokens, not one; .*single-token word such as 'dog'\.$"),
                       ("", r"--init-word '' is 0 CLIP tokens")):
        with pytest.raises(ValueError, match=said) as e:
            vico.train(vico.ViCoArgs(images=[str(images)], init_word=[word], output_dir=str(tmp_path / "run")), model)
        assert "new token" not in str(e.value) and not (tmp_path / "run").exists()


def test_export_takes_the_diffusers_and_a1111_format_names(model, model_dir, tmp_path, capsys):
    """`--format diffusers` (as dci_ico's export names it) or `a1111` was an argparse refusal; both name the token
    files of the vico set, which is written whole, and the command says which file is which."""
    v = make_vico(model)
    vico.save_concept(v, tmp_path / "c", {})
    for fmt in ("diffusers", "a1111"):
        out = tmp_path / fmt
        vico.main(["export", "--pretrained-model", str(model_dir), "--concept", str(tmp_path / "c"), "--format", fmt,
                   "--output-dir", str(out)])
        assert torch.equal(sdm.load_embeddings(out / "learned_embeds.safetensors")["S*"], v.embeddings.detach())
        assert torch.equal(sdm.load_embeddings(out / "a1111" / "Sstar.safetensors")["emb_params"], v.embeddings.detach())
        said = capsys.readouterr().out
        assert f"diffusers (pipe.load_textual_inversion): {out / 'learned_embeds.safetensors'}" in said
        assert f"A1111 (its embeddings folder): {out / 'a1111' / 'Sstar.safetensors'}" in said


def test_another_methods_run_is_named_as_such_in_sample_and_resume(model, tmp_path):
    """A DCO run's folder as --concept was "holds no ViCo concept", and as a --resume latest folder "trained with other
    settings (--learning-rate ...)": both now say it is another method's."""
    run = tmp_path / "dco"
    (run / "checkpoint-2").mkdir(parents=True)
    sdm.save_safetensors({"w": torch.zeros(1)}, run / "pytorch_lora_weights.safetensors", {"method": "dco"})
    sdm.save_safetensors({"param.lora": torch.zeros(1)}, run / "checkpoint-2" / "training_state.safetensors",
                         {"step": json.dumps(2), "args": json.dumps({"learning_rate": 5e-5})})
    with pytest.raises(FileNotFoundError, match="holds another method's output \\(its files say method dco\\)"):
        vico.load_concept(model, run)
    with pytest.raises(ValueError, match="checkpoint-2' is not a ViCo checkpoint"):
        run_train(model, run, 4, images=write_images(tmp_path / "imgs", 1), resume="latest")
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoint-2", "pytorch_lora_weights.safetensors", "training_state.safetensors"]
