"""ICO and DCI (dci_ico.py) on a tiny random Stable Diffusion: the identities of the method card
(methods/dci_ico.md, section 7), prompt assembly, gradient isolation, checkpoints and resume."""

import copy
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image
from safetensors.torch import load_file

import dci_ico as di
import sd_model as sdm

PHRASE = "<new1> <new2> <new3> cat"


def tiny(seed=0):
    torch.manual_seed(seed)
    model = sdm.StableDiffusion(sdm.TINY).eval().requires_grad_(False)
    with torch.no_grad():  # the default init leaves some paths near zero; make every one count
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def base():
    return tiny()


@pytest.fixture
def model(base):
    return copy.deepcopy(base)  # the tokenizer gains tokens in most tests


def trained_ico(model, **kw):
    """An ICO whose K/V deltas and rows are non-zero, as after some training."""
    ico = di.ICO(model, ["<new1>", "<new2>", "<new3>"], "cat", **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ico.kv.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        ico.rows.add_(0.5 * torch.randn(ico.rows.shape, generator=g))
    return ico


def folder_of_images(path, n, seed=0, size=(40, 36)):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    return path


def sets(b, real_c, span_c, real_a, noun_a):
    rows = torch.zeros(4, b, 77, dtype=torch.bool)
    for k, slots in enumerate((real_c, span_c, real_a, noun_a)):
        rows[k, :, slots] = True
    return di.Branches(None, None, *rows, [])


# ---- the dual-branch integration module (Eqs. 3-5)


def test_mask_algebra_matches_the_official_formulas():
    g = torch.Generator().manual_seed(0)
    p_c, p_a = (torch.randn(2, 3, 64, 77, generator=g).mul(3).softmax(-1) for _ in range(2))
    # p_c = "a <new1> <new2> <new3> cat in the snow" (7 tokens, S_c = slots 2..5), p_a = "a dog in the snow"
    br = sets(2, range(1, 8), range(2, 6), range(1, 6), [2])
    m = di.integration_masks(p_c, p_a, br, gamma=0.7)
    # the code (src/model.py new_forward) with its index lists, 0-based after SOS
    ref_c = (10 * p_c[..., 1:8]).softmax(-1)
    ref_a = (10 * p_a[..., 1:6]).softmax(-1)
    m_c, m_a = ref_c[..., [1, 2, 3, 4]].sum(-1), ref_a.sum(-1) - ref_a[..., [1]].sum(-1)
    s_c, s_a = 500 * (10 * m_c).softmax(-1), 500 * (10 * m_a).softmax(-1)
    both = torch.stack([s_c, 0.7 * s_a]).softmax(0)
    assert_close(m.tokens_c[..., 1:8], ref_c, what="token renormalisation")
    assert m.tokens_c[..., [0, *range(8, 77)]].abs().max() == 0 and m.tokens_a[..., 6:].abs().max() == 0
    assert_close(m.tokens_a[..., 1:6], ref_a, what="auxiliary token renormalisation")
    assert_close(m.tokens_c.sum(-1), torch.ones(2, 3, 64), what="Â^c sums to 1")
    assert_close(m.tokens_a.sum(-1), torch.ones(2, 3, 64), what="Â^a sums to 1")
    assert_close(m.m_c, m_c, what="m_c"), assert_close(m.m_a, m_a, what="m_a")
    assert_close(m.m_a, 1 - (m.tokens_a[..., 2]), what="m_a = 1 - aux-noun mass")
    assert_close(m.s_c, s_c, rtol=1e-5, what="s_c"), assert_close(m.s_a, s_a, rtol=1e-5, what="s_a")
    for s in (m.s_c, m.s_a):
        assert_close(s.sum(-1), torch.full((2, 3), 500.0), rtol=1e-6, what="s sums to 500 over pixels")
    assert_close(m.aux, both[1], what="M_a")
    assert_close(both[0] + m.aux, torch.ones_like(m.aux), what="M_c + M_a = 1")
    means = [di.integration_masks(p_c, p_a, br, gm).aux.mean().item() for gm in (-2, -1, 0, 1, 2)]
    assert means == sorted(means) and means[0] < means[-1]
    for pixels in (16, 64, 256):  # gamma = 0 still injects: M_a = sigmoid(-s_c), whatever the layer's size
        q_c, q_a = (torch.randn(2, 3, pixels, 77, generator=g).mul(3).softmax(-1) for _ in range(2))
        m0 = di.integration_masks(q_c, q_a, br, 0.0)
        assert_close(m0.aux, torch.sigmoid(-m0.s_c), what=f"gamma = 0 at {pixels} pixels")
        assert m0.aux.max() > 0.4  # where V and the noun do not attend (s_c near 0), M_a is near 1/2


def unet_batch(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3 * b, 4, 8, 8, generator=g), torch.randn(3 * b, 77, 64, generator=g)


def test_integration_touches_only_the_concept_rows_of_cross_attention(base):
    x, ctx = unet_batch()
    br = sets(2, range(1, 8), range(2, 6), range(1, 6), [2])
    c, a = slice(2, 4), slice(4, 6)
    runs, records = {}, {}
    for gamma in (-torch.inf, 2.0, 1e9):
        records[gamma], equal = {}, []
        proc = di.dbim_processor(c, a, br, gamma, records[gamma])

        def check(attn, q, k, v, proc=proc):
            out = proc(attn, q, k, v)
            equal.append(torch.equal(out[c], out[a]))
            return out

        with torch.no_grad(), sdm.hooked(base.unet, processor=check, attn="attn2"):
            runs[gamma] = base.unet(x, 900, ctx)
        if gamma == 1e9:
            assert all(equal) and len(equal) == 7  # M_a = 1: O_c = O_a in every layer
    attn2 = [l.name for l in sdm.attention_layers(base.unet, "attn2")]
    assert list(records[2.0]) == attn2 and not any(n.endswith("attn1") for n in records[2.0])
    inert, mixed = runs[-torch.inf], runs[2.0]
    assert torch.equal(inert[:2], mixed[:2]) and torch.equal(inert[4:], mixed[4:])  # uncond and aux rows bit-identical
    assert not torch.allclose(inert[2:4], mixed[2:4])
    with torch.no_grad(), sdm.hooked(base.unet, processor=lambda at, q, k, v: sdm.attention_with_probs(at, q, k, v)[0]):
        assert torch.equal(base.unet(x, 900, ctx), inert)  # gamma = -inf: M_a = 0, nothing injected


# ---- DCI sampling


def run(model, ico, prompts, **kw):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(len(prompts), 4, 16, 16, generator=g)
    x_a = torch.randn(len(prompts), 4, 16, 16, generator=g)
    kw = {"steps": 4, "eta": 0.0, "guidance_scale": 5.0, "progress": False, "latents": x_t, **kw}
    return di.sample(model, ico, prompts, aux_latents=x_a if "share_noise" not in kw else None, **kw)[0]


def test_gamma_minus_infinity_and_identical_branches_give_plain_sampling(model):
    ico = trained_ico(model)
    prompts = [f"a {PHRASE} in the snow", f"a {PHRASE} at night"]
    plain = run(model, ico, prompts, dci=False, sampler="dpmpp_2m")
    inert = run(model, ico, prompts, tau=1.0, gamma=-torch.inf, aux_noun="dog", sampler="dpmpp_2m")
    assert_close(inert, plain, rtol=1e-4, atol=1e-5, what="gamma = -inf")
    mixed = run(model, ico, prompts, tau=1.0, gamma=1.0, aux_noun="dog", sampler="dpmpp_2m")
    assert (mixed - plain).abs().max() > 1e-2  # the test can fail: DCI does change the image
    separate = run(model, ico, prompts, tau=1.0, gamma=1.0, aux_noun="dog", sampler="dpmpp_2m", share_guidance=False)
    assert (mixed - separate).abs().max() > 1e-3  # x_a's own unconditional term changes its trajectory
    # p_a = p_c and x_a = x_T: O_a = O_c, so the mixture is a no-op whatever the masks (card 7.4)
    same = di.make_branches(model, ico, prompts, "dog")
    same = same._replace(ids_a=same.ids_c, real_a=same.real_c, noun_a=same.span_c)
    for share_guidance in (True, False):
        for sampler in ("ddim", "euler"):
            ref = run(model, ico, prompts, dci=False, sampler=sampler)
            out = run(model, ico, prompts, tau=1.0, gamma=0.5, branches=same, share_noise=True,
                      share_guidance=share_guidance, sampler=sampler)
            assert_close(out, ref, rtol=1e-4, atol=1e-5, what=f"identical branches, {share_guidance=} {sampler}")


def test_stochastic_samplers_pair_dci_with_plain_sampling_step_by_step(model):
    # The aux rows draw from their own stream: with one seed, x_T and every step's noise of the concept rows are
    # plain sampling's, so gamma = -inf reproduces --no-dci even with DDIM eta 1 and DDPM (it did not at first: the
    # doubled batch shifted the generator, and a 160-image benchmark scored the same model differently).
    ico = trained_ico(model)
    prompts = [f"a {PHRASE} in the snow", f"a {PHRASE} at night"]
    for sampler, eta in (("ddim", 1.0), ("ddpm", 0.0)):
        kw = {"steps": 4, "eta": eta, "sampler": sampler, "guidance_scale": 5.0, "progress": False}
        plain = di.sample(model, ico, prompts, dci=False, generator=torch.Generator().manual_seed(3), **kw)[0]
        inert = di.sample(model, ico, prompts, tau=1.0, gamma=-torch.inf, aux_noun="dog",
                          generator=torch.Generator().manual_seed(3), **kw)[0]
        assert_close(inert, plain, rtol=1e-4, atol=1e-5, what=f"gamma = -inf, {sampler} eta {eta}")


def test_the_auxiliary_stream_is_no_other_seeds_stream():
    # Seeded seed + 1 at first: seed s's auxiliary x_T was seed s+1's concept x_T, so a --seed sweep tied neighbours.
    draw = lambda g: torch.randn(64, generator=g)
    for s in range(4):
        aux = draw(di.aux_generator(torch.Generator().manual_seed(s)))
        assert torch.equal(aux, draw(di.aux_generator(torch.Generator().manual_seed(s))))  # reproducible
        for other in range(-2, 8):
            assert not torch.allclose(aux, draw(torch.Generator().manual_seed(other)), atol=0.5), (s, other)


def test_window_boundary_and_tau_zero_never_builds_the_larger_batch(model):
    ico = trained_ico(model)
    sizes = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    try:
        prompts = [f"a {PHRASE}", f"a {PHRASE} on the grass"]
        assert torch.equal(run(model, ico, prompts, tau=0.0, aux_noun="dog"), run(model, ico, prompts, dci=False))
        assert sizes == [4] * 8
        for kw, window_rows in (({}, 6), ({"share_guidance": False}, 8), ({"guidance_scale": 1.0}, 4)):
            sizes.clear()
            run(model, ico, prompts, tau=0.3, aux_noun="dog", timesteps=[801, 701, 700, 1], **kw)
            outside = 2 if kw.get("guidance_scale") == 1.0 else 4
            assert sizes == [window_rows] * 2 + [outside] * 2, kw  # t = 701 is in the window, 700 is not
    finally:
        hook.remove()
    ts = lambda n: sdm.NoiseSchedule().timesteps(n)
    assert sum(di.in_window(t, 0.3) for t in ts(200)) == 60 and sum(di.in_window(t, 0.3) for t in ts(50)) == 15
    record = {}  # the sampler's own installation: the DBIM fires in every attn2 and in no attn1, in the window only
    run(model, ico, prompts, tau=0.3, aux_noun="dog", timesteps=[801, 701, 700, 1], record=record)
    layers = sdm.attention_layers(model.unet, "attn2", latent_size=16)
    assert record.pop("_window_steps") == 2 and list(record) == [l.name for l in layers]
    for l in layers:  # summed M_a over the 2 window steps, per sample and pixel, in [0, 2]
        assert record[l.name].shape == (2, l.res**2) and 0 < record[l.name].mean() < 2


def test_token_sets_from_the_tokenization_with_multi_token_nouns_and_bad_input(model):
    ico = di.ICO(model, ["<new1>", "<new2>"], "teddy bear")
    prompt = di.resolve_prompt("a V teddy bear in times square", ico)
    assert prompt == "a <new1> <new2> teddy bear in times square" == di.resolve_prompt("a {} in times square", ico)
    br = di.make_branches(model, ico, [prompt], "stuffed animal")
    slots = lambda m: m[0].nonzero().flatten().tolist()
    assert br.aux_prompts == ["a stuffed animal in times square"]
    assert slots(br.span_c) == [2, 3, 4, 5] and slots(br.real_c) == list(range(1, 9))
    assert slots(br.noun_a) == [2, 3] and slots(br.real_a) == list(range(1, 7))
    assert br.ids_a[0, 2:4].tolist() == model.tokenizer.tokenize("stuffed animal")
    assert br.ids_c[0].tolist() == model.tokenize([prompt])[0].tolist()
    with pytest.raises(ValueError, match="does not contain the concept"):
        di.make_branches(model, ico, ["a teddy bear in times square"], "dog")
    with pytest.raises(ValueError, match="does not contain the concept"):
        di.make_branches(model, ico, ["a <new1> <new2> cat"], "dog")
    with pytest.raises(ValueError, match="other than the class word"):
        di.make_branches(model, ico, [prompt], "Teddy Bear")
    noun = di.pick_aux_noun(model, "teddy bear")
    assert noun in di.AUX_NOUNS and noun not in ("teddy", "bear")


def test_every_concept_occurrence_is_replaced_and_the_automatic_noun_is_not_in_the_prompt(model):
    """A second "V noun" used to stay in p_a (the concept in the auxiliary branch) and outside S_c; the automatic
    noun was chosen without looking at the prompt ("a V bag next to a bag" -> "a bag next to a bag")."""
    ico = di.ICO(model, ["<new1>", "<new2>"], "teddy bear")
    prompt = di.resolve_prompt("a V teddy bear and a V teddy bear", ico)
    br = di.make_branches(model, ico, [prompt], "stuffed animal")
    slots = lambda m: m[0].nonzero().flatten().tolist()
    assert br.aux_prompts == ["a stuffed animal and a stuffed animal"]
    assert slots(br.span_c) == [2, 3, 4, 5, 8, 9, 10, 11] and slots(br.noun_a) == [2, 3, 6, 7]
    assert slots(br.real_a) == list(range(1, 8)) and not any(t in br.ids_a[0].tolist() for t in ico.token_ids)
    everyone = di.pick_aux_noun(model, "teddy bear")
    others = [n for n in di.AUX_NOUNS if n != everyone]
    assert di.pick_aux_noun(model, "teddy bear", prompts=[f"a V teddy bear next to a {everyone}."]) in others
    assert di.pick_aux_noun(model, "teddy bear", prompts=["a V teddy bear", f"two {everyone}s"]) == everyone  # words, not parts
    with pytest.warns(UserWarning, match="'dog' is also in the prompt"):
        di.make_branches(model, ico, [di.resolve_prompt("a V teddy bear with a dog", ico)], "dog")
    with warnings.catch_warnings():  # "bear" inside the replaced "teddy bear" is not elsewhere in the prompt
        warnings.simplefilter("error")
        assert di.make_branches(model, ico, [prompt], "bear").aux_prompts == ["a bear and a bear"]


def test_init_tokens_one_or_one_per_token_and_ids_in_the_table(model):
    """Two starting rows for three tokens used to cycle silently (rows b, a, b); an id past the table was an IndexError."""
    tokens, table = ["<new1>", "<new2>", "<new3>"], model.text_encoder.token_embedding.weight
    one = di.ICO(copy.deepcopy(model), tokens, "cat", init_tokens=["dog"])
    assert torch.equal(one.rows, table[[model.tokenizer.token_id("dog")] * 3].float())
    more = di.ICO(copy.deepcopy(model), tokens, "cat", init_tokens=["1", "2", "3", "4"])  # CD's rule: the last ones
    assert torch.equal(more.rows, table[[2, 3, 4]].float())
    with pytest.raises(ValueError, match="gives 2 starting rows for 3 tokens; give one, or one per token"):
        di.ICO(copy.deepcopy(model), tokens, "cat", init_tokens=["dog", "cat"])
    with pytest.raises(ValueError, match=f"id 99999 is not a token of this model \\(ids 0-{table.shape[0] - 1}\\)"):
        di.ICO(copy.deepcopy(model), tokens, "cat", init_tokens=["99999"])


# ---- ICO training


def test_ico_prompt_assembly(model):
    ico = di.ICO(model, ["<new1>", "<new2>", "<new3>"], "cat", n_images=3)  # Lp = 1 ("A"), Ls = 1 (".")
    plain = model.tokenize([f"A {PHRASE} ."])
    assert torch.equal(ico.ico_ids, plain) and ico.ico_ids.shape == (1, 77)
    with torch.no_grad():
        ctx = ico.concept_context(model, torch.tensor([0, 2]))
        assert ctx.shape == (2, 77, 64)
        assert torch.equal(ctx[0], ico.encode_ids(model, plain)[0])  # at init: the plain prompt, slot for slot
        ico.prefix[2].add_(1.0)
        moved = ico.concept_context(model, torch.tensor([0, 2]))
        assert torch.equal(moved[0], ctx[0]) and not torch.equal(moved[1, 1:], ctx[1, 1:])
        assert torch.equal(moved[1, 0], ctx[1, 0])  # causal encoder: SOS sees nothing later
        reg = ["a cat on the grass", "a red star"]  # rows without V: exactly plain CLIP
        assert torch.equal(ico.encode_ids(model, model.tokenize(reg)), model.encode_prompt(reg).context)
    rnd = di.ICO(copy.deepcopy(model), ["<new1>", "<new2>", "<new3>"], "cat", n_images=2, prefix_init="",
                 suffix_init="", generator=torch.Generator().manual_seed(0))
    assert rnd.prefix.shape == (2, 4, 64) and rnd.suffix.shape == (2, 2, 64) and rnd.prefix.std() < 0.03
    tpl = di.ICO(model, ["<new1>", "<new2>", "<new3>"], "cat", contexts=False)  # tokens already added: reused
    with torch.no_grad():
        manual = tpl.encode_ids(model, model.tokenize([f"photo of a {PHRASE}"]))
        assert tpl.prefix is None and torch.equal(tpl.concept_context(model, torch.tensor([0])), manual)


def test_gradients_reach_only_image_i_contexts_v_rows_and_cross_attention_kv(model):
    ico = di.ICO(model, ["<new1>", "<new2>", "<new3>"], "cat", n_images=3)
    assert len(ico.kv) == 14 and all(di.KV_PATTERN.search(n) for n in ico.kv_names.values())
    x, _ = unet_batch(1)
    with ico.install(model.unet):
        out = model.unet(x[:2], 500, ico.concept_context(model, torch.tensor([1, 1])))
    out.square().mean().backward()
    for p in (ico.prefix, ico.suffix):
        assert p.grad[1].abs().sum() > 0 and p.grad[[0, 2]].abs().sum() == 0
    assert ico.rows.grad.abs().sum(-1).gt(0).all() and all(p.grad.abs().sum() > 0 for p in ico.kv.values())
    assert not any(p.requires_grad for p in model.parameters())
    k, v = (torch.randn(2, 1, 77, 8, requires_grad=True) for _ in range(2))
    di.sos_detached(None, torch.randn(2, 1, 16, 8), k, v).square().sum().backward()
    assert k.grad[:, :, 0].abs().max() == 0 and v.grad[:, :, 0].abs().max() == 0 and k.grad[:, :, 1:].abs().min() > 0


def test_optimizer_groups_and_learning_rates(model):
    ico = di.ICO(model, ["<new1>", "<new2>", "<new3>"], "cat", n_images=2)
    opt = di.make_optimizer(ico, di.ICOArgs())  # finetune_addtoken.yaml: 1e-5 x batch 2 x 3 GPUs
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([6e-5, 6e-4, 6e-4])
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert opt.param_groups[0]["params"][-1] is ico.rows and opt.param_groups[1]["params"][0] is ico.prefix


def train_args(tmp_path, name, **kw):
    images = folder_of_images(tmp_path / "refs", 3)
    reg = folder_of_images(tmp_path / "reg", 2, seed=1, size=(32, 32))
    (reg / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i:02d}.png", "caption": c}) + "\n"
                                                for i, c in enumerate(["a cat on the grass", "a cat at night"])))
    base = dict(images=str(images), class_word="cat", reg_images=str(reg), output_dir=str(tmp_path / name),
                train_batch_size=3, gradient_accumulation_steps=1, max_train_steps=4, checkpointing_steps=2,
                learning_rate=1e-3, scale_lr=False, lr_scheduler="cosine", lr_warmup_steps=1)
    return di.ICOArgs(**{**base, **kw})


