"""DCO (dco.py): the card's Sec. 9 identities, LoRA census at full size, files other tools read, bad input."""

import json
import warnings
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dco
import sd_model as sdm
import weights_convert as wc
from conftest import TINY_XL, assert_close, diffusers_unet

LN2 = 0.6931471805599453


def tiny(cfg=sdm.TINY, seed=0):
    torch.manual_seed(seed)
    return sdm.StableDiffusion(cfg).eval().requires_grad_(False)


def randomize_lora(lora, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * scale)
    return lora


def unet_pair(kind="sd1"):
    """A tiny diffusers UNet and ours with the same weights."""
    ref = diffusers_unet(kind)
    cfg = wc.diffusers_unet_config(ref.config)
    ours = sdm.UNetModel(cfg).eval().requires_grad_(False)
    ours.load_state_dict(wc.diffusers_unet_to_ldm(ref.state_dict(), cfg), strict=True)
    return ref, ours


def randomize_peft_b(model, scale=0.2):
    """peft initialises B = 0; random B makes every adapter layer (and its alpha) count."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def inputs(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.image_size // model.vae.downsample_factor
    return torch.randn(b, 4, s, s, generator=g), torch.tensor([10, 700][:b]), model.encode_prompt(["a red star", "a dog"][:b])


# ---- LoRA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, layers, per_rank", [("sd15", 128, 199_296), ("sdxl", 560, 1_451_520)])
def test_lora_census_and_names_on_the_full_configs(name, layers, per_rank):
    """card Sec. 3/7/9: 128 (SD1.5) / 560 (SDXL) wrapped Linears, rank x 199,296 / 1,451,520 parameters;
    every exported name is a module of diffusers' full-size UNet, and kohya's names map to them through
    diffusers' own converters (SDXL: kohya's sgm names)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers
    from test_convert import SD15_UNET, SDXL_UNET

    with torch.device("meta"):
        unet = sdm.UNetModel(sdm.PRESETS[name].unet)
        ref = UNet2DConditionModel(**(SD15_UNET if name == "sd15" else SDXL_UNET))
    for rank in (1, 4):
        lora = dco.LoRA.create(unet, rank)
        assert len(lora.layers) == layers and sum(p.numel() for p in lora.parameters()) == rank * per_rank
    theirs = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    dnames = dco.diffusers_names(unet)
    assert set(dnames.values()) == theirs and len(theirs) == layers
    kohya = {dco.kohya_name(unet, p, dnames) + ".lora_down.weight": p for p in dnames}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict.fromkeys(kohya, 0), ref.config)
    back = {_convert_unet_lora_key(k).replace(".processor", "").replace("_lora.down.weight", "").replace("to_out", "to_out.0") for k in mapped}
    assert back == theirs
    assert next(iter(kohya)).startswith("lora_unet_input_blocks_" if name == "sdxl" else "lora_unet_down_blocks_")


def test_lora_hooks_zero_init_scale_enable_and_restore():
    model = tiny()
    unet = model.unet
    x, t, c = inputs(model)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = unet(x, t, c.context)
    lora = dco.LoRA.create(unet, rank=4, generator=torch.Generator().manual_seed(0))
    a = next(iter(lora.layers.values()))
    assert a.down.std().item() == pytest.approx(1 / 4, rel=0.1) and not a.up.any()  # gaussian A, std 1/r; B = 0
    with dco.install(unet, lora):
        assert torch.equal(unet(x, t, c.context), base)  # delta-W = 0 exactly at init
        randomize_lora(lora)
        on = unet(x, t, c.context)
        assert not torch.allclose(on, base)
        with dco.disabled(lora):
            assert torch.equal(unet(x, t, c.context), base)
        assert lora.enabled
        lora.scale = 0.0
        assert torch.equal(unet(x, t, c.context), base)
        lora.scale = 0.5
        half = unet(x, t, c.context)
    assert torch.equal(unet(x, t, c.context), base)  # hooks removed on exit
    assert all(not m._forward_hooks for m in unet.modules())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # unet.state_dict() == checkpoint
    # the hooks compute W x + s (alpha/r) B A x: compare with the weights merged into a copy
    merged = tiny()
    with torch.no_grad():
        for path, dw in lora.delta_weights().items():
            merged.unet.get_submodule(path).weight += dw
    assert_close(half, merged.unet(x, t, c.context), what="hooked LoRA vs merged weights")


def test_lora_with_gradient_checkpointing_and_a_half_precision_unet():
    """The hooks are stateless, so checkpointing's second forward gives the same gradients; fp32 LoRA
    weights run on a bf16 UNet without autocast (sampling with --precision bf16)."""
    model = tiny()
    x, t, c = inputs(model)
    lora = randomize_lora(dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0)))
    grads = []
    with dco.install(model.unet, lora):
        for ckpt in (False, True):
            model.unet.gradient_checkpointing = ckpt
            lora.zero_grad()
            model.unet(x, t, c.context).square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
        assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
        model.unet.gradient_checkpointing = False
        want = model.unet(x, t, c.context)
        model.unet.to(torch.bfloat16)
        with torch.no_grad():
            got = model.unet(x.bfloat16(), t, c.context.bfloat16())
    assert got.dtype == torch.bfloat16 and next(lora.parameters()).dtype == torch.float32
    assert_close(got, want, rtol=0.05, what="bf16 UNet + fp32 LoRA")


def test_several_adapters_and_merge_algebra():
    """card Sec. 9.8: adapters [subject, style] at [1, 1] give W0 + dW_s + dW_t, scale 0 gives W0; merge
    "sum" is that sum exactly; "ties_svd" follows TIES on a hand-made example."""
    model = tiny()
    unet = model.unet
    x, t, c = inputs(model)
    subj = randomize_lora(dco.LoRA.create(unet, 2, name="subject", generator=torch.Generator().manual_seed(1)), 2)
    style = randomize_lora(dco.LoRA.create(unet, 4, alpha=2, name="style", generator=torch.Generator().manual_seed(2)), 3)
    path = "input_blocks.1.1.transformer_blocks.0.attn2.to_v"
    lin = unet.get_submodule(path)
    h = torch.randn(3, lin.in_features)
    with dco.install(unet, subj, style):
        both = unet(x, t, c.context)
        assert_close(lin(h), h @ (lin.weight + subj.delta_weights()[path] + style.delta_weights()[path]).T, what="W0 + dWs + dWt")
        subj.scale = style.scale = 0.0
        assert torch.equal(lin(h), F.linear(h, lin.weight))
        subj.scale = style.scale = 1.0
    merged = dco.merge([subj, style], [1.0, 1.0])
    assert next(iter(merged.layers.values())).rank == 6
    with dco.install(unet, merged):
        assert_close(unet(x, t, c.context), both, what="sum merge")
    # TIES on one 2x2 layer: trim to density 0.5, elect the sign of the sum, mean of the agreeing entries
    d1, d2 = torch.tensor([[3.0, -1.0], [0.5, 2.0]]), torch.tensor([[-1.0, -4.0], [0.1, 1.5]])
    ab = lambda d: dco.LoRA.from_tensors({"l": (torch.eye(d.shape[1]), d, float(d.shape[1]))})
    m = dco.merge([ab(d1), ab(d2)], [1.0, 1.0], "ties_svd", density=0.5, rank=2)
    # trimmed: d1 -> [[3, 0], [0, 2]], d2 -> [[0, -4], [0, 1.5]]; elected signs: +, -, + (sum 0.6), +;
    # disjoint means: 3, -4, 0 (no delta kept there), (2 + 1.5) / 2
    assert_close(m.delta_weights()["l"], torch.tensor([[3.0, -4.0], [0.0, 1.75]]), what="ties_svd")
    # ties in magnitude: the trim keeps exactly density x n entries (a >= threshold test kept all 16)
    m = dco.merge([ab(torch.ones(4, 4)), ab(torch.ones(4, 4))], [1.0, 1.0], "ties_svd", density=0.25, rank=4)
    assert (m.delta_weights()["l"].abs() > 1e-5).sum() == 4


# ---- the DCO loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, ti", [(sdm.TINY, False), (sdm.TINY, True), (TINY_XL, True)])
def test_loss_is_ln2_at_init(cfg, ti):
    """card Sec. 9.1: B = 0 and the same conditioning in both passes give eps_theta == eps_ref bit for bit.
    With a token initialised from a one-token class word this holds on SD1, and on SDXL too because our
    CLIP pools at <|endoftext|> (the official argmax-pooling quirk of card 6.2 would break it)."""
    model = tiny(cfg)
    lora = dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0))
    prompts, bases = ["a <dog> sitting on a ledge"], ["a dog sitting on a ledge"]
    tokens = dco.LearnedTokens.from_initializers(model, ["<dog>"], ["dog"]) if ti else None
    cond = model.encode_prompt(prompts if ti else bases, extra=tokens.extra if ti else (None, None))
    ref = model.encode_prompt(bases)
    assert torch.equal(cond.context, ref.context) and (cond.y is None or torch.equal(cond.y, ref.y))
    z0 = torch.randn(1, 4, 16, 16)
    with dco.install(model.unet, lora):
        loss, logs = dco.dco_step(model, lora, z0, cond, ref, torch.Generator().manual_seed(0))
    assert logs["l_theta"] == logs["l_ref"] and loss.item() == pytest.approx(LN2, abs=1e-7)


def test_the_official_sdxl_pooling_quirk_is_real_and_not_ours():
    """card 6.2, checked: transformers pools at argmax(ids) when a config has the legacy eos_token_id = 2,
    which with <dog> = 49408 is the new token's position; with the corrected id it is <|endoftext|>,
    where our CLIP pools (so test_loss_is_ln2_at_init holds on SDXL)."""
    from conftest import hf_text_model

    hf = hf_text_model(projection=32)
    hf.resize_token_embeddings(49409)
    tok = sdm.CLIPTokenizer()
    tok.add_tokens(["<dog>"])
    ids = tok(["a <dog> on a ledge"])
    where = {name: (ids[0] == i).int().argmax().item() for name, i in (("dog", 49408), ("eos", 49407))}
    for eos_id, pos in ((2, where["dog"]), (49407, where["eos"])):
        hf.text_model.eos_token_id = eos_id
        with torch.no_grad():
            out = hf(ids)
            assert torch.equal(out.text_embeds[0], hf.text_projection(out.last_hidden_state[0, pos]))


def test_gradient_is_beta_sigmoid_times_the_mse_gradient():
    """card Sec. 2.4 / 9.2: dL/dl_theta = beta sigmoid(beta Delta): 500 at Delta = 0, 6.693 at -0.005,
    993.3 at +0.005 (beta = 1000), and at init the LoRA gradient is (beta/2) x DreamBooth's."""
    target, l_ref = torch.zeros(1, 4, 2, 2), 0.1
    for delta, want in ((0.0, 500.0), (-0.005, 6.693), (0.005, 993.3)):
        eps_theta = torch.full((1, 4, 2, 2), math.sqrt(l_ref + delta), dtype=torch.float64, requires_grad=True)
        loss, _ = dco.dco_loss(eps_theta, torch.full((1, 4, 2, 2), math.sqrt(l_ref), dtype=torch.float64), target, 1000.0)
        loss.backward()
        mse_grad = 2 * eps_theta.detach() / eps_theta.numel()
        assert (eps_theta.grad / mse_grad).flatten()[0].item() == pytest.approx(want, rel=1e-3)
    model = tiny()
    z0, cond = torch.randn(1, 4, 16, 16), model.encode_prompt(["a star"])
    grads = []
    for beta in (1000.0, 0.0):
        lora = dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0))
        with dco.install(model.unet, lora):
            dco.dco_step(model, lora, z0, cond, cond, torch.Generator().manual_seed(3), beta)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
    assert grads[1].abs().max() > 0
    assert_close(grads[0], 500 * grads[1], rtol=1e-5, what="DCO grad at init vs 500 x MSE grad")


