"""Shared fixtures: small reference models built in diffusers / transformers / open_clip with random
weights, saved the way those libraries save them, for the parity tests.

The references are test-only dependencies (requirements-test.txt). open_clip imports torchvision,
which has no CPU build here; tests/stubs holds a stand-in for the few names it imports.
"""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sd_model as sdm  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def import_open_clip():
    """Import open_clip; without torchvision, through the stand-in in tests/stubs, which is then taken
    off sys.path again so that transformers and diffusers still see no torchvision."""
    if "open_clip" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import open_clip
        return open_clip
    import diffusers  # noqa: F401  (both cache "is torchvision installed?" at import: let them see the truth)
    import transformers  # noqa: F401

    stubs = str(Path(__file__).parent / "stubs")
    sys.path.insert(0, stubs)
    try:
        import open_clip
        import open_clip.tokenizer  # noqa: F401
        import open_clip.transformer  # noqa: F401
    finally:
        sys.path.remove(stubs)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    return open_clip


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs real weights or a GPU; skipped when they are absent")


def assert_close(ours, ref, rtol=1e-5, atol=1e-5, what=""):
    """Relative-to-scale comparison: |ours - ref| <= atol + rtol * max|ref|."""
    err = (ours.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max abs error {err:.3g} (reference scale {scale:.3g})"


def write_hf_tokenizer_files(folder: Path) -> Path:
    """CLIP's vocab.json + merges.txt, built from the same merge list, for transformers' CLIPTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(sdm.VOCAB_PATH).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(sdm.bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    return write_hf_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


def hf_tokenizer(folder, pad="<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


# Small diffusers UNet configs with the block layout of each family (heads given the way diffusers
# reads them: `attention_head_dim` is a head count for SD1/SD2, `num_attention_heads` for SDXL).
UNET_CONFIGS = {
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=48, attention_head_dim=(2, 4, 4),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                use_linear_projection=True, norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=(2, 4, 4),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, norm_num_groups=8,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
}


def diffusers_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **UNET_CONFIGS[kind]).eval()
    randomize(unet)
    return unet


def diffusers_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    randomize(vae)
    return vae


def hf_text_model(width=32, layers=3, heads=4, act="quick_gelu", projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width + 5, num_attention_heads=heads,
                         num_hidden_layers=layers, hidden_act=act, projection_dim=projection or width,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    randomize(model)
    return model


@torch.no_grad()
def randomize(module, scale=0.5):
    """Reference libraries zero-initialise some layers (output convs, norms at 1/0); random values
    everywhere make the parity tests see every weight."""
    g = torch.Generator().manual_seed(1234)
    for name, p in module.named_parameters():
        if p.ndim == 1 and ("norm" in name or "ln" in name):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith("weight") else p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, fan_in) ** 0.5)


# SDXL's layout at toy widths: two text towers (the second projects its pooled output), pooled + 6 size ids
# in y, no attention at the first level, linear proj_in/out, d_head fixed.
TINY_XL = sdm.SDConfig(
    "tiny-xl",
    sdm.UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1, transformer_depth=(0, 2),
                   num_heads=None, num_head_channels=16, context_dim=64, use_linear_in_transformer=True,
                   adm_in_channels=32 + 6 * 8, norm_groups=8),
    sdm.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    sdm.CLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=64, penultimate=True),
    sdm.CLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=64, act="gelu", projection_dim=32, pad_id=0, penultimate=True),
    image_size=32)