def test_cached_latents_train_as_encoding_every_step(tmp_path, base, monkeypatch):
    """The cache (each image and its mirror, and the regularization images) is exact: --no-cache-latents draws the
    same views and noise and trains the same way (to float rounding: a batch encoded against all views at once)."""
    calls, encode = [], sdm.AutoencoderKL.encode
    monkeypatch.setattr(sdm.AutoencoderKL, "encode", lambda self, x, chunk=0: calls.append((len(x), chunk)) or encode(self, x, chunk))
    di.train(train_args(tmp_path, "cached"), copy.deepcopy(base))
    assert [c for _, c in calls] == [8, 8]  # the references' views and the regularization images', once each, 8 a pass
    calls.clear()
    di.train(train_args(tmp_path, "encoded", cache_latents=False), copy.deepcopy(base))
    assert calls == [(3, 0)] * 4  # each step's batch of 3
    logs = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert len(logs("cached")) == 4 and {r["reg_rows"] for r in logs("cached")} <= {1, 2}
    for a, b in zip(logs("cached"), logs("encoded")):
        assert a["reg_rows"] == b["reg_rows"] and abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)


def test_resume_equals_an_uninterrupted_run_and_the_backbone_is_untouched(tmp_path, base, monkeypatch):
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    di.train(train_args(tmp_path, "full"), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unet, text table, VAE
    calls, real = [0], di.ICO.concept_context

    def dies_in_step_3(self, *a):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(di.ICO, "concept_context", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        di.train(train_args(tmp_path, "resumed"), copy.deepcopy(base))
    monkeypatch.setattr(di.ICO, "concept_context", real)
    di.train(train_args(tmp_path, "resumed", resume="latest"), copy.deepcopy(base))
    for f in ("kv_deltas", "learned_embeds", "contexts"):
        a, b = (load_file(str(tmp_path / d / f"{f}.safetensors")) for d in ("full", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    logs = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    assert logs("full")[-2:] == logs("resumed")[-2:] and {r["reg_rows"] for r in logs("full")} <= {1, 2}
    # a resume with other settings: one sentence before anything is loaded. Of other shapes it was broadcast or
    # failed in Adam; of the same shapes (a class word, a learning rate) it went on silently with the old ones.
    for kw, what in (({"prefix_init": "A photo of"}, "--prefix-init: A there, A photo of here"),
                     ({"contexts": False}, "--contexts: True there, False here"),
                     ({"class_word": "bowl"}, "--class-word: "), ({"learning_rate": 3e-5}, "--learning-rate: ")):
        with pytest.raises(ValueError, match=re.escape(what) + r".*resume with its settings"):
            di.train(train_args(tmp_path, "resumed", resume="latest", max_train_steps=6, **kw), copy.deepcopy(base))


def test_checkpoint_round_trip_and_refusing_another_base_model(tmp_path, base):
    out = di.train(train_args(tmp_path, "run", max_train_steps=2, contexts=False), copy.deepcopy(base))
    state = load_file(str(out / "checkpoint-2" / "training_state.safetensors"))
    fresh = copy.deepcopy(base)
    ico = di.ICO.load(out, fresh)
    assert torch.equal(ico.rows, state["param.rows"]) and all(torch.equal(v, state[f"param.kv.{k}"]) for k, v in ico.kv.items())
    assert ico.rows.abs().sum() > 0 and not torch.equal(ico.rows, base.text_encoder.token_embedding.weight[[43514, 47629, 42170]])
    meta = di.read_metadata(out)  # the training facts: effective learning rates, steps, batch, resolution, seed
    assert meta["learning_rates"] == {"kv_and_tokens": 1e-3} and meta["steps"] == meta["max_train_steps"] == 2
    assert meta["batch"] == [3, 1] and meta["resolution"] == 32 and meta["seed"] == di.ICOArgs.seed
    ctx_meta = di.read_metadata(di.train(train_args(tmp_path, "ctx", max_train_steps=1, scale_lr=True), copy.deepcopy(base)))
    assert ctx_meta["learning_rates"] == {"kv_and_tokens": pytest.approx(3e-3), "contexts": pytest.approx(3e-2)}
    embeds = sdm.load_embeddings(out / "learned_embeds.safetensors")  # diffusers' multi-vector layout
    assert list(embeds) == ico.tokens[:1] and torch.equal(embeds[ico.tokens[0]], ico.rows)
    assert torch.equal(sdm.load_embeddings(out / "a1111" / "concept.safetensors")["emb_params"], ico.rows)  # A1111: one embedding, Lv vectors
    deltas = load_file(str(out / "kv_deltas.safetensors"))
    assert set(deltas) == {f"{n}.weight" for n in ico.kv_names.values()} and "contexts.safetensors" not in {p.name for p in out.iterdir()}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in fresh.state_dict().items())  # still the base weights
    x, ctx = unet_batch(1)
    with torch.no_grad():  # dW is added once, also by a nested install (validation inside training), and removed on exit
        with ico.install(fresh.unet):
            once = fresh.unet(x, 500, ctx)
            with ico.install(fresh.unet):
                assert torch.equal(fresh.unet(x, 500, ctx), once)
        assert torch.equal(fresh.unet(x, 500, ctx), base.unet(x, 500, ctx)) and not torch.allclose(once, base.unet(x, 500, ctx))
    again = di.ICO.load(out, copy.deepcopy(base))
    ids = fresh.tokenize([PHRASE])
    with torch.no_grad():
        assert torch.equal(ico.encode_ids(fresh, ids), again.encode_ids(fresh, ids))
    meta = di.read_metadata(out)
    assert (meta["method"], meta["class_word"], meta["tokens"], meta["steps"]) == ("cd-template", "cat", ico.tokens, 2)
    with pytest.raises(ValueError, match="another base model"):
        di.ICO.load(out, tiny(seed=7))
    with pytest.raises(ValueError, match="context table holds 2"):
        di.train(train_args(tmp_path, "too_many", max_images=2), copy.deepcopy(base))


def test_gradient_checkpointing_trains_the_same(tmp_path, base):
    """The hooks stay installed through backward, where checkpointed blocks run again."""
    runs = {}
    for ckpt in (False, True):
        out = di.train(train_args(tmp_path, f"ckpt{ckpt}", max_train_steps=2, checkpointing_steps=0,
                                  gradient_checkpointing=ckpt), copy.deepcopy(base))
        runs[ckpt] = load_file(str(out / "kv_deltas.safetensors"))
    assert runs[True].keys() == runs[False].keys()
    for k in runs[False]:
        assert runs[False][k].abs().sum() > 0
        assert_close(runs[True][k], runs[False][k], rtol=1e-4, what=f"K/V delta with checkpointing, {k}")


def test_reference_preprocessing_and_regularization_captions(base, tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8))  # 36 wide, 40 high
    assert np.array_equal(np.asarray(di.square_crop(img)), np.asarray(img)[2:38])  # centre square crop
    mean, std = di.posterior(base, [img], 32)
    x = sdm.image_to_tensor(di.square_crop(img), 32)[None]  # bicubic resize to the resolution, [-1, 1]
    with torch.no_grad():
        for f, view in enumerate((x, x.flip(-1))):  # index 1 is the horizontal flip (p = 0.5 at training)
            d = base.vae.encode(view)
            assert_close(mean[:, f], d.mean, what="posterior mean")
            assert_close(std[:, f], d.std, what="posterior std")
    reg = folder_of_images(tmp_path / "reg", 2)
    (reg / "00.txt").write_text("a cat on the grass\n")
    with pytest.raises(ValueError, match="no caption for 1 regularization image.*01.png"):
        di.load_captioned_folder(reg)
    (reg / "01.txt").write_text("a cat at night")
    images, caps = di.load_captioned_folder(reg)
    assert len(images) == 2 and caps == ["a cat on the grass", "a cat at night"]


# ---- the command line and bad input


@pytest.fixture(scope="module")
def model_dirs(base, tmp_path_factory):
    """The tiny model as a converted folder, and a second one with other weights."""
    import weights_convert as wc

    dirs = []
    for m in (base, tiny(seed=7)):
        folder = tmp_path_factory.mktemp("tiny")
        wc.write_parts(folder, sdm.TINY, {p: getattr(m, p).state_dict() for p in ("unet", "vae", "text_encoder")})
        dirs.append(folder)
    return dirs


def test_command_line_train_then_sample_with_masks_and_bad_input(model_dirs, tmp_path, capsys, monkeypatch):
    import weights_convert
    read, load_vae = [], weights_convert.load_vae  # --vae must reach the model of train and of sample
    monkeypatch.setattr(weights_convert, "load_vae", lambda path, like: read.append(str(path)) or load_vae(path, like))
    sd, other = model_dirs
    imgs = folder_of_images(tmp_path / "refs", 2)
    (imgs / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    train = ["train", "--pretrained-model", str(sd), "--images", str(imgs), "--class-word", "cat", "--output-dir", str(run)]
    with pytest.warns(UserWarning, match="skipping 'notes.txt'"):
        di.main([*train, "--max-train-steps", "2", "--checkpointing-steps", "1", "--train-batch-size", "1",
                 "--gradient-accumulation-steps", "1", "--mixed-precision", "bf16", "--validation-prompt", "a V cat",
                 "--validation-steps", "2", "--num-validation-images", "1", "--vae", str(sd)])
    for f in ("kv_deltas.safetensors", "learned_embeds.safetensors", "a1111/concept.safetensors", "contexts.safetensors",
              "checkpoint-1/kv_deltas.safetensors", "checkpoint-2/training_state.safetensors", "validation/step-000002.png",
              "log.jsonl", "args.json"):
        assert (run / f).exists(), f
    assert f"wrote {run}" in capsys.readouterr().out
    assert all(v.abs().sum() > 0 for v in load_file(str(run / "kv_deltas.safetensors")).values())  # bf16 autocast trains dW
    assert load_file(str(run / "contexts.safetensors"))["prefix"].shape == (2, 1, 64)

    out = tmp_path / "dci"
    (tmp_path / "prompts.txt").write_text("a {} at night\n\n")
    sample = ["sample", "--concept", str(run), "--steps", "4", "--sampler", "euler"]  # the base model comes from the concept
    di.main([*sample, "--prompt", "a V cat on the grass", "--prompt-file", str(tmp_path / "prompts.txt"), "--tau", "0.5",
             "--gamma", "1", "--aux-noun", "dog", "--save-masks", "--output-dir", str(out), "--vae", str(sd)])
    assert read == [str(sd)] * 2
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["aux_prompt"] for r in rows] == ["a dog on the grass", "a dog at night"]
    assert rows[1]["prompt"] == "a <new1> <new2> <new3> cat at night"
    assert Image.open(out / "0000_01.png").size == (32, 32)
    assert Image.open(out / "0000_01_masks.png").size == (32 * 8, 32)  # the image + one tile per attn2 layer
    assert "auxiliary prompt: 'a dog on the grass'" in capsys.readouterr().out
    di.main([*sample, "--prompt", "a V cat", "--no-dci", "--save-masks", "--batch-size", "2", "--output-dir", str(tmp_path / "plain")])
    assert sorted(p.name for p in (tmp_path / "plain").glob("*.png")) == ["0000_00.png", "0000_01.png"]  # no window: no masks

    bad, empty = tmp_path / "bad", tmp_path / "empty"
    empty.mkdir()
    cut, half = tmp_path / "cut", tmp_path / "half"  # a copy that stopped: a truncated kv_deltas, a missing embeddings file
    for d in (cut, half):
        d.mkdir()
        for f in ("kv_deltas.safetensors", "learned_embeds.safetensors"):
            (d / f).write_bytes((run / f).read_bytes())
    (cut / "kv_deltas.safetensors").write_bytes((run / "kv_deltas.safetensors").read_bytes()[:-100])
    (half / "learned_embeds.safetensors").unlink()
    errors = {
        "no concept in the prompt": ([*sample, "--prompt", "a cat on the grass"], "does not contain the concept '<new1> <new2> <new3> cat'"),
        "plain, no tokens": ([*sample, "--prompt", "a cat", "--no-dci"], "does not contain the concept '<new1> <new2> <new3>'"),
        "aux noun = class word": ([*sample, "--prompt", "a V cat", "--aux-noun", "Cat"], "other than the class word 'cat'"),
        "too long": ([*sample, "--prompt", "a V cat " + "very " * 80], "over CLIP's 77"),
        "another base model": ([*sample, "--prompt", "a V cat", "--pretrained-model", str(other)], "trained on another base model"),
        "not a concept": (["sample", "--concept", str(imgs), "--prompt", "a V cat"], "holds no ICO concept"),
        "truncated concept": (["sample", "--concept", str(cut), "--prompt", "a V cat"], "is not a readable ICO concept"),
        "no embeddings": (["sample", "--concept", str(half), "--prompt", "a V cat"], "learned_embeds.safetensors is missing"),
        "more images than contexts": ([*train, "--max-images", "1"], "context table holds 1"),
        "empty folder": ([*train[:3], "--images", str(empty), "--class-word", "cat", "--output-dir", str(bad)], "no readable images"),
        "missing folder": ([*train[:3], "--images", str(tmp_path / "nope"), "--class-word", "cat", "--output-dir", str(bad)],
                           "'.*nope' does not exist"),
        "no class word": (train[:5] + ["--output-dir", str(bad)], "--class-word"),
        "token exists": ([*train, "--tokens", "cat", "--overwrite"], "must be new words"),
        "validation prompt": ([*train, "--validation-prompt", "a cat", "--overwrite"], "does not contain the concept"),
        "resolution": ([*train, "--resolution", "30", "--overwrite"], "multiple of 4"),
    }
    for what, (argv, msg) in errors.items():
        if argv[0] == "sample":
            argv = [*argv, "--output-dir", str(bad)]
        with pytest.raises(SystemExit, match=msg), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            di.main(argv)
        assert not bad.exists(), what  # nothing written
    assert len(list(run.glob("checkpoint-*"))) == 2  # the failed runs left the first one alone


def test_learned_embeds_load_in_diffusers_and_old_folders_still_load(tmp_path, base, hf_tokenizer_dir):
    """diffusers' own loader reads the file: "<new1> cat" becomes our Lv rows, in order; a folder saved
    with one key per token (before this layout) loads to the same concept."""
    from conftest import hf_text_model, hf_tokenizer
    from diffusers.loaders import TextualInversionLoaderMixin
    from safetensors.torch import save_file

    out = di.train(train_args(tmp_path, "run", max_train_steps=1, contexts=False), copy.deepcopy(base))
    ico = di.ICO.load(out, copy.deepcopy(base))

    class Pipe(TextualInversionLoaderMixin):
        hf_device_map, components = None, {}

    pipe = Pipe()
    pipe.tokenizer, pipe.text_encoder = hf_tokenizer(hf_tokenizer_dir), hf_text_model(width=ico.rows.shape[1])
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    prompt = pipe.maybe_convert_prompt("a photo of <new1> cat", pipe.tokenizer)
    ids = pipe.tokenizer(prompt).input_ids[4:7]
    assert prompt == "a photo of <new1> <new1>_1 <new1>_2 cat"
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), ico.rows)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in out.glob("*.safetensors"):
        (legacy / f.name).write_bytes(f.read_bytes())
    save_file({t: ico.rows[i:i + 1].contiguous() for i, t in enumerate(ico.tokens)}, str(legacy / "learned_embeds.safetensors"))
    assert torch.equal(di.ICO.load(legacy, copy.deepcopy(base)).rows, ico.rows)