def test_reference_pass_shares_noise_has_no_grad_and_lora_is_back_on():
    """card Sec. 9.4/9.5: the same z_t and t reach both passes; the reference runs without grad and with
    the LoRA off; afterwards the LoRA is on again with scale alpha/r = 1."""
    model = tiny()
    lora = randomize_lora(dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0)))
    calls = []
    model.unet.register_forward_pre_hook(lambda m, args: calls.append((args[0], args[1], torch.is_grad_enabled(), lora.enabled)))
    out = []
    model.unet.register_forward_hook(lambda m, args, o: out.append(o))
    cond, ref = model.encode_prompt(["a <x> star"]), model.encode_prompt(["a star"])
    with dco.install(model.unet, lora):
        loss, _ = dco.dco_step(model, lora, torch.randn(1, 4, 16, 16), cond, ref, torch.Generator().manual_seed(0))
        (x1, t1, grad1, on1), (x2, t2, grad2, on2) = calls
        assert x1 is x2 and t1 is t2
        assert (grad1, on1, grad2, on2) == (True, True, False, False)
        assert out[0].requires_grad and not out[1].requires_grad
        assert lora.enabled and all(layer.alpha / layer.rank == 1 for layer in lora.layers.values())
        with torch.no_grad():  # "on again" as computation: the next call is the fine-tuned model's, not the base's
            again = model.unet(x1, t1, cond.context)
            with dco.disabled(lora):
                base = model.unet(x1, t1, cond.context)
    assert torch.equal(again, out[0].detach()) and (again - base).abs().max() > 1e-3
    loss.backward()  # gradients reach the LoRA only through the fine-tuned pass
    assert all(p.grad is not None for p in lora.parameters())


def test_beta_zero_is_dreambooth_and_snr_weighting():
    """beta <= 0 is the plain MSE (one UNet call); Min-SNR gives min(SNR, gamma)/SNR per sample."""
    model = tiny()
    lora = randomize_lora(dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0)))
    z0, cond = torch.randn(2, 4, 16, 16), model.encode_prompt(["a star", "a dog"])
    n = []
    model.unet.register_forward_pre_hook(lambda m, a: n.append(1))
    with dco.install(model.unet, lora):
        loss, _ = dco.dco_step(model, lora, z0, cond, None, torch.Generator().manual_seed(5), beta=0.0)
        g = torch.Generator().manual_seed(5)
        noise, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (2,), generator=g)
        want = F.mse_loss(model.unet(model.schedule.q_sample(z0, t, noise), t, cond.context), noise)
    assert len(n) == 2 and loss.item() == pytest.approx(want.item(), rel=1e-6)
    a = model.schedule.alphas_cumprod[torch.tensor([0, 999])].float()
    snr = a / (1 - a)
    w = dco.min_snr_weight(model.schedule, torch.tensor([0, 999]), 5.0)
    assert_close(w, torch.stack([5 / snr[0], torch.tensor(1.0)]), what="min-SNR weights")  # gamma caps t=0 only


def test_overfitting_one_sample_drives_the_loss_below_ln2():
    """card Sec. 9.3: on one fixed (z0, eps, t), l_theta drops below l_ref and L below ln 2."""
    model = tiny()
    lora = dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(lora.parameters(), lr=3e-3)
    z0, cond = torch.randn(1, 4, 16, 16), model.encode_prompt(["a star"])
    with dco.install(model.unet, lora):
        for _ in range(8):
            loss, logs = dco.dco_step(model, lora, z0, cond, cond, torch.Generator().manual_seed(1), beta=1000.0)
            opt.zero_grad(), loss.backward(), opt.step()
    assert logs["l_theta"] < logs["l_ref"] and loss.item() < 0.1


# ---- training end to end: learned tokens in bf16, resume, files --------------------------------------


def write_model(folder, cfg=sdm.TINY):
    model = tiny(cfg)
    parts = {p: getattr(model, p).state_dict() for p in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(model, p) is not None}
    wc.write_parts(folder, cfg, parts)
    return folder


