"""The extension surface: processors, block slots, `hooked`, `attention_layers`, checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import sd_model as sdm


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    u = sdm.UNetModel(sdm.TINY.unet).eval()
    with torch.no_grad():
        for p in u.parameters():  # the default init leaves some outputs near zero; make every path count
            p.add_(0.05 * torch.randn_like(p))
    return u


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([3, 700][:b]), torch.randn(b, 7, 64, generator=g)


def test_identity_hooks_change_nothing_bit_for_bit(unet):
    x, t, ctx = inputs()
    with torch.no_grad():
        plain = unet(x, t, ctx)
        sdpa = lambda attn, q, k, v: F.scaled_dot_product_attention(q, k, v)
        ident = lambda block, h, c: h
        with sdm.hooked(unet, processor=sdpa, attn="both", after_attn1=ident, after_attn2=ident, after_block=ident):
            assert torch.equal(unet(x, t, ctx), plain)


def test_explicit_softmax_path_equals_sdpa(unet):
    x, t, ctx = inputs()
    seen = {}

    def explicit(attn, q, k, v):
        out, p = sdm.attention_with_probs(attn, q, k, v)
        seen[attn.name] = p
        return out

    with torch.no_grad():
        plain = unet(x, t, ctx)
        with sdm.hooked(unet, processor=explicit, attn="both"):
            assert_close(unet(x, t, ctx), plain, rtol=1e-5, atol=1e-6, what="explicit softmax vs SDPA")
    n_blocks = sum(isinstance(m, sdm.BasicTransformerBlock) for m in unet.modules())
    assert len(seen) == 2 * n_blocks
    for name, p in seen.items():
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5), name  # rows are distributions
        assert p.shape[-1] == (7 if name.endswith("attn2") else p.shape[-2])


def test_hooked_restores_state_even_when_the_body_raises(unet):
    blocks = [m for m in unet.modules() if isinstance(m, sdm.BasicTransformerBlock)]
    marker = lambda *a: None
    with pytest.raises(RuntimeError):
        with sdm.hooked(unet, processor=marker, after_block=marker):
            assert all(b.attn2.processor is marker and b.after_block is marker for b in blocks)
            assert all(b.attn1.processor is None for b in blocks)
            raise RuntimeError("boom")
    assert all(b.attn2.processor is None and b.after_block is None and b.after_attn1 is None for b in blocks)
    # nested scopes restore the outer hook, not None
    outer, inner = (lambda *a: 1), (lambda *a: 2)
    with sdm.hooked(unet, after_block=outer):
        with sdm.hooked(unet, after_block=inner):
            assert blocks[0].after_block is inner
        assert blocks[0].after_block is outer
    assert blocks[0].after_block is None


def test_where_filters_by_module_path(unet):
    marker = lambda *a: None
    with sdm.hooked(unet, processor=marker, after_block=marker, where=lambda n: n.startswith("output_blocks")):
        for m in unet.modules():
            if isinstance(m, sdm.BasicTransformerBlock):
                up = m.name.startswith("output_blocks")
                assert (m.attn2.processor is marker) == up and (m.after_block is marker) == up


def test_slots_see_the_block_and_context_and_can_edit(unet):
    x, t, ctx = inputs()
    calls = []

    def after_attn2(block, h, c):
        calls.append((block.name, h.shape, c.shape))
        return h * 1.5

    with torch.no_grad():
        plain = unet(x, t, ctx)
        with sdm.hooked(unet, after_attn2=after_attn2):
            edited = unet(x, t, ctx)
    assert not torch.allclose(edited, plain)
    assert all(c[2] == ctx.shape for c in calls) and calls[0][0] == "input_blocks.1.1.transformer_blocks.0"


def test_attention_layers_of_sd15():
    with torch.device("meta"):
        u = sdm.UNetModel(sdm.SD15.unet)
    layers = sdm.attention_layers(u)
    assert len(layers) == 16 and [l.place for l in layers].count("down") == 6
    assert [l.place for l in layers].count("mid") == 1 and [l.place for l in layers].count("up") == 9
    assert layers[0].name == "input_blocks.1.1.transformer_blocks.0.attn2" and layers[0].res == 64
    assert {l.name: l.res for l in layers}["middle_block.1.transformer_blocks.0.attn2"] == 8
    assert [l.res for l in layers if l.place == "up"] == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert len(sdm.attention_layers(u, "both")) == 32
    with torch.device("meta"):
        assert len(sdm.attention_layers(sdm.UNetModel(sdm.SDXL.unet))) == 70  # 2x2 + 2x10 + 10 + 3x2 + 3x10


def test_gradient_checkpointing_gives_the_same_values_and_gradients(unet):
    x, t, ctx = inputs()
    unet.train()
    grads = []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = ckpt
        out = unet(x, t, ctx)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in unet.parameters()]))
    unet.gradient_checkpointing = False
    unet.eval()
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert_close(b, a, rtol=1e-5, atol=1e-7, what="gradient")


def test_attention_probs_stay_fp32_under_autocast():
    attn = sdm.Attention(8, heads=2, dim_head=4)
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    with torch.autocast("cpu", torch.bfloat16):
        p = sdm.attention_probs(attn, q.bfloat16(), k.bfloat16())
    assert p.dtype == torch.float32 and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-6)