def load_custom_diffusion(pipe, folder, tokens):
    """README's recipe (ICO in diffusers): diffusers' Custom Diffusion processors on every attn2, the tokens' files."""
    from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor2_0

    sd = load_file(f"{folder}/pytorch_custom_diffusion_weights.safetensors")
    procs = {}
    for name in pipe.unet.attn_processors:  # "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", ...
        k = sd.get(f"{name}.to_k_custom_diffusion.weight")
        if k is None:  # attn1: the file holds only an empty marker
            procs[name] = AttnProcessor2_0()
            continue
        procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=k.shape[0],
                                                      cross_attention_dim=k.shape[1])
        procs[name].load_state_dict({w: sd[f"{name}.{w}"] for w in ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")})
    pipe.unet.set_attn_processor(procs)
    pipe.unet.to(pipe.device, pipe.unet.dtype)  # the new processors are fp32 on the CPU
    pipe.load_textual_inversion([f"{folder}/{t}.safetensors" for t in tokens])


def test_diffusers_export_loads_into_a_diffusers_pipeline_and_matches_our_model(tmp_path, hf_tokenizer_dir, model_dirs, capsys):
    """`export --format diffusers`: diffusers' Custom Diffusion file (full K/V weights under its processor names) and
    one textual-inversion file a token. In a diffusers pipeline of the same weights, loaded by the README's recipe,
    the text encoder and UNet on the concept prompt equal ours with the ICO installed; diffusers' documented
    `unet.load_attn_procs` installs nothing (diffusers#9320), its `_pipeline=` form works thanks to the attn1 markers."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from test_pipeline import build_pipeline

    pipe = build_pipeline("sd1", hf_tokenizer_dir)
    pipe.save_pretrained(tmp_path / "diffusers")
    ours = sdm.StableDiffusion.from_pretrained(tmp_path / "diffusers")
    ico = trained_ico(ours)
    ico.save(tmp_path / "concept", {"method": "ico", "base_model": str(tmp_path / "diffusers"), "base_probe": di.base_probe(ours).tolist()})
    out = tmp_path / "export"
    di.main(["export", "--concept", str(tmp_path / "concept"), "--format", "diffusers", "--output-dir", str(out)])
    assert "a <new1> <new2> <new3> cat" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {di.CUSTOM_DIFFUSION_WEIGHTS, *(f"{t}.safetensors" for t in ico.tokens)}

    sd, unet = load_file(str(out / di.CUSTOM_DIFFUSION_WEIGHTS)), pipe.unet
    attn2 = [n for n in unet.attn_processors if ".attn2." in n]
    assert len(attn2) == len(ico.kv) // 2 == 11 and len(unet.attn_processors) == 22
    assert set(sd) == {f"{n}.to_{p}_custom_diffusion.weight" for n in attn2 for p in "kv"} | {
        n for n in unet.attn_processors if ".attn1." in n}
    for n in attn2:  # full weights: each minus diffusers' base weight is one of the (non-zero) deltas
        for p in "kv":
            d = sd[f"{n}.to_{p}_custom_diffusion.weight"] - getattr(unet.get_submodule(n.removesuffix(".processor")), f"to_{p}").weight
            assert d.abs().max() > 0.01 and any(
                d.shape == dw.shape and torch.allclose(d, dw, atol=1e-6) for dw in ico.kv.values()), n
    for i, t in enumerate(ico.tokens):  # train_custom_diffusion.py's layout: {"<new1>": (width,)}
        row = load_file(str(out / f"{t}.safetensors"))
        assert list(row) == [t] and torch.equal(row[t], ico.rows[i])
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):  # --save-precision: the fp32 export, cast
        di.main(["export", "--concept", str(tmp_path / "concept"), "--output-dir", str(tmp_path / precision), "--save-precision", precision])
        for name in (di.CUSTOM_DIFFUSION_WEIGHTS, *(f"{t}.safetensors" for t in ico.tokens)):
            full, half = load_file(str(out / name)), load_file(str(tmp_path / precision / name))
            assert half.keys() == full.keys() and all(v.dtype == dtype and torch.equal(v, full[k].to(dtype)) for k, v in half.items())
    capsys.readouterr()

    prompt = f"a {ico.phrase} in the snow"
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 300])
    with torch.no_grad():
        ctx = ico.encode_ids(ours, ours.tokenize([prompt, "two blue circles"]))
        with ico.install(ours.unet):
            want = ours.unet(x, t, ctx)
        assert not torch.allclose(ours.unet(x, t, ctx), want, atol=1e-2)  # the K/V deltas matter
    unet.load_attn_procs(str(out), weight_name=di.CUSTOM_DIFFUSION_WEIGHTS)  # the documented call: a silent no-op
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    load_custom_diffusion(pipe, out, ico.tokens)
    ids = pipe.tokenizer([prompt, "two blue circles"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, ours.tokenize([prompt, "two blue circles"]))
    with torch.no_grad():
        ref_ctx = pipe.text_encoder(ids)[0]
        assert_close(ref_ctx, ctx, what="text encoder with the learned tokens")
        assert_close(unet(x, t, ref_ctx).sample, want, what="UNet with the Custom Diffusion processors")
        unet.load_attn_procs(str(out), weight_name=di.CUSTOM_DIFFUSION_WEIGHTS, _pipeline=pipe)  # private, but it works
        assert_close(unet(x, t, ref_ctx).sample, want, what="UNet after load_attn_procs(_pipeline=pipe)")

    with pytest.raises(SystemExit, match="error: .*was trained on another base model"):  # W_base must be dW's base
        di.main(["export", "--concept", str(tmp_path / "concept"), "--format", "diffusers", "--output-dir", str(tmp_path / "x"),
                 "--pretrained-model", str(model_dirs[0])])
    with pytest.raises(ValueError, match="cannot name a file"):
        di.export_diffusers(di.ICO(small := tiny(), ["<a/b>"], "cat"), small, tmp_path / "bad", {})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "x").exists()


def test_export_overwrite_removes_an_earlier_exports_files_and_only_those(tmp_path):
    """A second export into the folder of a first (export --overwrite) leaves the files of this one only: the first
    one's token files of other tokens go; files that are not an export's (by their own header) stay, a copy of the
    concept's learned_embeds and a safetensors named like a token included."""
    model, out = tiny(), tmp_path / "export"
    di.export_diffusers(di.ICO(model, ["<a1>", "<a2>"], "cat"), model, out, {"method": "ico"})
    (out / "notes.txt").write_text("mine")
    sdm.save_embeddings(out / "learned_embeds.safetensors", {"<a1>": torch.zeros(2, 32)}, "diffusers",
                        {"class_word": "cat", "tokens": ["<a1>"]})  # training's file, copied here by the user
    sdm.save_safetensors({"x": torch.zeros(1)}, out / "<z9>.safetensors", {"tokens": ["<z9>"]})  # not an export's
    (out / "broken.safetensors").write_bytes(b"not safetensors")
    assert di.is_ico_export(out / "<a2>.safetensors") and not di.is_ico_export(out / "learned_embeds.safetensors")
    files = di.export_diffusers(di.ICO(model := tiny(), ["<b1>"], "dog"), model, out, {"method": "ico"})
    assert {p.name for p in out.iterdir()} == {p.name for p in files} | {
        "notes.txt", "learned_embeds.safetensors", "<z9>.safetensors", "broken.safetensors"}
    assert {p.name for p in files} == {di.CUSTOM_DIFFUSION_WEIGHTS, "<b1>.safetensors"}


def test_negative_gamma_needs_no_equals_sign(monkeypatch):
    """`--gamma -inf` (never inject) and `--gamma -1e9` reach the sampler; argparse alone takes them for options."""
    seen = []
    monkeypatch.setattr(di, "run_sample", lambda a: seen.append(a.gamma))
    for value, want in (("-inf", -math.inf), ("-1e9", -1e9), ("-2", -2.0), ("-0.5", -0.5)):
        di.main(["sample", "--concept", "x", "--prompt", "a V cat", "--gamma", value])
        assert seen[-1] == want


def test_window_batches_hold_the_branches_in_the_card_layout(model):
    """In the window: [x; x; x_a] with [uncond; c; c_a] (shared guidance) or [x; x; x_a; x_a] with
    [uncond; c; uncond; c_a] (card 6.4); x_a is its own noise, not x_T, unless --share-noise."""
    ico = trained_ico(model)
    prompt = [f"a {PHRASE} in the snow"]
    br = di.make_branches(model, ico, prompt, "dog")
    with torch.no_grad():
        c, a = ico.encode_ids(model, br.ids_c), ico.encode_ids(model, br.ids_a)
        u = ico.encode_ids(model, model.tokenize([""]))
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[2].clone())))
    try:
        for share_guidance, want in ((True, [u, c, a]), (False, [u, c, u, a])):
            seen.clear()
            di.sample(model, ico, prompt, tau=1.0, aux_noun="dog", steps=2, eta=0.0, progress=False, share_guidance=share_guidance,
                      generator=torch.Generator().manual_seed(0))
            x, ctx = seen[0]
            assert torch.equal(ctx, torch.cat(want)), share_guidance
            x_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # plain sampling's x_T
            rows = [x_t, x_t, x[-1:]] if share_guidance else [x_t, x_t, x[-1:], x[-1:]]
            assert torch.equal(x, torch.cat(rows).to(x.dtype)) and not torch.allclose(x[-1:], x_t)
        seen.clear()
        di.sample(model, ico, prompt, tau=1.0, aux_noun="dog", steps=2, eta=0.0, progress=False, share_noise=True,
                  generator=torch.Generator().manual_seed(0))
        assert torch.equal(seen[0][0][0], seen[0][0][-1])  # --share-noise: x_a starts at x_T
    finally:
        hook.remove()