def write_images(folder, n=3, size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return [f"{i:02d}.png" for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dco")
    names = write_images(root / "images")
    captions = {"full_ti": {"images": names, "prompts": [f"a <dog> on a ledge, photo {i}" for i in range(3)],
                            "base_prompts": [f"a dog on a ledge, photo {i}" for i in range(3)],
                            "inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"]},
                "dreambooth": {"images": names, "prompts": ["a photo of a dog"] * 3}}
    (root / "config.json").write_text(json.dumps(captions))
    return root, write_model(root / "sd1"), write_model(root / "sdxl", TINY_XL)


def train_args(root, model, out, **kw):
    return dco.DCOArgs(**{**dict(pretrained_model=str(model), images=str(root / "images"), captions=str(root / "config.json"),
                                 config_name="full_ti", output_dir=str(out), rank=4, max_train_steps=4, checkpointing_steps=2,
                                 text_encoder_lr=1e-2), **kw})


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_tokens_really_train_in_bf16_keep_their_norm_and_the_table(setup, tmp_path, which, monkeypatch):
    """card 6.1 / 9.6: under bf16 autocast with half-precision frozen weights the new rows move, keep the
    initializer's norm, every pretrained row stays bit-identical; SDXL writes clip_l and clip_g."""
    root, sd1, sdxl = setup
    model_dir = sd1 if which == "sd1" else sdxl
    loaded, real_load = [], sdm.load_model

    def keep(*a, **kw):  # the model training really uses, and its tables as loaded
        m = real_load(*a, **kw)
        encs = [e for e in (m.text_encoder, m.text_encoder_2) if e is not None]
        loaded.append((encs, [e.token_embedding.weight.detach().clone() for e in encs]))
        return m

    monkeypatch.setattr(sdm, "load_model", keep)
    dco.train(train_args(root, model_dir, tmp_path / "run", mixed_precision="bf16", resolution=32))
    (encs, before), = loaded
    assert all(torch.equal(e.token_embedding.weight, b) for e, b in zip(encs, before))  # after 4 steps: untouched
    model = sdm.StableDiffusion.from_pretrained(model_dir)
    emb = sdm.load_embeddings(tmp_path / "run" / "learned_embeds.safetensors")
    encoders = [model.text_encoder] + ([model.text_encoder_2] if which == "sdxl" else [])
    rows = [emb["clip_l"], emb["clip_g"]] if which == "sdxl" else [emb["<dog>"]]
    dog = sdm.CLIPTokenizer().token_id("dog")
    for row, enc in zip(rows, encoders):
        init = enc.token_embedding.weight[dog].bfloat16().float()  # the row as training loaded it (bf16)
        assert (row[0] - init).abs().max() > 1e-3, "the learned row did not move"
        assert row[0].norm().item() == pytest.approx(init.norm().item(), rel=1e-6)
    # the frozen tables: training never touches them (fp32 rows outside the table, by construction)
    trained = dco.LearnedTokens.load(tmp_path / "run" / "learned_embeds.safetensors", model)
    ids = model.tokenize(["a <dog> and a dog"])
    for i, enc in enumerate(encoders):
        e = enc.embed(ids, trained.extra[i])
        assert torch.equal(e[0, 5], enc.token_embedding.weight[dog]) and torch.equal(e[0, 2], trained.extra[i][0].to(e.dtype))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(LN2, abs=2e-3)  # bf16: equal inputs to both passes, ~ln 2


def test_images_are_drawn_once_per_epoch_in_a_fresh_order():
    """card Sec. 3: DataLoader(shuffle=True) over the N images, one epoch = N samples; batches run across the
    epoch's end, and a restored (order, pos) continues the same stream."""
    g, order = torch.Generator().manual_seed(0), dco.EpochOrder(5)
    drawn = sum((order.draw(2, g) for _ in range(10)), [])
    epochs = [drawn[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and len({tuple(e) for e in epochs}) > 1
    g, order = torch.Generator().manual_seed(0), dco.EpochOrder(5)
    head = sum((order.draw(2, g) for _ in range(3)), [])
    saved, g_state = {k: v.clone() for k, v in order.state().items()}, g.get_state()
    again = dco.EpochOrder(5)
    for k, v in again.state().items():
        v.copy_(saved[k])
    g2 = torch.Generator()
    g2.set_state(g_state)
    assert head + sum((again.draw(2, g2) for _ in range(7)), []) == drawn

def test_resume_equals_an_uninterrupted_run(setup, tmp_path):
    root, sd1, _ = setup
    dco.train(train_args(root, sd1, tmp_path / "a"))
    dco.train(train_args(root, sd1, tmp_path / "b", max_train_steps=2))  # stops at checkpoint-2 ...
    dco.train(train_args(root, sd1, tmp_path / "b", resume="latest"))  # ... and goes on to 4
    for f in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        a, b = (load_file(str(tmp_path / d / f)) for d in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert (tmp_path / "b" / "checkpoint-4" / "lora_kohya.safetensors").exists()
    for folder, step in (("b/checkpoint-2", 2), ("b", 4)):  # the step each file was written at, in both formats
        for f, key in (("pytorch_lora_weights.safetensors", "step"), ("lora_kohya.safetensors", "ss_steps")):
            assert safe_open(str(tmp_path / folder / f), "pt").metadata()[key] == str(step)


def test_resume_refuses_a_checkpoint_without_this_image_order(setup, tmp_path):
    """A checkpoint from before the per-epoch image order has no data.order (it was a KeyError deep in
    load_checkpoint), and one of another image folder an order of another length (a size mismatch): each is one
    sentence before the model loads, and the run folder stays as it was."""
    from safetensors.torch import save_file

    root, sd1, _ = setup
    out = tmp_path / "b"
    dco.train(train_args(root, sd1, out, max_train_steps=2))
    state = out / "checkpoint-2" / "training_state.safetensors"
    full, meta, log = load_file(str(state)), safe_open(str(state), "pt").metadata(), (out / "log.jsonl").read_text()
    save_file({k: v for k, v in full.items() if not k.startswith("param.data.")}, str(state), meta)
    with pytest.raises(ValueError, match="has no image order"):
        dco.train(train_args(root, sd1, out, resume="latest"))
    save_file(full, str(state), meta)
    names = write_images(tmp_path / "four", n=4)
    (tmp_path / "four.json").write_text(json.dumps({"images": names, "prompts": ["a photo of a dog"] * 4}))
    with pytest.raises(SystemExit, match="error: checkpoint .* was trained on 3 images and this run has 4"):
        dco.main(["train", "--pretrained-model", str(sd1), "--images", str(tmp_path / "four"), "--captions", str(tmp_path / "four.json"),
                  "--output-dir", str(out), "--rank", "4", "--max-train-steps", "4", "--resume", "latest"])
    assert (out / "log.jsonl").read_text() == log and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_cached_latents_train_as_encoding_every_step(setup, tmp_path, monkeypatch):
    """The cache is exact: the same draws from the same posterior, so --no-cache-latents gives the same LoRA."""
    root, sd1, _ = setup
    names = write_images(tmp_path / "square", n=10, size=(32, 32))  # already at the resolution: the cached path
    (tmp_path / "captions.json").write_text(json.dumps({"dreambooth": {"images": names, "prompts": ["a photo of a dog"] * 10}}))
    kw = dict(images=str(tmp_path / "square"), resolution=32, captions=str(tmp_path / "captions.json"), config_name="dreambooth")
    calls, encode = [], sdm.AutoencoderKL.encode
    monkeypatch.setattr(sdm.AutoencoderKL, "encode", lambda self, x, chunk=0: calls.append((len(x), chunk)) or encode(self, x, chunk))
    dco.train(train_args(root, sd1, tmp_path / "cached", **kw))
    assert calls == [(10, 8)]  # the ten images, once, 8 a pass (the peak of a large folder stays small)
    calls.clear()
    dco.train(train_args(root, sd1, tmp_path / "encoded", cache_latents=False, **kw))
    assert calls == [(1, 0)] * 4  # each step's batch of 1
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("cached", "encoded"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k or "up" in k)


def test_cached_text_embeddings_train_as_encoding_every_step(setup, tmp_path, monkeypatch):
    """Frozen prompts (no learned tokens) are encoded once per distinct prompt; --no-cache-text-embeddings encodes
    every step's batch, as the diffusers script without --pre_compute_text_embeddings, to the same LoRA."""
    root, sd1, _ = setup
    kw = dict(captions="", config_name="", instance_prompt="a photo of a dog", resolution=32)
    calls, encode = [], sdm.StableDiffusion.encode_prompt
    monkeypatch.setattr(sdm.StableDiffusion, "encode_prompt", lambda self, p, *r, **k: calls.append(len(p)) or encode(self, p, *r, **k))
    dco.train(train_args(root, sd1, tmp_path / "cached", **kw))
    n_cached = len(calls)
    calls.clear()
    dco.train(train_args(root, sd1, tmp_path / "encoded", cache_text_embeddings=False, **kw))
    assert len(calls) - n_cached == 4 - 1  # one encode per step instead of one for the only prompt
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("cached", "encoded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- files: round trips and what diffusers reads -----------------------------------------------------


@pytest.mark.parametrize("cfg", [sdm.TINY, TINY_XL])
def test_lora_files_round_trip_in_both_conventions(tmp_path, cfg):
    model = tiny(cfg)
    x, t, c = inputs(model)
    lora = randomize_lora(dco.LoRA.create(model.unet, 4, alpha=2.0, generator=torch.Generator().manual_seed(0)))
    lora.scale = 0.7  # the user scale is baked into B on export
    with dco.install(model.unet, lora):
        want = model.unet(x, t, c.context, c.y)
    for fmt in ("peft", "kohya"):
        dco.save_lora(tmp_path / f"{fmt}.safetensors", model.unet, [lora], fmt)
        back = dco.load_lora(tmp_path / f"{fmt}.safetensors", model.unet)
        assert back.layers.keys() == lora.layers.keys() and all(layer.alpha == 2.0 for layer in back.layers.values())
        with dco.install(model.unet, back):
            assert_close(model.unet(x, t, c.context, c.y), want, what=f"{fmt} round trip")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_exported_loras_load_into_a_diffusers_unet_with_the_same_function(tmp_path, kind):
    """Both files through diffusers' own readers (lora_state_dict, its kohya/sgm converters,
    convert_unet_state_dict_to_peft), applied to the diffusers UNet our tiny UNet came from."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    ref, ours = unet_pair(kind)
    lora = randomize_lora(dco.LoRA.create(ours, 4, alpha=8.0, generator=torch.Generator().manual_seed(0)), scale=0.2)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, ref.config.cross_attention_dim), torch.tensor([10, 873])
    kw, y = {}, None
    if kind == "sdxl":
        pooled, ids = torch.randn(2, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        y = torch.cat([pooled, sdm.timestep_embedding(ids.flatten(), 8).reshape(2, -1)], dim=1)
    with dco.install(ours, lora), torch.no_grad():
        want = ours(x, t, ctx, y)
    for fmt in ("peft", "kohya"):
        path = tmp_path / f"{fmt}.safetensors"
        dco.save_lora(path, ours, [lora], fmt)
        sd, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), unet_config=ref.config, return_lora_metadata=True)
        sd = convert_unet_state_dict_to_peft({k.removeprefix("unet.").replace(".processor", ""): v for k, v in sd.items()})
        # one alpha for all layers, read as diffusers' get_peft_kwargs does (kohya: .alpha keys; peft: metadata)
        alpha = {*alphas.values()} if alphas else {meta["unet.lora_alpha"]}
        assert len(alpha) == 1
        merged = diffusers_unet(kind)
        with torch.no_grad():
            for k, A in sd.items():
                if k.endswith("lora_A.weight"):
                    mod = k.removesuffix(".lora_A.weight")
                    merged.get_submodule(mod).weight += next(iter(alpha)) / A.shape[0] * sd[mod + ".lora_B.weight"] @ A
            got = merged(x, t, ctx, **kw).sample
        assert len(sd) == 2 * len(lora.layers)
        assert_close(got, want, rtol=1e-4, what=f"diffusers UNet + our {fmt} LoRA")


# ---- sampling ------------------------------------------------------------------------------------------


def test_consistency_guidance_algebra_and_unet_calls():
    """card Sec. 9.7: the three limits, and 3 UNet evaluations a step in 2 calls."""
    u, c, f = torch.randn(3, 4, 2, 2).unbind(0)
    g = dco.consistency_guidance
    assert_close(g(u, c, f, 7.5, 0.0), u + 7.5 * (c - u), what="w_cons = 0: pretrained CFG on c_base")
    assert_close(g(u, c, f, 5.0, 5.0), u + 5.0 * (f - u), what="w_cons = w_text: CFG with the fine-tuned cond")
    assert_close(g(u, c, f, 7.5, 1.0), f + 6.5 * (c - u), what="w_cons = 1")
    assert_close(g(u, c, c, 7.5, 3.0), u + 7.5 * (c - u), what="f == c: pretrained CFG")
    model = tiny(TINY_XL)
    lora = dco.LoRA.create(model.unet, 4, generator=torch.Generator().manual_seed(0))  # B = 0
    batches = []
    model.unet.register_forward_pre_hook(lambda m, a: batches.append(len(a[0])))
    latents = torch.randn(2, 4, 16, 16)
    with dco.install(model.unet, lora):
        x = dco.sample(model, [lora], ["a star on the grass"] * 2, w_cons=3.0, steps=3, latents=latents, progress=False)
    assert batches == [4, 2] * 3
    want = model.sample(["a star on the grass"] * 2, steps=3, latents=latents, progress=False)
    assert_close(x, want, rtol=1e-4, what="zero LoRA, c == c_base: pretrained CFG")


def test_commands_train_sample_merge_on_a_tiny_model(setup, tmp_path, capsys, monkeypatch):
    import weights_convert
    read, load_vae = [], weights_convert.load_vae  # --vae must reach the model of train and of sample
    monkeypatch.setattr(weights_convert, "load_vae", lambda path, like: read.append(str(path)) or load_vae(path, like))
    root, sd1, _ = setup
    dco.main(["train", "--pretrained-model", str(sd1), "--images", str(root / "images"), "--captions", str(root / "config.json"),
              "--config-name", "dreambooth", "--output-dir", str(tmp_path / "style"), "--rank", "2", "--dco-beta", "0",
              "--max-train-steps", "2", "--validation-prompt", "a photo of a dog", "--validation-steps", "2", "--num-validation-images", "1"])
    assert (tmp_path / "style" / "validation" / "step-000002.png").exists()
    dco.main(["train", "--pretrained-model", str(sd1), "--images", str(root / "images"), "--captions", str(root / "config.json"),
              "--config-name", "full_ti", "--output-dir", str(tmp_path / "subj"), "--rank", "4", "--max-train-steps", "2",
              "--vae", str(sd1)])
    dco.main(["merge", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "subj"), str(tmp_path / "style" / "lora_kohya.safetensors"),
              "--weights", "1", "0.5", "--output", str(tmp_path / "merged.safetensors")])
    assert "learned tokens ['<dog>'] in merged.learned_embeds.safetensors" in capsys.readouterr().out
    merged_tokens = dco.read_embeddings(tmp_path / "merged.learned_embeds.safetensors")
    subj_tokens = dco.read_embeddings(tmp_path / "subj" / "learned_embeds.safetensors")
    assert merged_tokens[0] == subj_tokens[0] == ["<dog>"] and torch.equal(merged_tokens[1][0], subj_tokens[1][0])
    assert dco.load_lora(tmp_path / "merged.safetensors", tiny().unet).tokens == ["<dog>"]
    for guidance, emb in (("consistency", ["--embeddings", str(tmp_path / "subj" / "learned_embeds.safetensors")]), ("cfg", [])):
        dco.main(["sample", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "merged.safetensors"), *emb,
                  "--prompt", "a <dog> in the snow", "--guidance", guidance,  # without --embeddings: the merged file's own
                  "--w-text", "5", "--w-cons", "2", "--steps", "2", "--output-dir", str(tmp_path / guidance), "--vae", str(sd1)])
        assert (tmp_path / guidance / "0000_00.png").exists()
    assert read == [str(sd1)] * 3
    assert "wrote 1 image(s)" in capsys.readouterr().out
    (tmp_path / "alone").mkdir()  # the LoRA file without its learned_embeds: '<dog>' would be read as text
    (tmp_path / "alone" / "l.safetensors").write_bytes((tmp_path / "subj" / "pytorch_lora_weights.safetensors").read_bytes())
    with pytest.raises(SystemExit, match=r"trained with the learned token\(s\) \['<dog>'\], whose embeddings are not loaded"):
        dco.main(["sample", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "alone" / "l.safetensors"),
                  "--prompt", "a <dog> in the snow", "--steps", "1", "--output-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    dco.main(["sample", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "alone" / "l.safetensors"), "--guidance", "cfg",
              "--prompt", "a dog in the snow", "--steps", "1", "--output-dir", str(tmp_path / "plain")])  # no token: fine
    for out, said in ((tmp_path / "merged.safetensors", "exists; pass --overwrite"), (tmp_path, "must be a .safetensors file path")):
        with pytest.raises(SystemExit, match=said):
            dco.main(["merge", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "subj"), str(tmp_path / "subj"),
                      "--output", str(out)])
    with pytest.raises(SystemExit):
        dco.main(["merge", "--lora", "a", "b", "--format", "kohyaa"])
    assert "invalid choice: 'kohyaa'" in capsys.readouterr().err


# ---- bad input -----------------------------------------------------------------------------------------


def test_kohya_caption_files_beside_the_images(tmp_path):
    """kohya's layout: NAME.caption (or --caption-extension .txt) beside each image, first line; an image without one
    takes --instance-prompt (kohya's class tokens) with a warning, or is one sentence; base prompts put each learned
    token's initializer word in its place, as `sample` does."""
    folder = tmp_path / "imgs"
    write_images(folder)
    (folder / "00.txt").write_text("\ufeffa <dog> on a ledge\nan alternative line")
    (folder / "01.txt").write_text("a <dog> in the snow")
    a = lambda **kw: dco.DCOArgs(images=str(folder), **{"inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"], **kw})
    with pytest.raises(ValueError, match=r"no 00.caption beside 00.png; the folder has .txt files: pass --caption-extension .txt"):
        dco.load_data(a())  # kohya's default extension
    with pytest.raises(ValueError, match="1 of the 3 images .* no 02.txt beside 02.png"):
        dco.load_data(a(caption_extension=".txt"))
    with pytest.warns(UserWarning, match="they take --instance-prompt"):
        _, prompts, bases, tokens, _, _ = dco.load_data(a(caption_extension=".txt", instance_prompt="a <dog>"))
    assert prompts == ["a <dog> on a ledge", "a <dog> in the snow", "a <dog>"]
    assert bases == ["a dog on a ledge", "a dog in the snow", "a dog"] and tokens == ["<dog>"]
    with pytest.warns(UserWarning):
        assert dco.load_data(a(caption_extension=".txt", instance_prompt="a <dog>", base_prompt="one dog"))[2][2] == "one dog"
    (folder / "02.txt").write_text("\n")
    with pytest.raises(ValueError, match="'.*02.txt' has no caption on its first line"):
        dco.load_data(a(caption_extension=".txt"))
    (folder / "02.txt").write_text("a <dog> asleep")
    with pytest.raises(ValueError, match="--base-prompt would be ignored"):
        dco.load_data(a(caption_extension=".txt", base_prompt="a dog"))
    with pytest.raises(ValueError, match="--caption-extension would be ignored with --captions"):
        dco.load_data(a(caption_extension=".txt", captions=str(tmp_path / "c.json")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caption files are not reported as unreadable images
        assert dco.load_data(a(caption_extension=".txt"))[1][2] == "a <dog> asleep"
    args = sdm.parse_args(dco.DCOArgs, ["--images", "x", "--caption_extension", ".txt"])  # kohya's spelling works too
    assert args.caption_extension == ".txt"

@pytest.mark.filterwarnings("ignore:.*have no caption file")
def test_kohya_repeat_folders_give_repeats_and_prompts(setup, tmp_path):
    """kohya's DreamBooth layout: --images (or --train_data_dir) holds N_prompt subfolders; each image comes N times an
    epoch, and "prompt" is the caption of those without a caption file (kohya keeps later underscores). Loose images,
    another name, N = 0, --instance-prompt and --captions beside them are one sentence; a resume with other counts too."""
    root, sd1, _ = setup
    data = tmp_path / "train"
    write_images(data / "10_a <sks>", n=2)
    (data / "10_a <sks>" / "00.caption").write_text("a <sks> on a ledge")
    write_images(data / "3_a_<sks>", n=1)
    args = lambda **kw: dco.DCOArgs(images=str(data), **{"inserting_tokens": ["<sks>"], "initializer_tokens": ["dog"], **kw})
    with pytest.warns(UserWarning, match="they take their folder's prompt 'a <sks>'"):  # one of two captioned: kohya warns too
        images, prompts, bases, _, _, repeats = dco.load_data(args())
    assert (len(images), prompts, repeats) == (3, ["a <sks> on a ledge", "a <sks>", "a_<sks>"], [10, 10, 3])
    assert bases == ["a dog on a ledge", "a dog", "a_dog"]
    g, order = torch.Generator().manual_seed(0), dco.EpochOrder(3, repeats)
    for _ in range(2):  # every epoch: each image as often as its folder says, in a fresh order
        assert torch.bincount(torch.tensor(order.draw(23, g))).tolist() == [10, 10, 3]
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        dco.train(dco.DCOArgs(pretrained_model=str(sd1), images=str(data), output_dir=str(out), rank=2, max_train_steps=2,
                              checkpointing_steps=2, inserting_tokens=["<sks>"], initializer_tokens=["dog"]))
    assert load_file(str(out / "checkpoint-2" / "training_state.safetensors"))["param.data.order"].shape == (23,)
    (data / "3_a_<sks>").rename(data / "4_a_<sks>")
    with pytest.raises(ValueError, match="repeated its images other numbers of times an epoch"), pytest.warns(UserWarning):
        dco.train(dco.DCOArgs(pretrained_model=str(sd1), images=str(data), output_dir=str(out), rank=2, max_train_steps=4,
                              resume="latest", inserting_tokens=["<sks>"], initializer_tokens=["dog"]))
    refused = (("00.png", "mixes kohya's N_prompt subfolders with loose images \\('00.png', 1 in all\\)"),
               ("dogs/00.png", "mixes kohya's N_prompt subfolders with 'dogs', whose name is not a repeat count"),
               ("0_dog/00.png", "0_dog' repeats its images 0 times"),
               ("5/00.png", "1 of the 1 images in '.*5' have no caption file .*or name the folder N_prompt"))
    for where, said in refused:
        write_images((data / where).parent, n=1)
        with pytest.raises(ValueError, match=said):
            dco.load_data(args())
        (data / where).unlink()
        if (data / where).parent != data:
            (data / where).parent.rmdir()
    with pytest.raises(ValueError, match="--instance-prompt would be ignored: in kohya's N_prompt subfolders"):
        dco.load_data(args(instance_prompt="a <sks>"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "10_a <sks>/00.png", "prompt": "a <sks>"}))
    with pytest.raises(ValueError, match="holds kohya's N_prompt subfolders, whose repeats and prompts --captions would ignore"):
        dco.load_data(args(captions=str(tmp_path / "c.jsonl")))
    assert sdm.parse_args(dco.DCOArgs, ["--train_data_dir", str(data)]).images == str(data)  # kohya's flag


def test_captions_files_without_base_prompts_make_them_from_the_initializer_words(setup, tmp_path):
    """A JSONL (Hugging Face's metadata.jsonl) or config without base prompts, or with some rows lacking one: each
    missing one is the caption with every learned token replaced by its initializer word, as for caption files and
    as `sample` makes it (it was refused: "learned tokens need a base prompt per image")."""
    root, _, _ = setup
    hf = tmp_path / "metadata.jsonl"
    hf.write_text("\n".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"a <cat> and a <hat> {i}",
                                         **({"base_prompt": "one cat"} if i == 1 else {})}) for i in range(3)))
    a = dco.DCOArgs(images=str(root / "images"), captions=str(hf), inserting_tokens=["<cat>", "<hat>"], initializer_tokens=["cat", "hat"])
    assert dco.load_data(a)[2] == ["a cat and a hat 0", "one cat", "a cat and a hat 2"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"images": ["00.png", "01.png", "02.png"], "prompts": [f"a <dog> {i}" for i in range(3)],
                                  "inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"]}))
    assert dco.load_data(dco.DCOArgs(images=str(root / "images"), captions=str(config)))[2] == ["a dog 0", "a dog 1", "a dog 2"]