def test_sampling_settings_fail_in_one_sentence_before_the_output_folder(model_dirs, base, tmp_path, capsys):
    """Settings the samplers crash on or take silently: --steps 0 (ZeroDivisionError), --steps over 1000 (every t = 1,
    no window), --gamma nan (NaN images), an unknown sampler or a size the UNet cannot halve and double back (found
    only after the output folder existed), and an auxiliary prompt over 77 tokens in a later prompt of the file."""
    sd, _ = model_dirs
    concept = tmp_path / "concept"
    trained_ico(copy.deepcopy(base)).save(concept, {"base_model": str(sd), "base_probe": di.base_probe(base).tolist()})
    (tmp_path / "prompts.txt").write_text("a V cat " + "very " * 70 + "\n")  # 75 tokens: fits, its auxiliary prompt does not
    bad = tmp_path / "bad"
    sample = ["sample", "--concept", str(concept), "--prompt", "a V cat", "--steps", "4", "--output-dir", str(bad)]
    errors = {"steps 0": (["--steps", "0"], "--steps must be at least 1 \\(got 0\\)"),  # the shared floor, at parse time
              "steps 1000": (["--steps", "1000"], "--steps must be between 1 and 999"),
              "gamma nan": (["--gamma", "nan"], "must be numbers"),
              "sampler": (["--sampler", "heun"], "invalid choice: 'heun'"),
              "size": (["--height", "30"], "multiples of 4 for this model"),
              "long auxiliary prompt": (["--prompt-file", str(tmp_path / "prompts.txt"), "--aux-noun",
                                         "very big fluffy brown and white dog"], "auxiliary prompt of .* over CLIP's 77")}
    for what, (extra, msg) in errors.items():
        with pytest.raises(SystemExit) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            di.main([*sample, *extra])
        assert re.search(msg, f"{e.value} {capsys.readouterr().err}") and not bad.exists(), what


def test_template_baseline_has_no_context_table_to_fill_and_any_output_folder_name(tmp_path, base):
    """--no-contexts trains on any number of images (--max-images sizes the context table only), and the final
    save records max_train_steps even when the output folder is itself named like a checkpoint."""
    out = di.train(train_args(tmp_path, "checkpoint-7", contexts=False, max_images=2, max_train_steps=1,
                              checkpointing_steps=0), copy.deepcopy(base))
    assert di.read_metadata(out)["steps"] == 1 and not list(out.glob("checkpoint-*"))


def test_official_and_diffusers_spellings_tokens_with_plus_and_retrieved_regularization_sets(base, tmp_path):
    # "--modifier_token <new1>+<new2>+<new3>" (official code, diffusers' Custom Diffusion) was one token named so: Lv = 1
    out = di.train(train_args(tmp_path, "plus", tokens=["<new1>+<new2>"], init_tokens=["47629+42170"], reg_images="",
                              max_train_steps=1, checkpointing_steps=0, learning_rate=0.0), copy.deepcopy(base))
    assert di.read_metadata(out)["tokens"] == ["<new1>", "<new2>"]
    ico = di.ICO.load(out, copy.deepcopy(base))
    assert ico.token_ids == [49408, 49409] and torch.equal(ico.rows, base.text_encoder.token_embedding.weight[[47629, 42170]])
    # a template with V was trained literally ("a photo of a V cat": the letter v, the V rows never got a gradient)
    m = copy.deepcopy(base)
    tmpl = di.ICO(m, ["<new1>"], "cat", contexts=False, template="a photo of a V cat")
    assert di.resolve_prompt(tmpl.template, tmpl) == "a photo of a <new1> cat"
    with torch.no_grad():  # the training caption is the resolved template, with V's row in it
        assert torch.equal(tmpl.concept_context(m, torch.tensor([0])), tmpl.encode_ids(m, m.tokenize(["a photo of a <new1> cat"])))
    with pytest.raises(ValueError, match="--template 'photo of a V' does not hold the concept '<new1> cat'"):
        di.ICO(copy.deepcopy(base), ["<new1>"], "cat", contexts=False, template="photo of a V")
    # --n-prefix / --n-suffix beside init words (the default "A" / ".") were ignored without a word
    with pytest.raises(ValueError, match="--n-prefix 2 is used only with --prefix-init ''"):
        di.train(train_args(tmp_path, "n", n_prefix=2), copy.deepcopy(base))
    assert not (tmp_path / "n").exists()
    # Custom Diffusion's retrieve.py layout (the official --reg_datapath/--reg_caption, diffusers' --real_prior):
    # images.txt lists FOLDER/images/N.jpg as written at retrieval, caption.txt the captions line by line
    reg = tmp_path / "samples_cat"
    folder_of_images(reg / "images", 2)
    (reg / "images.txt").write_text("".join(f"elsewhere/samples_cat/images/{i:02d}.png\n" for i in range(2)))
    (reg / "caption.txt").write_text("a cat on the grass\na cat at night\n")
    (reg / "urls.txt").write_text("http://a\nhttp://b\n")
    for arg in (reg, reg / "images.txt"):
        images, caps = di.load_captioned_folder(arg)
        assert caps == ["a cat on the grass", "a cat at night"] and [im.size for im in images] == [(36, 40)] * 2
    (reg / "caption.txt").write_text("a cat on the grass\n")
    with pytest.raises(ValueError, match="caption.txt' has 1 lines for the 2 images"):
        di.load_captioned_folder(reg)