def test_several_sd1_tokens_read_back_in_the_order_written_with_their_initializers(tmp_path):
    """safetensors stores keys sorted, so an SD 1.x file {"<zeta>": .., "<alpha>": ..} read back as <alpha>, <zeta>
    while its initializer words stayed in the written order: <alpha>'s base prompt took <zeta>'s word."""
    rows = torch.randn(2, 8)
    dco.write_embeddings(tmp_path / "e.safetensors", ["<zeta>", "<alpha>"], [rows], ["dog", "cat"])
    tokens, got, inits = dco.read_embeddings(tmp_path / "e.safetensors")
    assert (tokens, inits) == (["<zeta>", "<alpha>"], ["dog", "cat"]) and torch.equal(got[0], rows)


def test_merge_renames_a_token_both_inputs_learned(setup, tmp_path, capsys):
    """Two subject LoRAs trained with the same default token ("<sks>") collide in merge: refused in one sentence that
    names --token, nothing written; --token names them apart (one per learned token, in input order, as sample's
    --token), the merged LoRA and its embeddings carry the new names, and sample's base prompt uses their words."""
    root, sd1, _ = setup
    model = sdm.StableDiffusion.from_pretrained(sd1)
    rows = {}
    for name, seed in (("dog", 1), ("cat", 2)):
        lora = randomize_lora(dco.LoRA.create(model.unet, 2, generator=torch.Generator().manual_seed(seed)), seed)
        dco.save_lora(tmp_path / name / "pytorch_lora_weights.safetensors", model.unet, [lora], "peft", {"tokens": ["<sks>"]})
        rows[name] = torch.randn(1, model.text_encoder.cfg.width, generator=torch.Generator().manual_seed(seed))
        dco.write_embeddings(tmp_path / name / "learned_embeds.safetensors", ["<sks>"], [rows[name]], [name])
    merged = tmp_path / "m.safetensors"
    run = lambda *extra: dco.main(["merge", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "dog"), str(tmp_path / "cat"),
                                   "--output", str(merged), *extra])
    with pytest.raises(SystemExit, match=r"'.*dog.learned_embeds.safetensors' and '.*cat.learned_embeds.safetensors' both "
                                         r"learned a token '<sks>', with different embeddings; .*--token <sks> <sks2>"):
        run()
    with pytest.raises(SystemExit, match=r"one name without spaces per learned token of the inputs, in their order \(2: <sks> <sks>\)"):
        run("--token", "<dog>")
    assert not merged.exists() and not (tmp_path / "m.learned_embeds.safetensors").exists()
    run("--token", "<dog>", "<cat>")
    assert "learned tokens ['<dog>', '<cat>']" in capsys.readouterr().out
    tokens, got, inits = dco.read_embeddings(tmp_path / "m.learned_embeds.safetensors")
    assert (tokens, inits) == (["<dog>", "<cat>"], ["dog", "cat"])
    assert torch.equal(got[0][0], rows["dog"][0]) and torch.equal(got[0][1], rows["cat"][0])
    assert dco.load_lora(merged, model.unet).tokens == ["<dog>", "<cat>"]
    assert json.loads(safe_open(str(merged), "pt").metadata()["renamed_from"]) == ["<sks>", "<sks>"]
    ti = dco.LearnedTokens.load(tmp_path / "m.learned_embeds.safetensors", sdm.StableDiffusion.from_pretrained(sd1))
    assert ti.base_prompt("a <dog> and a <cat> on the beach") == "a dog and a cat on the beach"
    dco.main(["sample", "--pretrained-model", str(sd1), "--lora", str(merged), "--prompt", "a <dog> and a <cat>",
              "--steps", "1", "--output-dir", str(tmp_path / "s")])  # the embeddings beside the merged file, by their new names
    assert (tmp_path / "s" / "0000_00.png").exists()
    # an old name in the prompt would be read as text: refused, naming the new names (renamed_from); so is the merged
    # file's name after sample's own --token renames it, and both renames are followed through to the prompt's names
    with pytest.raises(SystemExit, match=r"'<sks>' is a learned token's old name \(merge --token renamed it\).*"
                                         r"write '<dog>' or '<cat>' instead"):
        dco.main(["sample", "--pretrained-model", str(sd1), "--lora", str(merged), "--prompt", "a <sks> on the beach",
                  "--steps", "1", "--output-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    model = sdm.StableDiffusion.from_pretrained(sd1)
    loras = [dco.load_lora(merged, model.unet)]
    ti = dco.LearnedTokens.load(tmp_path / "m.learned_embeds.safetensors", model, ["<rex>", "<tom>"])
    old = dco.old_names(model, loras, tmp_path / "m.learned_embeds.safetensors", ["<rex>", "<tom>"])
    assert old == {"<sks>": (["<rex>", "<tom>"], "merge --token"), "<dog>": (["<rex>"], "--token"), "<cat>": (["<tom>"], "--token")}
    for prompt, said in (("a <sks>", "write '<rex>' or '<tom>' instead"), ("a <dog> and a <tom>", r"'<dog>' .*\(--token renamed it\)")):
        with pytest.raises(ValueError, match=said):
            dco.check_tokens([merged], loras, ti, prompt, old)
    dco.check_tokens([merged], loras, ti, "a <rex> and a <tom> in the snow", old)  # the new names pass
    # a word of the vocabulary cannot be a new token: merge refuses it before any work, as train and sample do
    with pytest.raises(SystemExit, match=r"--token 'cat' is already a token of the vocabulary; choose a new placeholder"):
        run("--token", "<dog>", "cat", "--overwrite")
    assert dco.read_embeddings(tmp_path / "m.learned_embeds.safetensors")[0] == ["<dog>", "<cat>"]  # untouched


def test_learned_tokens_are_found_where_the_tokenizer_reads_them():
    # added tokens match verbatim anywhere, inside words too (zqxfoo is zqx + foo), the longest at the leftmost place
    # (zqx2 is one token, not zqx + 2), case included, after HTML unescaping; the checks must find exactly those
    tok, tokens = sdm.CLIPTokenizer(), ["zqx", "zqx2", "<a>"]
    first = tok.add_tokens(tokens)[0]
    for text in ("a zqxfoo dog", "fooZQX", "a zqx2 and a zqx", "zqx2zqx", "x<a>2", "&lt;a&gt; on sand", "a <A>", "zq x"):
        read = [tokens[i - first] for i in tok.tokenize(text) if i >= first]
        assert dco.learned_in(text, tokens) == list(dict.fromkeys(read)), text
    assert dco.in_words("a zqx2 and a zqxfoo", ["zqx", "zqx2"], ["dog", "cat"]) == "a cat and a dogfoo"  # was "a dog2 ..."
    lora = SimpleNamespace(tokens=["zqx", "zqx2"])
    dco.check_tokens(["l"], [lora], SimpleNamespace(tokens=["zqx2"]), "a zqx2 on the beach")  # zqx is not in zqx2
    with pytest.raises(ValueError, match=r"learned token\(s\) \['zqx'\], whose embeddings are not loaded"):
        dco.check_tokens(["l"], [lora], SimpleNamespace(tokens=["zqx2"]), "a zqxfoo on the beach")  # it is in zqxfoo
    with pytest.raises(ValueError, match="'<a>' is a learned token's old name"):
        dco.check_tokens([], [], None, "x &lt;a&gt; y", {"<a>": (["<b>"], "merge --token")})


def test_bad_input_gets_one_clear_sentence(setup, tmp_path):
    root, sd1, sdxl = setup
    cap = root / "config.json"
    base = dict(images=str(root / "images"), captions=str(cap), config_name="full_ti")
    bad = tmp_path / "bad.json"

    def err(match, **kw):
        with pytest.raises(ValueError, match=match):
            dco.load_data(dco.DCOArgs(**{**base, **kw}))

    lines = [{"file": f"{i:02d}.png", "prompt": f"a <cat> {i}", "base_prompt": f"a cat {i}"} for i in range(3)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    images, prompts, bases, tokens, inits, _ = dco.load_data(dco.DCOArgs(images=str(root / "images"), captions=str(tmp_path / "c.jsonl"),
                                                                       inserting_tokens=["<cat>"], initializer_tokens=["cat"]))
    assert (len(images), prompts[2], bases[2], tokens, inits) == (3, "a <cat> 2", "a cat 2", ["<cat>"], ["cat"])
    hf = tmp_path / "metadata.jsonl"  # Hugging Face imagefolder's captions
    hf.write_text("\n".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"a dog {i}"}) for i in range(3)))
    assert dco.load_data(dco.DCOArgs(images=str(root / "images"), captions=str(hf)))[1] == ["a dog 0", "a dog 1", "a dog 2"]
    hf.write_text("\n".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"a dog {i}", **({"base_prompt": "a dog"} if i else {})})
                             for i in range(3)))  # base prompts on some rows only: unused without learned tokens
    assert dco.load_data(dco.DCOArgs(images=str(root / "images"), captions=str(hf)))[2] == ["a dog 0", "a dog 1", "a dog 2"]
    for content, said in (("{not json", "is not readable as the official config.json"), ("[1, 2]", "not an object of configs"),
                          (json.dumps({"images": ["00.png"], "prompts": [3]}), "prompts must be a list of strings")):
        bad.write_text(content)
        err(said, captions=str(bad))
    err("several configs", config_name="")
    err("--base-prompt would be ignored with --captions", base_prompt="a dog")  # it was, silently
    err("--instance-prompt and --base-prompt would be ignored", instance_prompt="a <dog>", base_prompt="a dog")
    bad.write_text(json.dumps({"images": ["00.png", "01.png"], "prompts": ["a <dog>"]}))
    err("one prompt per image", captions=str(bad))
    bad.write_text(json.dumps({"images": ["00.png", "zz.png"], "prompts": ["a <dog>"] * 2}))
    err("names 'zz.png', which is not in", captions=str(bad))
    bad.write_text(json.dumps({"images": ["00.png"], "prompts": ["a photo"]}))
    err("images with no caption.*01.png, 02.png", captions=str(bad))
    bad.write_text(json.dumps({"images": ["00.png", "01.png", "02.png"], "prompts": ["a <dog>"] * 3, "base_prompts": ["a dog"],
                               "inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"]}))
    err("gives 1 base prompts for 3 prompts; give one per image, or none", captions=str(bad))
    err("contains none of the learned tokens", inserting_tokens=["<cat>"], initializer_tokens=["cat"])
    model = tiny()
    with pytest.raises(ValueError, match="'dog' is already a token"):
        dco.LearnedTokens.from_initializers(model, ["dog"], ["dog"])
    with pytest.raises(ValueError, match="not one"):
        dco.LearnedTokens.from_initializers(tiny(), ["<q>"], ["qzxjvwk"])
    lora_file = tmp_path / "l.safetensors"
    dco.save_lora(lora_file, model.unet, [dco.LoRA.create(model.unet, 2)])
    with pytest.raises(ValueError, match="does not fit this base model"):
        dco.load_lora(lora_file, tiny(TINY_XL).unet)
    from safetensors.torch import load_file, save_file

    wider = {**load_file(str(lora_file)), "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4)}
    save_file(wider, tmp_path / "wider.safetensors")  # kohya-style: more layers than the attention projections
    with pytest.raises(ValueError, match="also adapts layers this loader does not .*proj_in.* to_q, to_k, to_v, to_out.0 only"):
        dco.load_lora(tmp_path / "wider.safetensors", model.unet)  # it said "does not fit this base model"
    with pytest.raises(SystemExit, match="error: LoRA .* does not fit this base model"):
        dco.main(["merge", "--pretrained-model", str(sdxl), "--lora", str(lora_file), str(lora_file), "--output", str(tmp_path / "m.safetensors")])
    with pytest.raises(SystemExit, match="error: embeddings .* do not fit"):
        emb = tmp_path / "e.safetensors"
        dco.LearnedTokens.from_initializers(tiny(), ["<d>"], ["dog"]).save(emb)
        dco.main(["sample", "--pretrained-model", str(sdxl), "--embeddings", str(emb), "--prompt", "a <d>", "--output-dir", str(tmp_path / "s")])
    assert not (tmp_path / "m.safetensors").exists()


def test_an_sdxl_layout_file_with_one_encoder(tmp_path):
    """{"clip_l": rows} alone is a one-encoder file: it loads on SD 1.x and is one sentence on SDXL, which needs
    clip_l and clip_g (it was a KeyError)."""
    from safetensors.torch import save_file

    sd1, sdxl = tiny(), tiny(TINY_XL)
    file = tmp_path / "l.safetensors"
    save_file({"clip_l": torch.randn(1, sd1.text_encoder.cfg.width)}, str(file))
    tokens = dco.LearnedTokens.load(file, sd1)
    assert tokens.tokens == ["<s0>"] and len(tokens.rows) == 1
    with pytest.raises(ValueError, match="do not fit this base model"):
        dco.LearnedTokens.load(file, sdxl)
    save_file({"clip_g": torch.randn(1, sdxl.text_encoder_2.cfg.width)}, str(file))
    with pytest.raises(ValueError, match="do not fit this base model"):
        dco.LearnedTokens.load(file, sdxl)

@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_load_lora_weights_reads_our_files(tmp_path, kind):
    """End to end through peft, when it is installed: diffusers' lora_state_dict + load_lora_into_unet
    (what pipe.load_lora_weights runs) on both files give the diffusers UNet our LoRA'd function."""
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    ref, ours = unet_pair(kind)
    lora = randomize_lora(dco.LoRA.create(ours, 4, alpha=8.0, generator=torch.Generator().manual_seed(0)), scale=0.2)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 7, ref.config.cross_attention_dim), torch.tensor([500])
    kw, y = {}, None
    if kind == "sdxl":
        pooled, ids = torch.randn(1, 32), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        kw, y = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}, torch.cat([pooled, sdm.timestep_embedding(ids.flatten(), 8)[None].flatten(1)], 1)
    with dco.install(ours, lora), torch.no_grad():
        want = ours(x, t, ctx, y)
    for fmt in ("peft", "kohya"):
        dco.save_lora(tmp_path / f"{fmt}.safetensors", ours, [lora], fmt)
        sd, alphas, meta = Mixin.lora_state_dict(str(tmp_path / f"{fmt}.safetensors"), unet_config=ref.config, return_lora_metadata=True)
        unet = diffusers_unet(kind)
        Mixin.load_lora_into_unet(sd, alphas, unet, adapter_name=fmt, metadata=meta)
        with torch.no_grad():
            assert_close(unet(x, t, ctx, **kw).sample, want, rtol=1e-4, what=f"diffusers + peft loading our {fmt} file")