def test_each_prompt_of_a_file_is_its_own_seeded_batch(model_dirs, base, tmp_path):
    # All prompts x --batch-size went into one batch: with DDIM eta 1 (the default) a prompt's images changed when
    # other prompts were added to the file, and the UNet batch grew with the file (3 rows per image).
    sd, _ = model_dirs
    concept = tmp_path / "concept"
    trained_ico(copy.deepcopy(base)).save(concept, {"method": "ico", "base_model": str(sd), "base_probe": di.base_probe(base).tolist()})
    (tmp_path / "more.txt").write_text("a {} at night\n")
    sample = ["sample", "--concept", str(concept), "--steps", "2", "--tau", "1", "--aux-noun", "dog", "--batch-size", "2"]
    pixels = lambda d, i: np.asarray(Image.open(tmp_path / d / f"0000_{i:02d}.png"))
    di.main([*sample, "--prompt", "a V cat on the grass", "--prompt-file", str(tmp_path / "more.txt"), "--output-dir", str(tmp_path / "both")])
    di.main([*sample, "--prompt", "a V cat at night", "--output-dir", str(tmp_path / "alone")])
    rows = [json.loads(l) for l in (tmp_path / "both" / "samples.jsonl").read_text().splitlines()]
    assert [r["aux_prompt"] for r in rows] == ["a dog on the grass"] * 2 + ["a dog at night"] * 2
    assert all(np.array_equal(pixels("both", 2 + i), pixels("alone", i)) for i in range(2))
    assert not np.array_equal(pixels("alone", 0), pixels("alone", 1))  # the batch's images differ


def test_clip_skip_reaches_train_and_sample_and_is_recorded(model_dirs, tmp_path, monkeypatch):
    """--clip-skip was parsed (and checked on resume) but never reached the model: V and dW are learned on that layer's
    output, so the concept records it and sampling with another value warns."""
    sd, _ = model_dirs
    skips, real = [], sdm.load_model
    monkeypatch.setattr(sdm, "load_model", lambda *a, **k: skips.append(a[8]) or real(*a, **k))
    di.main(["train", "--pretrained-model", str(sd), "--images", str(folder_of_images(tmp_path / "refs", 1)), "--class-word", "cat",
             "--output-dir", str(tmp_path / "run"), "--max-train-steps", "1", "--clip-skip", "2"])
    assert di.read_metadata(tmp_path / "run")["clip_skip"] == 2
    sample = ["sample", "--concept", str(tmp_path / "run"), "--prompt", "a V cat", "--steps", "2", "--no-dci"]
    with pytest.warns(UserWarning, match="trained with --clip-skip 2; sampling with --clip-skip 1"):
        di.main([*sample, "--output-dir", str(tmp_path / "s1")])
    di.main([*sample, "--output-dir", str(tmp_path / "s2"), "--clip-skip", "2"])
    assert skips == [2, 1, 2]