def test_peft_files_keep_per_layer_ranks_and_alphas(tmp_path):
    """peft's config has one r / lora_alpha; an adapter whose layers differ (a sum over different layer sets, a
    file with per-layer alphas) must write rank_pattern / alpha_pattern, or diffusers would build the wrong
    shapes and scales. Both diffusers + peft and our own loader read the file back to the same function."""
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    ref, ours = unet_pair("sd1")
    full = randomize_lora(dco.LoRA.create(ours, 4, alpha=8.0, generator=torch.Generator().manual_seed(0)), scale=0.2)
    g, lin = torch.Generator().manual_seed(2), dco.target_linears(ours)
    some = list(lin)[:5]
    partial = dco.LoRA.from_tensors({p: (torch.randn(2, lin[p].in_features, generator=g), 0.2 * torch.randn(lin[p].out_features, 2, generator=g), 1.0)
                                     for p in some}, name="partial")
    mixed = dco.LoRA.from_tensors({p: (layer.down, layer.up, 8.0 if p in some else 2.0)
                                   for p, layer in zip(full.paths.values(), full.layers.values())}, name="mixed")
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 7, ref.config.cross_attention_dim), torch.tensor([500])
    for name, loras in (("sum", [full, partial]), ("alphas", [mixed])):
        with dco.install(ours, *loras), torch.no_grad():
            want = ours(x, t, ctx)
        file = tmp_path / f"{name}.safetensors"
        dco.save_lora(file, ours, loras, "peft")
        meta = json.loads(safe_open(str(file), "pt").metadata()["lora_adapter_metadata"])
        assert (meta["unet.r"], bool(meta["unet.rank_pattern"]), bool(meta["unet.alpha_pattern"])) == \
            ((4, True, True) if name == "sum" else (4, False, True))
        sd, alphas, dmeta = Mixin.lora_state_dict(str(file), unet_config=ref.config, return_lora_metadata=True)
        unet = diffusers_unet("sd1")
        Mixin.load_lora_into_unet(sd, alphas, unet, adapter_name=name, metadata=dmeta)
        with torch.no_grad():
            assert_close(unet(x, t, ctx).sample, want, rtol=1e-4, what=f"diffusers + peft loading our {name} file")
        with dco.install(ours, dco.load_lora(file, ours)), torch.no_grad():
            assert_close(ours(x, t, ctx), want, rtol=1e-5, what=f"our loader on the {name} file")
        dco.save_lora(file, ours, loras, "kohya")  # kohya's resize_lora: "Dynamic" where the layers differ
        kmeta = safe_open(str(file), "pt").metadata()
        assert (kmeta["ss_network_dim"], kmeta["ss_network_alpha"]) == (("Dynamic", "Dynamic") if name == "sum" else ("4", "Dynamic"))


def test_a_diffusers_save_lora_adapter_file_keeps_its_alphas(tmp_path):
    """diffusers' model-level unet.save_lora_adapter writes peft's config as it is ("lora_alpha", "alpha_pattern"),
    without the "unet." prefix the pipeline's save_lora_weights adds; its alphas must scale our layers too."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    ref, ours = unet_pair("sd1")
    one = next(n for n, _ in ref.named_modules() if n.endswith("attn2.to_k"))
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(dco.TARGETS), alpha_pattern={one: 2}))
    randomize_peft_b(ref)
    ref.save_lora_adapter(str(tmp_path))
    assert "lora_alpha" in json.loads(safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt").metadata()["lora_adapter_metadata"])
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 7, ref.config.cross_attention_dim), torch.tensor([500])
    with torch.no_grad():
        want = ref(x, t, ctx).sample
    with dco.install(ours, dco.load_lora(tmp_path, ours)), torch.no_grad():
        assert_close(ours(x, t, ctx), want, rtol=1e-5, what="our loader on diffusers' save_lora_adapter file")


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_save_pretrained_folder_loads_with_its_config(tmp_path, rslora):
    """peft's own save_pretrained writes adapter_model.safetensors (base_model.model.* keys, no metadata) and its
    LoraConfig as adapter_config.json beside it; lora_alpha, alpha_pattern and use_rslora (alpha/sqrt(r)) live
    only there, so the loader must read them or scale every layer wrongly. DoRA is refused in one sentence."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    ref, ours = unet_pair("sd1")
    one = next(n for n, _ in ref.named_modules() if n.endswith("attn2.to_k"))
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=16, target_modules=list(dco.TARGETS),
                                                alpha_pattern={one: 2}, use_rslora=rslora))
    randomize_peft_b(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 7, ref.config.cross_attention_dim), torch.tensor([500])
    with torch.no_grad():
        want = peft_model(x, t, ctx).sample
    lora = dco.load_lora(tmp_path, ours)
    assert {layer.alpha for layer in lora.layers.values()} == ({32.0, 4.0} if rslora else {16.0, 2.0})
    with dco.install(ours, lora), torch.no_grad():
        assert_close(ours(x, t, ctx), want, rtol=1e-5, what=f"our loader on peft's save_pretrained folder (rslora={rslora})")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA adapter"):
        dco.load_lora(tmp_path, ours)


def test_fp16_skipped_steps_leave_the_schedule_and_the_tokens_still_train(setup, tmp_path):
    """fp16: DCO's gradient (beta/2 = 500x DreamBooth's at init) overflows at GradScaler's first scale, so the
    first steps are skipped while the scale backs off (as in every diffusers fp16 run); a skipped step must not
    advance the LR schedule (PyTorch warns when it does), the log says which steps were skipped, and the
    tokens move on the steps that were taken."""
    root, sd1, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Detected call of lr_scheduler.step() before optimizer.step()"
        dco.train(train_args(root, sd1, tmp_path / "run", mixed_precision="fp16", resolution=32, max_train_steps=6,
                             lr_scheduler="linear", checkpointing_steps=0))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skipped = [r["step_skipped"] for r in log]
    assert any(skipped) and not all(skipped)
    taken = 0
    for r in log:  # linear decay over 6 steps: the LR follows the steps taken, not the steps tried
        taken += not r["step_skipped"]
        assert r["lr"] == pytest.approx(5e-5 * (1 - taken / 6))
    assert all(b["grad_scale"] == a["grad_scale"] / (2 if b["step_skipped"] else 1) for a, b in zip(log, log[1:]))
    emb = sdm.load_embeddings(tmp_path / "run" / "learned_embeds.safetensors")["<dog>"]
    init = sdm.StableDiffusion.from_pretrained(sd1).text_encoder.token_embedding.weight[sdm.CLIPTokenizer().token_id("dog")]
    assert (emb[0] - init.float()).abs().max() > 1e-3


def test_the_loss_is_the_mean_of_per_sample_softplus_with_min_snr_inside():
    """card Sec. 2.3: at batch 2 the loss is mean_b softplus(beta w_b (l_theta,b - l_ref,b)), not one softplus of
    batch means (the official reduction, equal at batch 1); Min-SNR w_b weighs each sample's MSEs inside."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    eps_theta = target + torch.stack([torch.full((4, 4, 4), 0.10), torch.full((4, 4, 4), 0.30)]).double()
    eps_ref = target + torch.stack([torch.full((4, 4, 4), 0.20), torch.full((4, 4, 4), 0.25)]).double()
    beta, w = 50.0, torch.tensor([0.5, 2.0], dtype=torch.float64)
    l_theta, l_ref = torch.tensor([0.01, 0.09]), torch.tensor([0.04, 0.0625])  # per-sample MSEs, by hand
    for weight, ws in ((None, torch.ones(2)), (w, w.float())):
        loss, logs = dco.dco_loss(eps_theta, eps_ref, target, beta, weight)
        want = F.softplus(beta * ws * (l_theta - l_ref)).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        lt = l_theta.clone().requires_grad_(True)  # the logged weight is each sample's d loss / d l_theta (x batch)
        (2 * F.softplus(beta * ws * (lt - l_ref)).mean()).backward()
        assert logs["dco_weight"] == pytest.approx(lt.grad.mean().item(), rel=1e-5)
        one = [dco.dco_loss(eps_theta[i:i + 1], eps_ref[i:i + 1], target[i:i + 1], beta,
                            None if weight is None else weight[i:i + 1])[0] for i in range(2)]
        assert loss.item() == pytest.approx(sum(one).item() / 2, rel=1e-9)  # the mean of the batch-1 losses
    batch_means = F.softplus(beta * (l_theta.mean() - l_ref.mean()))  # the official code's reduction
    assert abs(dco.dco_loss(eps_theta, eps_ref, target, beta)[0].item() - batch_means.item()) > 0.1
    loss0, _ = dco.dco_loss(eps_theta, eps_ref, target, 0.0, w)  # beta 0: Min-SNR-weighted DreamBooth MSE
    assert loss0.item() == pytest.approx((w.float() * l_theta).mean().item(), rel=1e-6)


def test_sample_with_plain_textual_inversion_files_and_foreign_lora_keys(setup, tmp_path):
    """Files other tools wrote: a plain diffusers embedding (no initializer words) needs --base-prompt for
    consistency guidance; a learned token in --base-prompt, the same file twice and a kohya file that also
    trains the text encoder each get one sentence or the right behaviour, never an IndexError."""
    from safetensors.torch import load_file, save_file

    root, sd1, _ = setup
    width = sdm.StableDiffusion.from_pretrained(sd1).text_encoder.cfg.width
    plain = tmp_path / "plain.safetensors"
    save_file({"<q>": torch.randn(1, width, generator=torch.Generator().manual_seed(0))}, str(plain))
    run = lambda *extra, out="s": dco.main(["sample", "--pretrained-model", str(sd1), "--embeddings", str(plain), "--steps", "1",
                                            "--output-dir", str(tmp_path / out), "--overwrite", *extra])
    with pytest.raises(SystemExit, match="do not say which word '<q>' started from"):
        run("--prompt", "a <q> on the snow")
    with pytest.raises(SystemExit, match="the base prompt is for the pretrained model, which has no '<q>'"):
        run("--prompt", "a <q> on the snow", "--base-prompt", "a <q> dog on the snow")
    run("--prompt", "a <q> on the snow", "--base-prompt", "a dog on the snow", out="ok")
    run("--prompt", "a <q> on the snow", "--guidance", "cfg", out="cfg")
    run("--prompt", "a <q> on the snow", "--guidance", "cfg", "--embeddings", str(plain), out="twice")  # once, not an error
    assert all((tmp_path / d / "0000_00.png").exists() for d in ("ok", "cfg", "twice"))
    model = sdm.StableDiffusion.from_pretrained(sd1)
    kohya = tmp_path / "k.safetensors"
    dco.save_lora(kohya, model.unet, [dco.LoRA.create(model.unet, 2)], "kohya")
    sd = load_file(str(kohya))
    save_file({**sd, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, width)}, str(kohya))
    with pytest.raises(ValueError, match="also trains the text encoder"):
        dco.load_lora(kohya, model.unet)


def test_merge_reads_layer_names_off_the_config_not_the_weights(setup, tmp_path, monkeypatch):
    """`merge` builds the UNet on the meta device from a converted or diffusers folder's config: the same
    modules and shapes as the loaded model, no weights read, and the merged file is the one the full model gives."""
    from safetensors.torch import load_file

    root, sd1, _ = setup
    full = sdm.StableDiffusion.from_pretrained(sd1).unet
    skel = dco.unet_skeleton(str(sd1))
    shapes = lambda u: {k: tuple(v.shape) for k, v in u.state_dict().items()}
    assert shapes(skel) == shapes(full) and all(p.is_meta for p in skel.parameters())
    ref = diffusers_unet("sd1")
    ref.save_config(tmp_path / "diffusers" / "unet")
    ours = sdm.UNetModel(wc.diffusers_unet_config(ref.config))
    assert shapes(dco.unet_skeleton(str(tmp_path / "diffusers"))) == shapes(ours)
    a = [tmp_path / f"{n}.safetensors" for n in "ab"]
    for f, seed in zip(a, (1, 2)):
        dco.save_lora(f, full, [randomize_lora(dco.LoRA.create(full, 2, generator=torch.Generator().manual_seed(seed)))])
    monkeypatch.setattr(sdm, "load_model", lambda *x, **k: pytest.fail("merge loaded the weights"))
    dco.main(["merge", "--pretrained-model", str(sd1), "--lora", *map(str, a), "--weights", "1", "0.5",
              "--output", str(tmp_path / "m.safetensors")])
    monkeypatch.undo()
    want = tmp_path / "want.safetensors"
    dco.save_lora(want, full, [dco.merge([dco.load_lora(f, full) for f in a], [1.0, 0.5])])
    got, exp = load_file(str(tmp_path / "m.safetensors")), load_file(str(want))
    assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in got)


# ---- review fixes: each test failed before its fix ---------------------------------------------------


def test_ties_svd_rank_above_the_layer_size_keeps_the_delta_and_bad_knobs_are_refused():
    """A rank-r SVD of an out x in delta has only min(out, in) factors: the merged layer's alpha must be the
    rank it really has (alpha = r with fewer rows scaled the delta by r / min(out, in), e.g. a rank-64 style
    LoRA on the toy model's 32-wide attention). --density outside (0, 1] and a negative --rank are one sentence."""
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    ab = lambda d: dco.LoRA.from_tensors({"l": (torch.eye(d.shape[1]), d, float(d.shape[1]))})  # rank 5 > min(3, 5)
    want = dco.merge([ab(d1), ab(d2)], [1.0, 1.0], "ties_svd", rank=3).delta_weights()["l"]
    for rank in (0, 5, 64):  # 0 = the largest input rank, 5
        assert_close(dco.merge([ab(d1), ab(d2)], [1.0, 1.0], "ties_svd", rank=rank).delta_weights()["l"], want, what=f"rank {rank}")
    for kw, match in ((dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(rank=-1), "rank")):
        with pytest.raises(ValueError, match=match):
            dco.merge([ab(d1), ab(d2)], [1.0, 1.0], "ties_svd", **kw)


def test_sizes_the_unet_cannot_halve_are_one_sentence(setup, tmp_path):
    """The UNet halves the latent len(channel_mult) - 1 times: a size that is not a multiple of
    f x 2^(levels-1) crashed with a RuntimeError (concatenating skips), or, not a multiple of f, silently gave
    a smaller image. sample and train now say so before anything is written."""
    root, sd1, _ = setup
    model = tiny()
    step = model.vae.downsample_factor * 2 ** (len(model.cfg.unet.channel_mult) - 1)
    for size in ((step * 8 + model.vae.downsample_factor,) * 2, (step * 8 + 1, step * 8)):
        with pytest.raises(ValueError, match=f"multiples of {step}"):
            dco.sample(model, [], ["a star"], steps=1, size=size, progress=False)
    with pytest.raises(ValueError, match=f"multiple of {step}"):
        dco.train(train_args(root, sd1, tmp_path / "run", resolution=32 + model.vae.downsample_factor))
    assert not (tmp_path / "run").exists()


def test_a_learned_token_cut_off_by_the_77_token_limit_is_one_sentence(setup, tmp_path):
    """CLIP keeps 75 tokens of a caption: a learned token past them gets no gradient at all (the row
    silently stays its initializer), so training refuses such a caption instead of warning."""
    root, sd1, _ = setup
    long = "a very " * 40
    cap = tmp_path / "long.json"
    cap.write_text(json.dumps({"images": ["00.png", "01.png", "02.png"], "prompts": [f"{long}<dog>", "a <dog>", "a <dog>"],
                               "base_prompts": [f"{long}dog", "a dog", "a dog"],
                               "inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"]}))
    with pytest.raises(ValueError, match="past CLIP's 77-token limit"):
        dco.train(train_args(root, sd1, tmp_path / "run", captions=str(cap), config_name="", resolution=32))
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