def test_the_variant_is_recorded_and_reaches_the_base_model_in_sample_and_export(model_dirs, tmp_path, monkeypatch):
    """An SD 2.x single file does not say whether it predicts v or eps, so train needs --variant. sample and export load
    the base the concept records, and now with the variant it records: they said "pass the variant" until it was typed
    again. Under another --pretrained-model the recorded variant (its base's) is not used."""
    sd, _ = model_dirs
    seen, real = [], sdm.load_model
    monkeypatch.setattr(sdm, "load_model", lambda *a, **k: seen.append(k.get("variant", a[4] if len(a) > 4 else "")) or real(*a, **k))
    di.main(["train", "--pretrained-model", str(sd), "--variant", "tiny", "--images", str(folder_of_images(tmp_path / "refs", 1)),
             "--class-word", "cat", "--output-dir", str(tmp_path / "run"), "--max-train-steps", "1"])
    assert di.read_metadata(tmp_path / "run")["variant"] == "tiny"
    sample = ["sample", "--concept", str(tmp_path / "run"), "--prompt", "a V cat", "--steps", "2", "--no-dci"]
    di.main([*sample, "--output-dir", str(tmp_path / "s1")])
    di.main(["export", "--concept", str(tmp_path / "run"), "--format", "diffusers", "--output-dir", str(tmp_path / "e")])
    di.main([*sample, "--output-dir", str(tmp_path / "s2"), "--pretrained-model", str(sd)])
    assert seen == ["tiny", "tiny", "tiny", ""]


def test_sample_refusals_before_anything_is_written_and_overwrite_leaves_no_earlier_images(model_dirs, base, tmp_path, capsys):
    """A user walk's findings: an auxiliary noun holding the concept's own tokens put the concept in the auxiliary
    branch; a prompt naming every preset noun was an IndexError after the output folder existed; a missing
    --prompt-file was a bare [Errno 2]; --concept naming nothing, a file, an unfinished run or an export all read
    "kv_deltas.safetensors is missing"; --save-masks without a window said nothing; and --overwrite left an earlier
    run's images (and masks) beside the new ones, which samples.jsonl no longer lists."""
    sd, _ = model_dirs
    concept = tmp_path / "concept"
    trained_ico(copy.deepcopy(base)).save(concept, {"base_model": str(sd), "base_probe": di.base_probe(base).tolist()})
    bad = tmp_path / "bad"
    sample = ["sample", "--concept", str(concept), "--prompt", "a V cat", "--steps", "4"]
    unfinished, export = tmp_path / "unfinished", tmp_path / "export"
    for n in (2, 4):
        (unfinished / f"checkpoint-{n}").mkdir(parents=True)
        for f in ("kv_deltas.safetensors", "learned_embeds.safetensors"):
            (unfinished / f"checkpoint-{n}" / f).write_bytes((concept / f).read_bytes())
    (unfinished / "checkpoint-6").mkdir()  # cut before its files were written
    export.mkdir()
    (export / di.CUSTOM_DIFFUSION_WEIGHTS).write_bytes(b"")
    nouns = " ".join(n for n in di.AUX_NOUNS if n != "cat")
    errors = {"aux noun = V": (["--aux-noun", "<new1>"], "holds the concept's tokens"),
              "every preset noun": (["--prompt", f"a V cat with a {nouns}"], "every preset auxiliary noun .* --aux-noun"),
              "prompt file": (["--prompt-file", str(tmp_path / "nope.txt")], "--prompt-file '.*nope.txt' does not exist"),
              "no concept": (["--concept", str(tmp_path / "nope")], "--concept '.*nope' does not exist"),
              "a file": (["--concept", str(concept / "kv_deltas.safetensors")], "is a file; pass its folder"),
              "unfinished run": (["--concept", str(unfinished)], "unfinished run .*checkpoint-4'"),
              "export": (["--concept", str(export)], "diffusers export")}
    for what, (extra, msg) in errors.items():
        with pytest.raises(SystemExit) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            di.main([*sample, *extra, "--output-dir", str(bad)])
        assert re.search(msg, str(e.value)) and not bad.exists(), (what, str(e.value))
    with pytest.warns(UserWarning, match="--save-masks: no step is in the DCI window"):
        di.main([*sample, "--no-dci", "--save-masks", "--output-dir", str(tmp_path / "plain")])
    out = tmp_path / "out"
    di.main([*sample, "--aux-noun", "dog", "--batch-size", "3", "--save-masks", "--output-dir", str(out)])
    (out / "mine.png").write_bytes(b"a file of the user's")
    di.main([*sample, "--aux-noun", "dog", "--prompt", "a V cat at night", "--output-dir", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["0000_00.png", "args.json", "mine.png", "samples.jsonl"]
    assert [json.loads(l)["prompt"] for l in (out / "samples.jsonl").read_text().splitlines()] == [
        "a <new1> <new2> <new3> cat at night"]