def test_a_lora_file_that_is_not_safetensors_is_one_sentence(tmp_path):
    """A .pt/.bin or truncated file given as --lora raised safetensors' SafetensorError with a traceback."""
    bad = tmp_path / "lora.pt"
    bad.write_bytes(b"\x80\x02not a safetensors file" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        dco.load_lora(bad, tiny().unet)
    with pytest.raises(SystemExit, match="error: .*not a readable safetensors"):
        dco.main(["merge", "--lora", str(bad), str(bad), "--output", str(tmp_path / "m.safetensors")])
    assert not (tmp_path / "m.safetensors").exists()
    from safetensors.torch import save_file

    unet, key = tiny().unet, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    d = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.in_features
    for name, down, up in (("conv", torch.zeros(2, d, 1, 1), torch.zeros(d, 2, 1, 1)), ("ranks", torch.zeros(2, d), torch.zeros(d, 3))):
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match="is malformed: layer .* not \\(rank, in\\) and \\(out, rank\\)"):  # were matmul errors
            dco.load_lora(tmp_path / f"{name}.safetensors", unet)
    good = {f"{key}.lora_down.weight": torch.zeros(2, d), f"{key}.lora_up.weight": torch.zeros(d, 2), f"{key}.alpha": torch.ones(2)}
    save_file(good, tmp_path / "alpha.safetensors")
    with pytest.raises(ValueError, match="alpha holds 2 values, not one"):  # was PyTorch's "only one element tensors ..."
        dco.load_lora(tmp_path / "alpha.safetensors", unet)
    (tmp_path / "e.safetensors").write_bytes(b"garbage" * 10)  # safetensors' own header error was a traceback
    save_file({"<a>": torch.zeros(2, 3, 4)}, tmp_path / "e3.safetensors")
    for f, said in (("e", "is not a readable embeddings file"), ("e3", "holds no token embeddings"), ("none", "no embeddings file")):
        with pytest.raises((ValueError, FileNotFoundError), match=said):
            dco.read_embeddings(tmp_path / f"{f}.safetensors")


def test_a_learned_token_in_the_negative_prompt(setup, tmp_path):
    """The negative prompt was encoded without the learned rows: a token there was an IndexError. With
    --guidance cfg the fine-tuned model reads it like any prompt; consistency guidance runs the negative prompt
    through the pretrained model, which has no such token: one sentence, as for --base-prompt."""
    model = tiny()
    tokens = dco.LearnedTokens.from_initializers(model, ["<dog>"], ["dog"])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x = dco.sample(model, [], ["a <dog>"], tokens=tokens, negative="a <dog> blurry", guidance="cfg", steps=2, latents=latents, progress=False)
    # the token starts as "dog" exactly, so the negative "a <dog> blurry" is "a dog blurry"
    want = model.sample(["a dog"], "a dog blurry", steps=2, latents=latents, progress=False)
    assert_close(x, want, rtol=1e-4, what="cfg with a learned token in the negative prompt")
    with pytest.raises(ValueError, match="the negative prompt is for the pretrained model, which has no '<dog>'"):
        dco.sample(model, [], ["a <dog>"], tokens=tokens, negative="a <dog> blurry", steps=1, progress=False)


def test_lora_scales_must_match_the_loras_and_a_non_finite_loss_is_one_sentence(setup, tmp_path, monkeypatch):
    """--lora A B --lora-scale 0.5 silently ran B at 1.0; and the loop's FloatingPointError (a non-finite
    loss, with the last good checkpoint named) reached the user as a traceback."""
    root, sd1, _ = setup
    lora = tmp_path / "l.safetensors"
    model = sdm.StableDiffusion.from_pretrained(sd1)
    dco.save_lora(lora, model.unet, [dco.LoRA.create(model.unet, 2)])
    with pytest.raises(SystemExit, match="error: 2 LoRAs but 1 --lora-scale"):
        dco.main(["sample", "--pretrained-model", str(sd1), "--lora", str(lora), str(lora), "--lora-scale", "0.5",
                  "--prompt", "a dog", "--steps", "1", "--output-dir", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # refused before anything is written
    real = dco.dco_step
    monkeypatch.setattr(dco, "dco_step", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(SystemExit, match="error: the loss became nan at step 0"):
        dco.main(["train", "--pretrained-model", str(sd1), "--images", str(root / "images"), "--captions", str(root / "config.json"),
                  "--config-name", "dreambooth", "--output-dir", str(tmp_path / "nan"), "--rank", "2", "--max-train-steps", "2",
                  "--resolution", "32"])


def test_multi_vector_embeddings_are_refused_not_misread(tmp_path):
    """{"<a>": (2, d), "<b>": (1, d)} was concatenated to 3 rows for 2 token ids, so <b> silently read <a>'s
    second vector; an SDXL file whose clip_l/clip_g row counts disagree with its tokens likewise. One sentence each."""
    from safetensors.torch import save_file

    model = tiny()
    w = model.text_encoder.cfg.width
    multi = tmp_path / "multi.safetensors"
    save_file({"<a>": torch.randn(2, w), "<b>": torch.ones(1, w)}, str(multi))
    with pytest.raises(ValueError, match="multi-vector"):
        dco.LearnedTokens.load(multi, model)
    xl = tiny(TINY_XL)
    w1, w2 = xl.text_encoder.cfg.width, xl.text_encoder_2.cfg.width
    bad = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(2, w1), "clip_g": torch.randn(1, w2)}, str(bad), {"tokens": '["<a>", "<b>"]'})
    with pytest.raises(ValueError, match="rows"):
        dco.LearnedTokens.load(bad, xl)
    one = tmp_path / "one.safetensors"  # single-vector files still load, each token its own row
    save_file({"<a>": torch.zeros(1, w), "<b>": torch.ones(1, w)}, str(one))
    assert torch.equal(dco.LearnedTokens.load(one, tiny()).extra[0][1], torch.ones(w))


def test_each_learned_token_is_also_written_alone_for_a1111_and_diffusers(tmp_path):
    """diffusers' load_textual_inversion and A1111 read one token a file (A1111 names it after the file)."""
    for cfg, sub in ((None, "sd1"), (TINY_XL, "sdxl")):
        model = tiny(cfg) if cfg else tiny()
        ti = dco.LearnedTokens.from_initializers(model, ["<dog>", "<ball>"], ["dog", "ball"])
        ti.save_per_token(tmp_path / sub)
        for i, name in enumerate(("dog", "ball")):
            alone = dco.read_embeddings(tmp_path / sub / f"{name}.learned_embeds.safetensors")
            assert alone[0] == [f"<{name}>"] and all(torch.equal(a[0], r[i]) for a, r in zip(alone[1], ti.rows))
            a1111 = sdm.load_embeddings(tmp_path / sub / "a1111" / f"{name}.safetensors")
            if cfg is None:
                assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"][0], ti.rows[0][i])
            else:  # SDXL: A1111 and ComfyUI read clip_l / clip_g
                assert torch.equal(a1111["clip_l"][0], ti.rows[0][i]) and torch.equal(a1111["clip_g"][0], ti.rows[1][i])


def test_kohya_files_tell_a1111_their_base_version(tmp_path):
    """A1111 (extensions-builtin/Lora/network.py detect_version) reads the base version off ss_base_model_version /
    ss_v2 and hides LoRAs of another version; a file with other metadata but neither counted as SD 1.x, so an SDXL
    or SD 2.x LoRA was hidden under its own model."""
    from dataclasses import replace

    def a1111_version(meta):
        return "SDXL" if meta.get("ss_base_model_version", "").startswith("sdxl_") else "SD2" if meta.get("ss_v2") == "True" else "SD1"

    sd2 = replace(sdm.TINY, unet=replace(sdm.TINY.unet, use_linear_in_transformer=True))
    for cfg, want in ((sdm.TINY, "SD1"), (sd2, "SD2"), (TINY_XL, "SDXL")):
        model = tiny(cfg)
        dco.save_lora(tmp_path / "k.safetensors", model.unet, [dco.LoRA.create(model.unet, 2)], "kohya")
        with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
            assert a1111_version(f.metadata()) == want


def test_a1111_embeddings_are_named_by_their_file_and_token_renames_at_sampling(setup, tmp_path):
    """A1111 types an embedding by its file's name: an `emb_params` file, or a .pt with string_to_param {'*': ...},
    loaded as token 'emb_params' (or was refused as '*'). Ours names its token in the metadata, with its initializer
    (consistency guidance needs it). --token renames a file's tokens in the prompt (diffusers' token=...)."""
    root, sd1, _ = setup
    model = sdm.StableDiffusion.from_pretrained(sd1)
    w = model.text_encoder.cfg.width
    torch.save({"string_to_param": {"*": torch.randn(1, w)}, "name": "whatever"}, tmp_path / "mystar.pt")
    assert dco.read_embeddings(tmp_path / "mystar.pt")[0] == ["mystar"]
    ti = dco.LearnedTokens.from_initializers(model, ["<dog>"], ["dog"])
    ti.save_per_token(tmp_path / "run")
    ti.save(tmp_path / "run" / "learned_embeds.safetensors")
    assert dco.read_embeddings(tmp_path / "run" / "a1111" / "dog.safetensors")[0::2] == (["<dog>"], ["dog"])
    dco.LearnedTokens.from_initializers(tiny(), ["[V]"], ["dog"]).save_per_token(tmp_path / "v")  # DreamBooth's notation:
    assert dco.read_embeddings(tmp_path / "v" / "a1111" / "V.safetensors")[0] == ["[V]"]  # its metadata was read as JSON
    run = lambda out, *extra: dco.main(["sample", "--pretrained-model", str(sd1), "--steps", "1", "--output-dir", str(tmp_path / out),
                                        "--w-cons", "2", *extra])
    run("plain", "--embeddings", str(tmp_path / "run" / "learned_embeds.safetensors"), "--prompt", "a <dog> in the snow")
    run("a1111", "--embeddings", str(tmp_path / "run" / "a1111" / "dog.safetensors"), "--prompt", "a <dog> in the snow")
    run("renamed", "--embeddings", str(tmp_path / "run" / "learned_embeds.safetensors"), "--token", "<rex>", "--prompt", "a <rex> in the snow")
    plain = np.asarray(Image.open(tmp_path / "plain" / "0000_00.png"))
    assert all(np.array_equal(plain, np.asarray(Image.open(tmp_path / d / "0000_00.png"))) for d in ("a1111", "renamed"))
    with pytest.raises(SystemExit, match=r"'<dog>' is a learned token's old name \(--token renamed it\).*write '<rex>' instead"):
        run("refused", "--embeddings", str(tmp_path / "run" / "learned_embeds.safetensors"), "--token", "<rex>", "--prompt", "a <dog>")
    torch.save({"string_to_param": {"*": torch.randn(1, w)}}, tmp_path / "dog.pt")  # named after a word of the vocabulary
    run("word", "--guidance", "cfg", "--embeddings", str(tmp_path / "dog.pt"), "--token", "<d>", "--prompt", "a <d> and a dog")
    assert (tmp_path / "word" / "0000_00.png").exists()  # its old name is that word, and a prompt may use the word
    for extra, said in ((["--embeddings", str(tmp_path / "dog.pt")], "'dog' is already a token.*name it with --token"),
                        (["--embeddings", str(tmp_path / "dog.pt"), "--token", "<a>", "<b>"], "one distinct name per token"),
                        (["--token", "<a>"], "--token names the tokens of an embeddings file, and none is loaded")):
        with pytest.raises(SystemExit, match=said):
            run("refused", "--guidance", "cfg", "--prompt", "a <a> dog", *extra)
    assert not (tmp_path / "refused").exists()


def test_clip_skip_reaches_train_and_sample_and_is_recorded_as_kohya_does(setup, tmp_path, monkeypatch):
    """--clip-skip was parsed (and checked on resume) but never reached the model; a LoRA's text conditioning is that
    layer's, so its files say it (kohya's ss_clip_skip, which A1111 users read) and sampling with another value warns."""
    root, sd1, _ = setup
    skips, real = [], sdm.load_model
    monkeypatch.setattr(sdm, "load_model", lambda *a, **k: skips.append(a[8]) or real(*a, **k))
    dco.main(["train", "--pretrained-model", str(sd1), "--images", str(root / "images"), "--captions", str(root / "config.json"),
              "--config-name", "dreambooth", "--output-dir", str(tmp_path / "run"), "--rank", "2", "--max-train-steps", "1",
              "--clip-skip", "2"])
    kohya, peft = (safe_open(str(tmp_path / "run" / f), "pt").metadata() for f in ("lora_kohya.safetensors", "pytorch_lora_weights.safetensors"))
    assert (kohya["ss_clip_skip"], peft["clip_skip"]) == ("2", "2")
    sample = ["sample", "--pretrained-model", str(sd1), "--lora", str(tmp_path / "run"), "--prompt", "a dog", "--guidance", "cfg",
              "--steps", "1"]
    with pytest.warns(UserWarning, match="trained with --clip-skip 2; sampling with --clip-skip 1"):
        dco.main([*sample, "--output-dir", str(tmp_path / "s1")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dco.main([*sample, "--output-dir", str(tmp_path / "s2"), "--clip-skip", "2"])
    assert skips == [2, 1, 2]


# ---- the user walk (2026-12-07): outputs of an earlier run, captions beside the images, tokens, foreign files ---------


def test_overwrite_removes_the_earlier_runs_token_files_and_nothing_else(setup, tmp_path):
    """--overwrite keeps the earlier run's final outputs until they are replaced, but a run with other (or no) tokens
    does not replace its token files: `sample --lora FOLDER` then read the old run's <dog> with the new LoRA."""
    root, sd1, _ = setup
    out = tmp_path / "run"
    dco.train(train_args(root, sd1, out, max_train_steps=1, inserting_tokens=["<dog>", "<dog>2"], initializer_tokens=["dog", "cat"],
                         captions="", images=str(root / "images"), instance_prompt="a <dog> and a <dog>2"))
    assert (out / "dog_2.learned_embeds.safetensors").is_file() and (out / "a1111" / "dog.safetensors").is_file()
    mine = dco.LearnedTokens.from_initializers(tiny(), ["<own>"], ["dog"])
    sdm.save_embeddings(out / "own.safetensors", {"<own>": mine.rows[0]})  # the user's file, not ours
    model = tiny()
    dco.save_lora(out / "m.safetensors", model.unet, [dco.LoRA.create(model.unet, 2)])
    mine.save(out / "m.learned_embeds.safetensors", {"merged": ["a", "b"]})  # a merge's output beside its LoRA
    dco.train(train_args(root, sd1, out, max_train_steps=1, config_name="dreambooth", overwrite=True))  # no tokens now
    assert sorted(p.name for p in out.iterdir() if "embeds" in p.name or p.name in ("a1111", "own.safetensors")) == \
        ["m.learned_embeds.safetensors", "own.safetensors"]
    assert dco.embeddings_beside(out, dco.load_lora(out, tiny().unet)) is None
    dco.train(train_args(root, sd1, out, max_train_steps=1, overwrite=True))  # <dog> again: one token, its files only
    assert sorted(p.name for p in (out / "a1111").iterdir()) == ["dog.safetensors"] and not (out / "dog.learned_embeds.safetensors").exists()


def test_tokens_whose_file_names_clash_each_get_a_file(tmp_path):
    """<dog> and [dog] are both 'dog' as a file name: the second overwrote the first's a1111 and per-token files."""
    ti = dco.LearnedTokens.from_initializers(tiny(), ["<dog>", "[dog]"], ["dog", "cat"])
    written = ti.save_per_token(tmp_path)
    assert len(set(written)) == 4 and all(p.is_file() for p in written)
    assert sorted(dco.read_embeddings(p)[0][0] for p in written if p.parent.name == "a1111") == ["<dog>", "[dog]"]


def test_captions_beside_the_images_and_token_lists_that_cannot_work(setup, tmp_path):
    """The README puts captions.json in the image folder: it was reported as an unreadable image. Learned tokens given
    twice, empty, or as a string instead of a list got messages about other things (the tokenizer's added tokens,
    "none of the learned tokens ['']", 5 inserting tokens for "<dog>")."""
    root, _, _ = setup
    folder = tmp_path / "imgs"
    names = write_images(folder)
    caps = {"images": names, "prompts": [f"a <dog> {i}" for i in range(3)], "inserting_tokens": ["<dog>"], "initializer_tokens": ["dog"]}
    for name in ("captions.json", "metadata.jsonl"):
        text = json.dumps(caps) if name.endswith("json") else "\n".join(json.dumps({"image": n, "prompt": p}) for n, p in zip(names, caps["prompts"]))
        (folder / name).write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = dco.load_data(dco.DCOArgs(images=str(folder), captions=str(folder / name), inserting_tokens=["<dog>"],
                                            initializer_tokens=["dog"]))
        assert got[2] == ["a dog 0", "a dog 1", "a dog 2"]
        (folder / name).unlink()
    a = lambda **kw: dco.DCOArgs(images=str(folder), instance_prompt="a <dog> and <cat>", **kw)
    with pytest.raises(ValueError, match=r"hold '<dog>' twice; give each learned token once"):
        dco.load_data(a(inserting_tokens=["<dog>", "<dog>"], initializer_tokens=["dog", "dog"]))
    with pytest.raises(ValueError, match="hold an empty one"):
        dco.load_data(a(inserting_tokens=["<dog>", " "], initializer_tokens=["dog", "cat"]))
    (tmp_path / "c.json").write_text(json.dumps({**caps, "inserting_tokens": "<dog>"}))
    with pytest.raises(ValueError, match=r"inserting_tokens must be a list of strings, one per learned token"):
        dco.load_data(dco.DCOArgs(images=str(folder), captions=str(tmp_path / "c.json")))


def test_sample_warns_on_a_prompt_without_the_tokens_and_files_that_are_no_lora(setup, tmp_path):
    """A prompt holding none of the loaded tokens (a typo: '<Dog>') was sampled as text without a word; two LoRAs that
    each bring embeddings said "give one embeddings file" to a user who gave none; another method's file, an embeddings
    file or a training state given as --lora was "unexpected key '...'"."""
    root, sd1, _ = setup
    for name in ("a", "b"):
        dco.train(train_args(root, sd1, tmp_path / name, max_train_steps=1, checkpointing_steps=1))
    run = lambda out, *extra: dco.main(["sample", "--pretrained-model", str(sd1), "--steps", "1", "--output-dir", str(tmp_path / out), *extra])
    with pytest.warns(UserWarning, match=r"the prompt holds none of the learned tokens \['<dog>'\].*case included"):
        run("typo", "--lora", str(tmp_path / "a"), "--prompt", "a <Dog> on the snow")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("fine", "--lora", str(tmp_path / "a"), "--prompt", "a <dog> on the snow")
    with pytest.raises(SystemExit, match="2 embeddings files .* merge the LoRAs first"):
        run("two", "--lora", str(tmp_path / "a"), str(tmp_path / "b"), "--prompt", "a <dog>")
    unet = tiny().unet
    vico_like = tmp_path / "vico.safetensors"
    sdm.save_safetensors({"image_cross_attention.to_k.weight": torch.zeros(2, 2)}, vico_like, {"method": "vico"})
    for f, said in ((vico_like, "another method's weights .*method=vico"),
                    (tmp_path / "a" / "learned_embeds.safetensors", "learned token embeddings; give it with --embeddings"),
                    (tmp_path / "a" / "a1111" / "dog.safetensors", "learned token embeddings"),
                    (tmp_path / "a" / "checkpoint-1" / "training_state.safetensors", "a training state; give its checkpoint folder")):
        with pytest.raises(ValueError, match=f"holds no LoRA but {said}"):
            dco.load_lora(f, unet)


def test_merge_refuses_ties_knobs_under_sum(tmp_path):
    """--density / --rank without --method ties_svd were ignored: a plain sum was written as if trimmed."""
    for extra, said in ((["--density", "0.5"], "--density would be ignored"), (["--rank", "8", "--density", "0.2"], "--density and --rank")):
        with pytest.raises(SystemExit, match=f"{said}.*add --method ties_svd"):
            dco.main(["merge", "--lora", "a", "b", "--output", str(tmp_path / "m.safetensors"), *extra])
    assert not (tmp_path / "m.safetensors").exists()


def test_a_token_that_extends_a_loaded_one_is_not_read_as_it():
    """With <s> loaded and a LoRA's <s>2 not (one token's a1111 or per-token file), "a <s>2" passed the checks and
    was read as <s> + "2": the loaded tokens were blanked out before looking for the missing ones."""
    lora = SimpleNamespace(tokens=["<s>", "<s>2"])
    dco.check_tokens(["l"], [lora], SimpleNamespace(tokens=["<s>"]), "a <s> and a 2")
    with pytest.raises(ValueError, match=r"learned token\(s\) \['<s>2'\], whose embeddings are not loaded"):
        dco.check_tokens(["l"], [lora], SimpleNamespace(tokens=["<s>"]), "a <s>2 on wood")
    with pytest.raises(ValueError, match="'<s>2' is a learned token's old name .*write '<b>'"):
        dco.check_tokens([], [], SimpleNamespace(tokens=["<s>", "<b>"]), "a <s>2 on wood", {"<s>2": (["<b>"], "merge --token")})


def test_train_refuses_a_token_with_a_space_from_flag_or_file_before_writing(setup, tmp_path):
    """A learned token "my dog" trained (CLIP's tokenizer takes it, and reads it even inside "amy doggy"), but sample's
    and merge's --token refuse such names; train refuses it too, from the flag or the captions file, writing nothing."""
    root, sd1, _ = setup
    names = [f"{i:02d}.png" for i in range(3)]
    (tmp_path / "c.json").write_text(json.dumps({"images": names, "prompts": ["a my dog on a ledge"] * 3,
                                                 "inserting_tokens": ["my dog"], "initializer_tokens": ["dog"]}))
    for extra in ([], ["--inserting-tokens", "my\tdog", "--initializer-tokens", "dog"]):
        with pytest.raises(SystemExit, match=r"the inserting token 'my\sdog' holds a space, which sample --token .*'<my_dog>'"):
            dco.main(["train", "--pretrained-model", str(sd1), "--images", str(root / "images"), "--captions",
                      str(tmp_path / "c.json"), "--output-dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_train_warns_on_a_validation_prompt_without_the_learned_tokens(setup, tmp_path):
    """sample warned on a prompt holding none of the learned tokens (a typo: '<Dog>'), train's --validation-prompt
    not: its grids showed the plain text without a word."""
    root, sd1, _ = setup
    run = lambda out, prompt: dco.train(train_args(root, sd1, tmp_path / out, max_train_steps=1, checkpointing_steps=0,
                                                   validation_prompt=prompt, num_validation_images=1))
    with pytest.warns(UserWarning, match=r"the validation prompt holds none of the learned tokens \['<dog>'\].*case included"):
        run("typo", "a <Dog> on the snow")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run("fine", "a <dog> on the snow")


def test_resume_names_tokens_given_by_flag_in_one_run_and_by_file_in_the_other(setup, tmp_path):
    """Tokens from the captions file in one run and as --inserting-tokens in the other (the same tokens) were refused
    as "--initializer-tokens: [] there, ['dog'] here"; now one sentence names the flags to give or drop."""
    root, sd1, _ = setup
    caps = json.loads((root / "config.json").read_text())["full_ti"]
    (tmp_path / "flat.json").write_text(json.dumps({k: caps[k] for k in ("images", "prompts")}))
    flags = dict(inserting_tokens=["<dog>"], initializer_tokens=["dog"])
    dco.train(train_args(root, sd1, tmp_path / "file", max_train_steps=1, checkpointing_steps=1))
    with pytest.raises(ValueError, match=r"ran without --inserting-tokens \(its tokens, if any, from the captions file\), and "
                                         r"this run with them; drop --inserting-tokens and --initializer-tokens as that run did"):
        dco.train(train_args(root, sd1, tmp_path / "file", max_train_steps=2, resume="latest", **flags))
    dco.train(train_args(root, sd1, tmp_path / "flag", captions=str(tmp_path / "flat.json"), config_name="",
                         max_train_steps=1, checkpointing_steps=1, **flags))
    with pytest.raises(ValueError, match=r"ran with --inserting-tokens <dog> --initializer-tokens dog, and this run without "
                                         r"them; give them as that run did"):
        dco.train(train_args(root, sd1, tmp_path / "flag", max_train_steps=2, resume="latest"))
    assert not any((tmp_path / d / "checkpoint-2").exists() for d in ("file", "flag"))
