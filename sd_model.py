"""Stable Diffusion (LDM, Rombach et al. 2022, arXiv:2112.10752) in one file: SD 1.x, SD 2.x and SDXL.

Read it top to bottom: configs, tokenizer, CLIP towers, UNet, hooks, VAE, schedules and samplers, the `StableDiffusion`
wrapper, training utilities shared by the method files, and the CLI.

Checkpoint-naming rule: every module is named after the key it has in the original checkpoint, so a CompVis/Stability
single file loads with `strict=True` after its prefixes are stripped (`weights_convert.py`). The UNet and VAE use the
LDM names (`input_blocks.1.1.transformer_blocks.0.attn2.to_k`, `encoder.down.0.block.1.conv1`, `mid.attn_1.q`); the CLIP
towers use the Hugging Face names (`text_model.encoder.layers.0.self_attn.q_proj`, `vision_model.pre_layrnorm`, sic).
Names that look odd are the checkpoint's, e.g. `in_layers.2` is a ResBlock's first 3x3 conv because `in_layers` =
(GroupNorm, SiLU, conv), and `to_out.0` is a Linear inside a Sequential that once also held a Dropout.

Notation (used in every file of the project): x / z latents, x_t the noisy latent at step t, a_t = ᾱ_t (cumulative
product of 1 - β), eps the noise, x0 the clean latent, ctx the text context the UNet cross-attends to, emb the timestep
embedding, y SDXL's vector condition.

Extension points for the method files (DESIGN.md): `Attention.processor`, the three slots of `BasicTransformerBlock`
(`after_attn1`, `after_attn2`, `after_block`), `attention_probs`, the `hooked` context manager and `attention_layers`.
Methods keep their own parameters in their own modules, so `unet.state_dict()` always equals the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import html
import json
import math
import os
import random
import shutil
import sys
import types
import typing
import warnings
from collections import OrderedDict
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent
VOCAB_PATH = ROOT / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP's BPE merges (MIT)
TOY_MODEL_PATH = ROOT / "assets" / "toy" / "sd"  # the project's own small pretrained model


# ---- 1. Configs. Frozen dataclasses; presets below; `infer_config` reads a variant off the weights.


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    transformer_depth: tuple = (1, 1, 1, 0)  # blocks per SpatialTransformer, per level (0: no attention there)
    transformer_depth_middle: int = 1  # SDXL: 10
    num_heads: int | None = 8  # SD1: a fixed head count, so d_head = 40/80/160 ...
    num_head_channels: int | None = None  # ... SD2/XL: a fixed d_head = 64 instead
    context_dim: int = 768  # CLIP ViT-L/14 width (SD1); 1024 SD2; 2048 SDXL (768 + 1280)
    use_linear_in_transformer: bool = False  # SD2/XL: Linear proj_in/out instead of 1x1 convs
    adm_in_channels: int | None = None  # SDXL: pooled text (1280) + 6 size/crop numbers x 256 = 2816
    norm_groups: int = 32  # LDM hard-codes 32; the tiny configs need fewer


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)  # len(ch_mult) - 1 downsamplings: f = 8
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    scale_factor: float = 0.18215  # makes the latents roughly unit variance (LDM Sec. 4.3.2); SDXL 0.13025
    norm_groups: int = 32


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP models use exact "gelu"
    projection_dim: int | None = None  # SDXL's second encoder projects its pooled output to 1280
    pad_id: int = 49407  # SD1 pads with <|endoftext|>; OpenCLIP (SD2, SDXL's 2nd) pads with "!" = 0
    penultimate: bool = False  # SDXL feeds the UNet the penultimate layer, without the final LayerNorm


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    projection_dim: int = 768


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "eps"  # "eps" or "v" (Salimans & Ho 2022, the SD 2.x 768-v models)
    steps_offset: int = 1  # "leading" spacing + 1, as in SD's scheduler configs: 981, 961, ..., 1
    timestep_spacing: str = "leading"  # or "trailing": 999, 979, ..., 19 (Lin et al. 2024, Sec. 3.3)
    rescale_betas_zero_snr: bool = False  # a_999 = 0 (Lin et al. 2024, Alg. 1; diffusers' name); needs "v"


@dataclass(frozen=True)
class SDConfig:
    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    text2: CLIPTextConfig | None = None  # SDXL only
    schedule: ScheduleConfig = ScheduleConfig()
    image_size: int = 512  # default sampling resolution


CLIP_L = CLIPTextConfig()  # openai/clip-vit-large-patch14, 123,060,480 parameters
OPENCLIP_H = CLIPTextConfig(width=1024, layers=23, heads=16, mlp_dim=4096, act="gelu", pad_id=0)  # SD2 drops layer 24
OPENCLIP_BIGG = CLIPTextConfig(width=1280, layers=32, heads=20, mlp_dim=5120, act="gelu", projection_dim=1280, pad_id=0,
                               penultimate=True)
SD2_UNET = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

SD15 = SDConfig("sd15", UNetConfig(), VAEConfig(), CLIP_L)
SD21 = SDConfig("sd21", SD2_UNET, VAEConfig(), OPENCLIP_H, schedule=ScheduleConfig(prediction="v"), image_size=768)
SD21_BASE = SDConfig("sd21-base", SD2_UNET, VAEConfig(), OPENCLIP_H)
SDXL = SDConfig("sdxl", replace(SD2_UNET, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), transformer_depth=(0, 2, 10),
                                transformer_depth_middle=10, context_dim=2048, adm_in_channels=2816),
                VAEConfig(scale_factor=0.13025), replace(CLIP_L, penultimate=True), OPENCLIP_BIGG, image_size=1024)
# For tests: the SD1 layout at toy widths. It follows the SD1 rules the weights cannot show
# (8 heads, 32 GroupNorm groups, 64-wide text heads), so it also survives a trip through a single file.
TINY = SDConfig("tiny", UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2, 1), num_res_blocks=1,
                                   transformer_depth=(1, 1), context_dim=64),
                VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1), CLIPTextConfig(width=64, layers=2, heads=1, mlp_dim=128),
                image_size=32)
PRESETS = {"sd15": SD15, "sd14": SD15, "sd20": SD21, "sd21": SD21, "sd20-base": SD21_BASE, "sd21-base": SD21_BASE, "sdxl": SDXL, "tiny": TINY}


def config_from_dict(d: dict) -> SDConfig:
    """Inverse of `dataclasses.asdict` (JSON turns tuples into lists; turn them back)."""
    def build(cls, v):
        return None if v is None else cls(**{f.name: tuple(v[f.name]) if isinstance(v[f.name], list) else v[f.name]
                                             for f in fields(cls) if f.name in v})
    return SDConfig(d["name"], build(UNetConfig, d["unet"]), build(VAEConfig, d["vae"]),
                    build(CLIPTextConfig, d["text"]), build(CLIPTextConfig, d.get("text2")),
                    build(ScheduleConfig, d.get("schedule", {})), d.get("image_size", 512))


def infer_config(parts: dict[str, dict], variant: str | None = None) -> SDConfig:
    """The SDConfig of weights in this project's layout (`parts`: unet, vae, text_encoder[, text_encoder_2]).

    The family is read off the text towers (SDXL has two; SD2's is 1024 wide), the architecture off the shapes; a preset
    with the same architecture gives the name, and a `variant` the weights contradict is refused. SD 2.x 768-v and 2.x-base
    share every shape, so for SD2 the prediction type must come from `variant` ("sd21": v, "sd21-base": eps)."""
    from weights_convert import text_config_from_weights, unet_config_from_weights, vae_config_from_weights

    if "input_blocks.0.0.weight" not in parts.get("unet", {}):
        raise ValueError("these weights hold no Stable Diffusion UNet (no input_blocks.0.0.weight).")
    if "text_encoder_2" in parts:
        family, heads = "sdxl", {"num_head_channels": 64}
        text = text_config_from_weights(parts["text_encoder"], "quick_gelu", 49407, penultimate=True)
        text2 = text_config_from_weights(parts["text_encoder_2"], "gelu", 0, penultimate=True)
    else:
        family = "sd2" if parts["text_encoder"]["text_model.embeddings.token_embedding.weight"].shape[1] == 1024 else "sd1"
        heads = {"num_head_channels": 64} if family == "sd2" else {"num_heads": 8}
        text = text_config_from_weights(parts["text_encoder"], *(("gelu", 0) if family == "sd2" else ("quick_gelu", 49407)))
        text2 = None
    cfg = SDConfig("custom-" + family, unet_config_from_weights(parts["unet"], **heads),
                   vae_config_from_weights(parts["vae"], 0.13025 if family == "sdxl" else 0.18215), text, text2,
                   image_size={"sd1": 512, "sd2": 768, "sdxl": 1024}[family])
    fits = [name for name, p in PRESETS.items() if (p.unet, p.vae, p.text, p.text2) == (cfg.unet, cfg.vae, cfg.text, cfg.text2)]
    if variant is not None:
        if variant not in PRESETS:
            raise ValueError(f"unknown variant '{variant}'; known: {', '.join(PRESETS)}.")
        if variant not in fits:
            raise ValueError(f"these weights are not a '{variant}' model (they look like {', '.join(fits) or cfg.name}).")
        return PRESETS[variant]
    if family == "sd2" and fits:
        raise ValueError("SD 2.x weights do not record whether the model predicts v (768-v) or eps (base); "
                         "pass the variant: 'sd21' (v, 768 px) or 'sd21-base' (eps, 512 px).")
    return PRESETS[fits[0]] if fits else cfg


# ---- 2. Tokenizer: CLIP's byte-level BPE (Radford et al. 2021) on the `tokenizers` package.


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map: BPE merges work on strings without control
    characters or spaces, so the 68 bytes that are not printable are moved to code points 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in keep)}}


class CLIPTokenizer:
    """Text -> 77 token ids: <|startoftext|>, BPE pieces (words end in '</w>'), <|endoftext|>, padding.

    The vocabulary is rebuilt from CLIP's merge list exactly as openai/CLIP's simple_tokenizer does:
    256 byte characters, the same with '</w>', one entry per merge, then the two specials (49,408).
    Text is cleaned as CLIP does (HTML entities, whitespace, lower case; ftfy's mojibake repair is
    left out). New tokens (placeholders such as "S*") are matched verbatim, case included."""

    bos_id, eos_id, length = 49406, 49407, 77

    def __init__(self, vocab_path: Path = VOCAB_PATH):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # the 48,894 merges CLIP uses
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self._tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, end_of_word_suffix="</w>"))
        self._tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # CLIP's word pattern: contractions, letter runs, single digits, runs of other symbols.
        words = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
        split = pre_tokenizers.Split(words, behavior="removed", invert=True)
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self._tok.decoder = decoders.ByteLevel()
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab[-2:]])
        self._added, self._AddedToken = [], AddedToken

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Append new tokens (placeholders); they get ids 49408, 49409, ... Refuses existing tokens."""
        for t in tokens:
            if self._tok.token_to_id(t) is not None or self._tok.token_to_id(t + "</w>") is not None or t in self._added:
                raise ValueError(f"'{t}' is already a token of the vocabulary; choose a new placeholder string.")
        self._tok.add_tokens([self._AddedToken(t, normalized=False) for t in tokens])
        self._added += tokens
        return [self._tok.token_to_id(t) for t in tokens]

    def tokenize(self, text: str) -> list[int]:
        """BPE ids without the start/end tokens and without padding."""
        return self._tok.encode(html.unescape(html.unescape(text)).strip(), add_special_tokens=False).ids

    def token_id(self, word: str) -> int:
        """The id of `word` if it is exactly one token; otherwise one clear error."""
        ids = self.tokenize(word)
        if len(ids) != 1:
            raise ValueError(f"'{word}' is {len(ids)} CLIP tokens {[self._tok.id_to_token(i) for i in ids]}, not one; "
                             "choose a word that is a single token (or add it as a new token).")
        return ids[0]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in (self.bos_id, self.eos_id)]).replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str], pad_id: int = 49407) -> torch.Tensor:
        """(b, 77) ids; a prompt over 75 tokens is cut (with a warning saying what was cut)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for p in prompts:
            ids = self.tokenize(p)
            if len(ids) > self.length - 2:
                warnings.warn(f"prompt is {len(ids) + 2} tokens, over CLIP's {self.length}; "
                              f"cut: '{self.decode(ids[self.length - 2:])}'", stacklevel=2)
                ids = ids[: self.length - 2]
            rows.append([self.bos_id, *ids, self.eos_id] + [pad_id] * (self.length - 2 - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# ---- 3. CLIP transformers (text and vision share the encoder layer). Hugging Face key names.


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's GELU approximation; its weights expect it


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, (self.q_proj, self.k_proj, self.v_proj, self.out_proj) = heads, (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, causal: bool):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=causal), "b h n d -> b n (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer (Radford et al. 2019 ordering)."""

    def __init__(self, width: int, heads: int, hidden: int, act: str):
        super().__init__()
        self.self_attn, self.layer_norm1 = CLIPAttention(width, heads), nn.LayerNorm(width)
        self.mlp, self.layer_norm2 = CLIPMLP(width, hidden, act), nn.LayerNorm(width)

    def forward(self, x, causal: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


def clip_encoder(cfg) -> nn.ModuleDict:  # a container only, for the "encoder.layers.N" keys
    return nn.ModuleDict({"layers": nn.ModuleList(CLIPEncoderLayer(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act) for _ in range(cfg.layers))})


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = nn.ModuleDict({"token_embedding": nn.Embedding(cfg.vocab_size, cfg.width),
                                         "position_embedding": nn.Embedding(cfg.max_positions, cfg.width)})
        self.encoder, self.final_layer_norm = clip_encoder(cfg), nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """CLIP text encoder (Radford et al. 2021, Sec. 2.4): causal transformer over 77 tokens.

    forward -> (hidden, pooled). hidden is what SD cross-attends to: the last layer after the final LayerNorm (SD1, SD2),
    or the penultimate layer without it (SDXL, `cfg.penultimate`). pooled is the final-LayerNorm state at the first
    <|endoftext|>, projected if the model has a projection. `token_embeds` replaces the token-embedding lookup (before
    position embeddings are added): the entry point for textual inversion, ViCo's S*, and Subject-Diffusion's image tokens."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg, self.text_model, self.skip = cfg, CLIPTextTransformer(cfg), 1  # skip: clip skip (load_model)
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    token_embedding = property(lambda self: self.text_model.embeddings.token_embedding)

    def embed(self, input_ids, extra=None):
        """Token embeddings. Ids past the table (tokens added to the tokenizer) take rows of `extra`
        (n_added, width), e.g. an fp32 trainable parameter: the pretrained table stays untouched."""
        table, n = self.token_embedding, self.token_embedding.num_embeddings
        if extra is None:
            return table(input_ids)
        new = extra[(input_ids - n).clamp(min=0)].to(table.weight.dtype)
        return torch.where((input_ids >= n)[..., None], new, table(input_ids.clamp(max=n - 1)))

    def forward(self, input_ids, token_embeds=None):
        tm = self.text_model
        x = self.embed(input_ids) if token_embeds is None else token_embeds
        x = x + tm.embeddings.position_embedding.weight[: input_ids.shape[1]]
        states = []  # states[k]: the output of the first k layers
        for layer in tm.encoder.layers:
            states.append(x)
            x = layer(x, causal=True)
        last = tm.final_layer_norm(x)
        eot = (input_ids == CLIPTokenizer.eos_id).int().argmax(dim=-1)  # first <|endoftext|>, also with added tokens
        pooled = last[torch.arange(len(last), device=last.device), eot]
        pooled = pooled if self.text_projection is None else self.text_projection(pooled)
        # clip skip s (A1111's and kohya's count; diffusers' clip_skip is s - 1): the output of all but the last s - 1
        # layers, then the final LayerNorm; pooled stays the whole tower's
        return states[-1] if self.cfg.penultimate else last if self.skip == 1 else tm.final_layer_norm(states[1 - self.skip]), pooled


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        x = rearrange(self.patch_embedding(pixels), "b c h w -> b (h w) c")
        x = torch.cat([self.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings, self.pre_layrnorm = CLIPVisionEmbeddings(cfg), nn.LayerNorm(cfg.width)  # sic: the checkpoint's spelling
        self.encoder, self.post_layernorm = clip_encoder(cfg), nn.LayerNorm(cfg.width)


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionModel(nn.Module):
    """CLIP image encoder (ViT, Dosovitskiy et al. 2021): pixels -> (patch tokens, image embedding).

    patch tokens: the last layer's outputs without the class token, before `post_layernorm` and
    unprojected (what OpenCLIP returns with `output_tokens=True`); image embedding: post-LN class
    token through `visual_projection`. Inputs are CLIP-normalised pixels (see `preprocess`)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg, self.vision_model = cfg, CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def preprocess(self, images):
        """[-1, 1] images (b, 3, h, w) -> CLIP input: bicubic resize of the short side, centre crop."""
        s, (h, w) = self.cfg.image_size, images.shape[-2:]
        images = F.interpolate(images.float(), scale_factor=s / min(h, w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (images.shape[-2] - s) // 2, (images.shape[-1] - s) // 2
        images = (images[..., top : top + s, left : left + s] + 1) / 2
        mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        return (images - mean) / std

    def forward(self, pixels):
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        for layer in vm.encoder.layers:
            x = layer(x)
        return x[:, 1:], self.visual_projection(vm.post_layernorm(x[:, 0]))


# ---- 4. UNet (LDM's openaimodel.py, Ronneberger et al. 2015 + Ho et al. 2020 + LDM Sec. 3.3).


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, Sec. 3.5), [cos | sin] as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between (DDPM's residual block)."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """softmax(QK^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1); cross-attention to text as in LDM Sec. 3.3.

    `processor(attn, q, k, v) -> out` (all `b h n d`, q/k/v already projected) replaces the fused
    SDPA call; it is the hook methods use to read or edit attention. `name` is the module path."""

    def __init__(self, dim: int, ctx_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner, ctx_dim = heads * dim_head, ctx_dim or dim
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, inner, bias=False) for d in (dim, ctx_dim, ctx_dim))
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # Sequential only to keep the "to_out.0" key
        self.processor, self.name = None, ""  # processor: Callable | None

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        heads = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)
        q, k, v = heads(self.to_q(x)), heads(self.to_k(ctx)), heads(self.to_v(ctx))
        out = F.scaled_dot_product_attention(q, k, v) if self.processor is None else self.processor(self, q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, Eq. 6): one Linear makes both the value and the gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Sequential):  # a Sequential in a Sequential: the checkpoint's ff.net.0 / ff.net.2 keys
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(OrderedDict(net=nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; pre-LN residuals.

    Three hook slots, each `fn(block, x, ctx) -> x` or None: after_attn1 (GLIGEN-style adapters),
    after_attn2, after_block (ViCo's image cross-attention). `ctx_dim=None` makes attn2 attend
    to `dim`-wide tokens (ViCo's image block is this class with that setting)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ctx_dim: int | None = None):
        super().__init__()
        self.attn1, self.ff = Attention(dim, None, heads, dim_head), FeedForward(dim)
        self.attn2 = Attention(dim, ctx_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.after_attn1 = self.after_attn2 = self.after_block = None
        self.name = ""

    def forward(self, x, ctx=None):
        x = x + self.attn1(self.norm1(x))
        x = x if self.after_attn1 is None else self.after_attn1(self, x, ctx)
        x = x + self.attn2(self.norm2(x), ctx)
        x = x if self.after_attn2 is None else self.after_attn2(self, x, ctx)
        x = x + self.ff(self.norm3(x))
        return x if self.after_block is None else self.after_block(self, x, ctx)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual (LDM Sec. 3.3). The tokens are
    made contiguous once: as a transposed view, every LayerNorm would copy them and every residual sum keep the view."""

    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, ctx_dim: int, linear: bool, groups: int):
        super().__init__()
        inner, self.linear = heads * dim_head, linear
        self.norm, self.proj_in = nn.GroupNorm(groups, ch, eps=1e-6), nn.Linear(ch, inner) if linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(inner, heads, dim_head, ctx_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch) if linear else nn.Conv2d(inner, ch, 1)

    def forward(self, x, ctx):
        (h, w), t = x.shape[-2:], self.norm(x)
        if self.linear:  # SD2/XL project tokens, SD1 projects the map; the weights differ only in shape
            t = self.proj_in(rearrange(t, "b c h w -> b (h w) c"))
        else:
            t = rearrange(self.proj_in(t), "b c h w -> b (h w) c").contiguous()
        for block in self.transformer_blocks:
            t = block(t, ctx)
        if self.linear:
            return x + rearrange(self.proj_out(t), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(rearrange(t, "b (h w) c -> b c h w", h=h, w=w).contiguous())


class Downsample(nn.Sequential):  # key op.*
    def __init__(self, ch: int):
        super().__init__(OrderedDict(op=nn.Conv2d(ch, ch, 3, stride=2, padding=1)))


class Upsample(nn.Sequential):  # nearest x2, then a 3x3 conv (key conv.*)
    def __init__(self, ch: int):
        super().__init__(OrderedDict(up=nn.Upsample(scale_factor=2.0, mode="nearest"), conv=nn.Conv2d(ch, ch, 3, padding=1)))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also get the timestep embedding and transformers the context."""

    def forward(self, x, emb, ctx):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x, ctx) if isinstance(layer, SpatialTransformer) else layer(x)
        return x


class UNetModel(nn.Module):
    """eps_theta(x_t, t, ctx[, y]) (LDM Eq. 2): a UNet with skip connections, ResBlocks and SpatialTransformers."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg, mc, g, emb_dim = cfg, cfg.model_channels, cfg.norm_groups, 4 * cfg.model_channels
        mlp = lambda n: nn.Sequential(nn.Linear(n, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.time_embed, self.gradient_checkpointing = mlp(mc), False
        # SDXL: key label_emb.0.0 (a Sequential inside a Sequential in sgm)
        self.label_emb = nn.Sequential(mlp(cfg.adm_in_channels)) if cfg.adm_in_channels else None

        def transformer(ch, depth, ds):
            d_head = ch // cfg.num_heads if cfg.num_heads else cfg.num_head_channels
            st = SpatialTransformer(ch, ch // d_head, d_head, depth, cfg.context_dim, cfg.use_linear_in_transformer, g)
            st.ds = ds
            return st

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, g)]
                ch = mult * mc
                layers += [transformer(ch, cfg.transformer_depth[level], ds)] if ds in cfg.attention_resolutions else []
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, g), transformer(ch, cfg.transformer_depth_middle, ds), ResBlock(ch, emb_dim, ch, g))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, mult * mc, g)]
                ch = mult * mc
                layers += [transformer(ch, cfg.transformer_depth[level], ds)] if ds in cfg.attention_resolutions else []
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        for name, m in self.named_modules():
            if isinstance(m, (Attention, BasicTransformerBlock)):
                m.name = name

    def _run(self, block, h, emb, ctx):
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        return checkpoint(block, h, emb, ctx, use_reentrant=False) if checkpointed else block(h, emb, ctx)

    def forward(self, x, t, context, y=None):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x))
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UNet (SDXL) needs the vector condition y (pooled text + size/crop ids).")
            emb = emb + self.label_emb(y.to(emb.dtype))
        h, skips, context = x.to(emb.dtype), [], context.to(emb.dtype)
        for block in self.input_blocks:
            skips.append(h := self._run(block, h, emb, context))
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


# ---- 5. Hooks: the only extension surface (DESIGN.md). Always installed through `hooked`.


def attention_probs(attn: Attention, q, k):
    """The softmax SDPA never returns: (b, h, n_q, n_k), computed in fp32. Self-attention at 64x64
    is 4096^2 per head, so ask for it on cross-attention (attn2) where you can."""
    with torch.autocast(q.device.type, enabled=False):  # autocast would recast the fp32 matmul to half
        return ((q.float() * attn.scale) @ k.float().transpose(-1, -2)).softmax(dim=-1)  # scale n x d, not n x n


def attention_with_probs(attn: Attention, q, k, v):
    """(out, probs): the explicit-softmax path, for processors that read the maps."""
    p = attention_probs(attn, q, k)
    return (p @ v.float()).to(v.dtype), p


@contextlib.contextmanager
def hooked(model: nn.Module, *, processor=None, attn: str = "attn2", after_attn1=None, after_attn2=None,
           after_block=None, where: Callable[[str], bool] = lambda name: True):
    """Install hooks on every BasicTransformerBlock of `model` whose name passes `where`, and restore the previous values
    on exit, also when the body raises. With gradient checkpointing, blocks (and their hooks) run again during backward:
    keep the scope open until after backward. processor goes on the block's `attn` ("attn1", "attn2" or "both"); `where`
    gets the attention's name for processors (`...transformer_blocks.0.attn2`) and the block's for slots."""
    saved = []
    try:
        for m in (m for m in model.modules() if isinstance(m, BasicTransformerBlock)):
            if processor is not None:
                for a in (m.attn1, m.attn2) if attn == "both" else (getattr(m, attn),):
                    if where(a.name):
                        saved.append((a, "processor", a.processor))
                        a.processor = processor
            if where(m.name):
                for slot, fn in (("after_attn1", after_attn1), ("after_attn2", after_attn2), ("after_block", after_block)):
                    if fn is not None:
                        saved.append((m, slot, getattr(m, slot)))
                        setattr(m, slot, fn)
        yield model
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


class AttentionLayer(NamedTuple):
    name: str
    module: Attention
    place: str  # "down", "mid" or "up", as in Prompt-to-Prompt
    res: int  # side of the token grid for a latent of side `latent_size`


def attention_layers(unet: UNetModel, which: str = "attn2", latent_size: int = 64) -> list[AttentionLayer]:
    """The UNet's attention layers (`which`: attn2, attn1 or both), in forward order, with place and resolution at `latent_size`."""
    places = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}
    pick = lambda block: (block.attn1, block.attn2) if which == "both" else (getattr(block, which),)
    return [AttentionLayer(a.name, a, places[name.split(".")[0]], latent_size // st.ds)
            for name, st in unet.named_modules() if isinstance(st, SpatialTransformer)
            for block in st.transformer_blocks for a in pick(block)]


# ---- 6. VAE: KL-regularised autoencoder, f = 2^(len(ch_mult)-1) (LDM Sec. 3.1, App. G). LDM names.


class ResnetBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, ch, eps=1e-6), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, out_ch, eps=1e-6), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (q/k/v: 1x1 convs, as stored); contiguous, or CPU SDPA builds the matrix."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        (h, w), t = x.shape[-2:], self.norm(x)
        q, k, v = (rearrange(f(t), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=h, w=w).contiguous()
        return x + self.proj_out(out)


class VAEDownsample(nn.Sequential):  # LDM pads right/bottom only, then a valid conv (key conv.*)
    def __init__(self, ch: int):
        super().__init__(OrderedDict(pad=nn.ZeroPad2d((0, 1, 0, 1)), conv=nn.Conv2d(ch, ch, 3, stride=2)))


class VAEMid(nn.Sequential):  # keys mid.block_1, mid.attn_1, mid.block_2
    def __init__(self, ch: int, groups: int):
        super().__init__(OrderedDict(block_1=ResnetBlock(ch, ch, groups), attn_1=AttnBlock(ch, groups), block_2=ResnetBlock(ch, ch, groups)))


class VAELevel(nn.Module):
    """One resolution: `block` ResnetBlocks, then `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, chs: list[tuple[int, int]], groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.block = nn.Sequential(*(ResnetBlock(i, o, groups) for i, o in chs))
        if down or up:  # keys down.i.downsample.*, up.i.upsample.*
            setattr(self, "downsample" if down else "upsample", (VAEDownsample if down else Upsample)(chs[-1][1]))

    def forward(self, x):
        x = self.block(x)  # then the level's resampling, if it has one
        return next((getattr(self, n)(x) for n in ("downsample", "upsample") if hasattr(self, n)), x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, n, widths = cfg.norm_groups, cfg.num_res_blocks, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        ins = [cfg.ch, *widths[:-1]]
        self.down = nn.Sequential(
            *(VAELevel([(ins[i], w)] + [(w, w)] * (n - 1), g, down=i < len(widths) - 1) for i, w in enumerate(widths)))
        self.mid, self.norm_out = VAEMid(widths[-1], g), nn.GroupNorm(g, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.mid(self.down(self.conv_in(x))))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, n, widths = cfg.norm_groups, cfg.num_res_blocks, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = VAEMid(widths[-1], g)
        # up[i] works at the resolution of down[i]; the decoder runs them from the last to the first.
        outs = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(VAELevel([(outs[i], w)] + [(w, w)] * n, g, up=i > 0) for i, w in enumerate(widths))
        self.norm_out, self.conv_out = nn.GroupNorm(g, widths[0], eps=1e-6), nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)) (Kingma & Welling 2014); logvar clamped as in LDM."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    """images in [-1, 1] <-> latents (unscaled; multiply by `scale_factor` before the UNet)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg, self.scale_factor, self.encoder, self.decoder = cfg, cfg.scale_factor, Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    downsample_factor = property(lambda self: 2 ** (len(self.cfg.ch_mult) - 1))

    def encode(self, images, chunk: int = 0) -> DiagonalGaussian:  # chunk: images a pass (a latent cache's peak); 0 = all
        return DiagonalGaussian(torch.cat([self.quant_conv(self.encoder(x)) for x in images.split(chunk or len(images))]))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# ---- 7. Noise schedule and samplers, all in the DDPM variables x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
#      (samplers that live in sigma space convert on the fly).


class NoiseSchedule:
    """SD's "scaled_linear" betas: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012), in float64.
    a_0 = 0.99915, a_999 = 0.00466 (a good test constant). That last a leaves the image's coarse layout in
    x_999, which sampling from pure noise never has; the zero-terminal-SNR rescale shifts and scales
    sqrt(a) to end at 0 and keep a_0 (Lin et al. 2024, Alg. 1), so x_999 is pure noise and x0 = -v there."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        if cfg.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"unknown timestep_spacing '{cfg.timestep_spacing}'; choose leading or trailing.")
        if cfg.rescale_betas_zero_snr and cfg.prediction != "v":
            raise ValueError("a zero-terminal-SNR schedule needs v-prediction (eps says nothing about x0 at a = 0).")
        self.cfg = cfg
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        s, s0, sT = ac.sqrt(), ac[0].sqrt(), ac[-1].sqrt()
        self.alphas_cumprod = ((s - sT) * s0 / (s0 - sT)) ** 2 if cfg.rescale_betas_zero_snr else ac

    def _a(self, t, like):
        return self.alphas_cumprod.to(like.device)[torch.as_tensor(t, device=like.device).long()].float().reshape(-1, *[1] * (like.ndim - 1))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x0) (DDPM Eq. 4)."""
        a = self._a(t, x0).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, t):
        """What the network is trained to predict: eps, or v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, Sec. 4)."""
        a = self._a(t, x0).to(x0.dtype)
        return noise if self.cfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0

    def eps_x0(self, out, x_t, t):
        """Model output -> (eps, x0), for either parametrisation."""
        a, out, x_t = self._a(t, x_t), out.float(), x_t.float()
        if self.cfg.prediction == "eps":
            return out, (x_t - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * out + (1 - a).sqrt() * x_t, a.sqrt() * x_t - (1 - a).sqrt() * out

    def timesteps(self, steps: int) -> list[int]:
        """'leading' spacing + offset, as SD's scheduler configs set it: 981, 961, ..., 1 at 50 steps; or 'trailing'."""
        T, trailing = self.cfg.num_train_timesteps, self.cfg.timestep_spacing == "trailing"
        hi = T if trailing else T - self.cfg.steps_offset  # 0 divides by zero; at T, leading + offset reaches t = T
        if not 1 <= steps <= hi:  # (past the table); over T, leading spacing repeats t = 1
            raise ValueError(f"steps must be between 1 and {hi} (got {steps}).")
        return [round(T - i * T / steps) - 1 for i in range(steps)] if trailing else \
            [i * (T // steps) + self.cfg.steps_offset for i in reversed(range(steps))]


def ddim_step(x_t, eps, x0, a_t, a_prev, eta=0.0, noise=None):
    """One DDIM update (Song et al. 2021, arXiv:2010.02502, Eq. 12); eta = 1 is DDPM-like."""
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # Eq. 16
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps  # "direction pointing to x_t"
    return x_prev + sigma * noise if eta > 0 else x_prev


def ddpm_step(x_t, eps, x0, a_t, a_prev, noise=None):
    """Ancestral step from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, Eqs. 6-7), fixed small variance."""
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * x_t
    var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return mean + var**0.5 * noise if noise is not None else mean


def euler_step(x_t, eps, x0, a_t, a_prev):
    """Euler step of the probability-flow ODE in sigma space, x/sqrt(a) = x0 + sigma eps
    (Karras et al. 2022, Alg. 2 without churn): d(x/sqrt(a))/d(sigma) = eps, taken as (x/sqrt(a) - x0) / sigma
    as diffusers does: on a zero-SNR schedule (a_999 held at 2^-24, sigma 4096) the model's eps alone drops x0."""
    sigma, sigma_prev, x = ((1 - a_t) / a_t) ** 0.5, ((1 - a_prev) / a_prev) ** 0.5, x_t / a_t**0.5
    return (x + (sigma_prev - sigma) * (x - x0) / sigma) * a_prev**0.5


def dpmpp_2m_step(x_t, x0, x0_last, a_t, a_prev, a_last):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2, midpoint form as in diffusers).
    lambda = log(alpha/sigma); first order when there is no previous x0 (or at the final step)."""
    lam = lambda a: 0.5 * math.log(a) - 0.5 * math.log(1 - a) if a < 1 else math.inf
    alpha_prev, sigma_prev, sigma_t = a_prev**0.5, (1 - a_prev) ** 0.5, (1 - a_t) ** 0.5
    h = lam(a_prev) - lam(a_t)
    phi = -math.expm1(-h)  # 1 - e^{-h}
    r = None if x0_last is None else (lam(a_t) - lam(a_last)) / h
    d = x0 if x0_last is None else x0 + 0.5 / r * (x0 - x0_last)
    return (sigma_prev / sigma_t) * x_t + alpha_prev * phi * d


SAMPLERS = ("ddim", "ddpm", "euler", "dpmpp_2m")


def sample_loop(model_fn, x, schedule: NoiseSchedule, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
                generator=None, timesteps: list[int] | None = None, progress: bool = True, callback=None):
    """Run a sampler from x = x_T. `model_fn(x, t, i)` returns the network output at step i (guidance included);
    `callback(i, t, x, x0)` sees every step; `generator` may be a function x -> noise shaped like x. `eta` is DDIM's
    (Eq. 16): ddpm is always stochastic and euler and dpmpp_2m never, so they ignore it (a flag given for them is refused)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    ts = schedule.timesteps(steps) if timesteps is None else list(timesteps)
    ac = schedule.alphas_cumprod.clamp(min=2**-24).tolist()  # a zero-SNR a_999 = 0 as diffusers: finite sigma
    # DDIM's last step lands on a_0 (SD's set_alpha_to_one=False); the others end at a = 1 (x0 itself).
    final = ac[0] if sampler == "ddim" else 1.0
    x, x0_last, a_last = x.float(), None, None
    draw = generator if callable(generator) else lambda x: torch.randn(x.shape, generator=generator, device=x.device)
    for i, t in enumerate(tqdm(ts, desc=sampler, disable=not progress)):
        eps, x0 = schedule.eps_x0(model_fn(x, t, i), x, t)
        a_t, a_prev = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else final)
        if sampler == "ddim":
            x_new = ddim_step(x, eps, x0, a_t, a_prev, eta, draw(x) if eta > 0 else None)
        elif sampler == "ddpm":
            x_new = ddpm_step(x, eps, x0, a_t, a_prev, draw(x) if i + 1 < len(ts) else None)
        elif sampler == "euler":
            x_new = euler_step(x, eps, x0, a_t, a_prev)
        else:
            last = i + 1 == len(ts) and a_prev == 1.0
            x_new = dpmpp_2m_step(x, x0, None if last else x0_last, a_t, a_prev, a_last)
            x0_last, a_last = x0, a_t
        callback(i, t, x_new, x0) if callback is not None else None
        x = x_new
    return x


# ---- 8. StableDiffusion: load, encode prompts and images, sample.


class Cond(NamedTuple):
    context: torch.Tensor  # (b, 77, context_dim): what attn2 attends to
    y: torch.Tensor | None = None  # (b, adm_in_channels): SDXL only


class StableDiffusion(nn.Module):
    """The whole text-to-image model: `unet`, `vae`, `text_encoder` (+ `text_encoder_2` on SDXL), `tokenizer`."""

    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.cfg, self.tokenizer, self.schedule = cfg, CLIPTokenizer(), NoiseSchedule(cfg.schedule)
        self.unet, self.vae, self.text_encoder = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextModel(cfg.text)
        self.text_encoder_2 = CLIPTextModel(cfg.text2) if cfg.text2 else None

    device = property(lambda self: self.unet.out[2].weight.device)
    # Image sides must be multiples of this: the VAE's factor times the UNet's halvings, or its skips cannot concatenate.
    size_multiple = property(lambda self: self.vae.downsample_factor * 2 ** (len(self.cfg.unet.channel_mult) - 1))

    @classmethod
    def from_pretrained(cls, path=None, device="cpu", dtype=torch.float32, vae_dtype=None, variant=None) -> "StableDiffusion":
        """A folder written by weights_convert.py, a diffusers folder, or an original single file; no path: the toy
        model. SDXL's VAE overflows in fp16 (NaN, black images): without a `vae_dtype` it stays fp32 (`force_upcast`)."""
        import weights_convert

        if path is None and not (TOY_MODEL_PATH / "config.json").exists():
            raise FileNotFoundError(f"no --pretrained-model given and the toy model is missing from {TOY_MODEL_PATH}; "
                                    "train it with `python toy_world.py pretrain` or pass a model.")
        path = Path(path) if path is not None else TOY_MODEL_PATH
        cfg, parts = weights_convert.load_any(path, variant=variant)
        with torch.device("meta"):
            model = cls(cfg)
        for name, sd in parts.items():
            weights_convert.check_keys(getattr(model, name).state_dict(), sd, what=f"{name} of {path}")
            getattr(model, name).load_state_dict(sd, strict=True, assign=True)
        model.schedule = NoiseSchedule(cfg.schedule)
        model.to(device=device, dtype=dtype).vae.to(vae_dtype or (torch.float32 if cfg.text2 and dtype == torch.float16 else dtype))
        return model.eval().requires_grad_(False)

    @staticmethod
    def load_image_encoder(path=None, device="cpu", dtype=torch.float32) -> CLIPVisionModel:
        """The CLIP image tower of a converted folder (stored beside a model, or alone by
        `weights_convert.py --clip-vision`); no path: the toy CLIP's."""
        path = Path(path) if path is not None else TOY_MODEL_PATH
        cfg = json.loads((path / "config.json").read_text()).get("image_encoder") if (path / "config.json").exists() else None
        if cfg is None:
            raise FileNotFoundError(f"'{path}' holds no CLIP image tower (no image_encoder in config.json).")
        model = CLIPVisionModel(CLIPVisionConfig(**cfg))
        model.load_state_dict(load_file(str(path / "image_encoder.safetensors")), strict=True)
        return model.to(device, dtype).eval().requires_grad_(False)

    def tokenize(self, prompts, second: bool = False):
        return self.tokenizer(prompts, pad_id=(self.cfg.text2 if second else self.cfg.text).pad_id).to(self.device)

    def encode_prompt(self, prompts, size: tuple[int, int] | None = None, extra=(None, None)) -> Cond:
        """Exactly what the UNet receives for these prompts. `extra` holds the embedding rows of tokens
        added to the tokenizer, per encoder (see CLIPTextModel.embed). SDXL: both encoders' hidden
        states side by side, and y = [pooled text of encoder 2, embeddings of (orig h, w, crop top,
        left, target h, w)] (Podell et al. 2023, Sec. 2.2), no cropping, original size = target size."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenize(prompts)
        context, _ = self.text_encoder(ids, self.text_encoder.embed(ids, extra[0]))
        if self.text_encoder_2 is None:
            return Cond(context)
        ids2 = self.tokenize(prompts, second=True)
        ctx2, pooled = self.text_encoder_2(ids2, self.text_encoder_2.embed(ids2, extra[1]))
        h, w = size or (self.cfg.image_size, self.cfg.image_size)
        ids6 = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=torch.float32).repeat(len(prompts))
        per_id = (self.cfg.unet.adm_in_channels - pooled.shape[-1]) // 6  # 256 on SDXL
        size_emb = rearrange(timestep_embedding(ids6, per_id), "(b k) d -> b (k d)", b=len(prompts))
        return Cond(torch.cat([context, ctx2], dim=-1), torch.cat([pooled, size_emb.to(pooled.dtype)], dim=-1))

    def uncond(self, negative_prompts, size=None) -> Cond:
        """The unconditional (or negative) condition. SDXL uses zeros for an empty negative prompt
        (its pipelines' `force_zeros_for_empty_prompt`); SD1/SD2 encode ""."""
        c = self.encode_prompt(negative_prompts, size)
        if self.text_encoder_2 is not None and all(p == "" for p in negative_prompts):
            pooled = self.cfg.text2.projection_dim
            return Cond(torch.zeros_like(c.context), torch.cat([torch.zeros_like(c.y[:, :pooled]), c.y[:, pooled:]], -1))
        return c

    @torch.no_grad()
    def encode_images(self, images, generator=None, sample: bool = True):
        """[-1, 1] images -> scaled latents, a posterior sample as LDM trains on (or its mean)."""
        dist = self.vae.encode(images.to(self.vae.quant_conv.weight.dtype))
        return ((dist.sample(generator) if sample else dist.mean) * self.vae.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, z):
        """Scaled latents -> images in [-1, 1]."""
        return self.vae.decode((z / self.vae.scale_factor).to(self.vae.quant_conv.weight.dtype)).float().clamp(-1, 1)

    def cfg_model_fn(self, cond: Cond, uncond: Cond | None, guidance_scale: float):
        """model_fn for `sample_loop` with classifier-free guidance (Ho & Salimans 2022, Eq. 6 with
        w = s - 1: out = out_u + s (out_c - out_u))."""
        def fn(x, t, i):
            if uncond is None or guidance_scale == 1.0:
                return self.unet(x, t, cond.context, cond.y)
            y = None if cond.y is None else torch.cat([uncond.y, cond.y])
            out_u, out_c = self.unet(torch.cat([x, x]), t, torch.cat([uncond.context, cond.context]), y).chunk(2)
            return out_u + guidance_scale * (out_c - out_u)
        return fn

    @torch.no_grad()
    def sample(self, prompts, negative_prompt: str | list[str] = "", steps: int = 50, guidance_scale: float = 7.5,
               sampler: str = "ddim", eta: float = 0.0, height: int | None = None, width: int | None = None,
               generator=None, latents=None, progress: bool = True):
        """Text -> images in [-1, 1], (b, 3, h, w)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        h, w, f = height or self.cfg.image_size, width or self.cfg.image_size, self.vae.downsample_factor
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"height and width must be multiples of {self.size_multiple} for this model (got {h}x{w}).")
        cond = self.encode_prompt(prompts, (h, w))
        uncond = self.uncond(negative, (h, w)) if guidance_scale != 1.0 else None
        if latents is None:
            shape = (len(prompts), self.cfg.unet.in_channels, h // f, w // f)
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(self.device)
        z = sample_loop(self.cfg_model_fn(cond, uncond, guidance_scale), latents, self.schedule, steps, sampler, eta,
                        generator, progress=progress)
        return self.decode_latents(z)


# ---- 9. Utilities shared by the method files: images, safetensors, precision.

def load_image(path, exif: bool = True) -> Image.Image:
    """Any readable image as 8-bit RGB: grayscale, palette, 16-bit and RGBA (on white) are converted; a photo's EXIF
    orientation is applied (as a viewer shows it; exif=False: the stored pixels, which a label map may index)."""
    try:
        img = ImageOps.exif_transpose(Image.open(path)) if exif else Image.open(path)
        if img.mode.startswith("I"):  # 16/32-bit integers: scale to 8 bits instead of clipping
            a = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((a / (65535 if img.mode.startswith("I;16") else max(1, a.max())) * 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.split()[-1])
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL's ways of saying "not an image it can decode" (a folder too)
        raise (e if isinstance(e, FileNotFoundError) else ValueError(f"'{path}' is not a readable image ({e}).")) from None


def load_image_folder(folder) -> list[tuple[str, "Image.Image"]]:
    """(file name, RGB image) for every readable image in `folder`, sorted; others are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist or is not a directory.")
    out = []
    for p in sorted(p for p in folder.iterdir() if not p.is_dir() and not p.name.startswith(".")):
        try:
            out.append((p.name, load_image(p)))
        except Exception as e:  # PIL raises several kinds; all mean "not an image we can read"
            warnings.warn(f"skipping '{p.name}': not a readable image ({type(e).__name__}).", stacklevel=2)
    if not out:
        raise ValueError(f"no readable images in '{folder}'; put .png/.jpg files there.")
    return out


def image_to_tensor(img, size: int | tuple[int, int] | None = None):
    """PIL RGB -> (3, h, w) in [-1, 1]; `size` resizes with bicubic filtering (squashing, as LDM does)."""
    img = img if size is None else img.resize((size, size) if isinstance(size, int) else (size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def tensor_to_images(x) -> list:
    """(b, 3, h, w) in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()]


def image_grid(images: list, cols: int | None = None):
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows, (w, h) = math.ceil(len(images) / cols), images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, then rename: a crash never leaves a half-written file."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.umask(umask := os.umask(0))
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; give it a normal file's mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Atomic safetensors write; metadata values become strings (non-strings as JSON)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def save_embeddings(path, embeds: dict, fmt: str = "diffusers", metadata: dict | None = None) -> None:
    """Learned token embeddings in the formats other tools read: "diffusers" {token: (n, d)} (SDXL:
    {"clip_l": ..., "clip_g": ...}, as DCO writes), or "a1111" {"emb_params": (n, d)} (same SDXL keys)."""
    embeds = {"emb_params": next(iter(embeds.values()))} if fmt == "a1111" and len(embeds) == 1 else embeds
    save_safetensors({k: v.float() for k, v in embeds.items()}, path, {"format": fmt, **(metadata or {})})


def load_embeddings(path) -> dict:
    """{name: (n, d)} from a diffusers .safetensors/.bin, an A1111 .safetensors (emb_params) or .pt (string_to_param)."""
    d = load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    d = d.get("string_to_param", d)
    return {k: (v[None] if v.ndim == 1 else v).float() for k, v in d.items() if torch.is_tensor(v)}


def save_image(img, path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format=Path(path).suffix[1:].upper().replace("JPG", "JPEG")))


DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_output_dir(path, overwrite: bool, create: bool = True) -> Path:
    path = Path(path)  # create=False: only the check, so a later bad input leaves no empty folder behind
    if path.exists() and (not path.is_dir() or any(path.iterdir()) and not overwrite):
        raise FileExistsError(f"output directory '{path}' " + ("is a file; choose another." if not path.is_dir() else
                              "exists and is not empty; pass --overwrite or choose another."))
    path.mkdir(parents=True, exist_ok=True) if create else None
    return path


# ---- 9b. Training: the flags, checkpoints and loop every method shares (diffusers-script conventions).


RUN_FILES = ("log.jsonl", "args.json", "validation")  # what a run writes as it goes, besides its checkpoint-N folders


def start_run(out, args, resume_from, act: bool = True, keep: tuple = ()) -> None:
    """The output folder of a run that resumes nothing (act=False: only the check, before anything loads). An earlier
    run's files there need --overwrite, which removes them (a later --resume latest would take its checkpoints), or
    are all it holds under --resume latest (that run stopped before its first checkpoint: it starts over). `keep`:
    files of a run that stay valid (a cache that checks itself)."""
    entries = [p for p in Path(out).iterdir() if p.name not in keep] if resume_from is None and Path(out).is_dir() else []
    old = [p for p in entries if p.name in RUN_FILES or p.name.startswith("checkpoint-") and p.name[len("checkpoint-"):].isdigit()]
    if entries and not args.overwrite and (not args.resume or len(old) < len(entries)):
        raise FileExistsError(f"--resume {args.resume}: '{out}' holds no checkpoint but other files; pass --overwrite to "
                              "start over there, or choose another --output-dir." if args.resume else
                              f"output directory '{out}' exists and is not empty; pass --overwrite or choose another.")
    for p in old if act else ():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(f"{out}: starting over; removed {len(old)} file(s) and folder(s) of the earlier run.", file=sys.stderr) if act and old else None


def trim_log(out, step: int) -> None:
    """On resume: the log lines past the checkpoint's step (written before the run stopped) go; each step is logged once."""
    def upto(line):
        with contextlib.suppress(ValueError, AttributeError):  # a line cut by the stop is dropped too
            return json.loads(line).get("step", 0) <= step
    if (log := Path(out) / "log.jsonl").is_file():
        keep = [line for line in log.read_text().splitlines(keepends=True) if upto(line)]
        atomic_write(log, lambda tmp: Path(tmp).write_text("".join(keep)))


@dataclass
class TrainArgs:
    """The project's standard training flags; a method's own config subclasses this, and
    `parse_args` turns every field into a dashed flag (`max_train_steps` -> --max-train-steps)."""

    pretrained_model: str = ""  # converted dir, diffusers dir or single file; "" = the toy model
    variant: str = ""  # SD 2.x single files, which do not say what they predict: sd21 (v, 768 px) or sd21-base (eps)
    vae: str = ""  # another VAE of the same shape (diffusers folder or single file, e.g. SDXL's fp16-fix); "" = the model's
    clip_skip: int = 1  # SD 1.x/2.x: condition on the text encoder's layer -N (A1111/kohya; 2 for NovelAI-style models)
    output_dir: str = "outputs/run"
    resolution: int = 0  # 0 = the model's native size
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 400
    learning_rate: float = 1e-4
    scale_lr: bool = False  # multiply learning rates by batch x accumulation (the method decides which groups)
    lr_scheduler: str = "constant"  # constant | linear | cosine (after lr_warmup_steps of linear warm-up)
    lr_warmup_steps: int = 0
    max_grad_norm: float = 0.0  # 0 = no clipping
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16: frozen weights in half precision, trainables in fp32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet: minutes to compile, then faster steps (GPU)
    channels_last: bool = False  # the UNet in channels-last memory format (GPU convolutions; slower on CPU)
    checkpointing_steps: int = 50
    checkpoints_total_limit: int = 0  # 0 = keep every checkpoint
    resume: str = ""  # "latest" or a checkpoint directory
    validation_prompt: str = ""
    validation_steps: int = 50
    num_validation_images: int = 4
    device: str = ""  # "" = cuda when available
    overwrite: bool = False


# Rules of the shared flags, checked by parse_args (a class adds its own `minima` and `choices`) and load_checkpoint: floors
# (below them a run fails steps later in a traceback, or ascends the loss), choices, and what a resume may change.
FLAG_MINIMA = {"train_batch_size": 1, "gradient_accumulation_steps": 1, "max_train_steps": 1, "validation_steps": 1, "steps": 1,
               "num_validation_images": 1, "batch_size": 1, "clip_skip": 1, **dict.fromkeys(["learning_rate", "lr_warmup_steps", "seed", "eta",
               "checkpointing_steps", "checkpoints_total_limit", "max_grad_norm", "resolution", "height", "width"], 0)}
FLAG_CHOICES = {"lr_scheduler": ("constant", "linear", "cosine"), "mixed_precision": ("no", "fp16", "bf16"), "sampler": SAMPLERS,
                "precision": ("fp32", "fp16", "bf16"), "vae_precision": ("fp32", "fp16", "bf16")}
RESUME_FREE = {"resume", "overwrite", "output_dir", "device", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
               "validation_prompt", "validation_steps", "num_validation_images", "compile", "channels_last",
               "gradient_checkpointing", "num_workers", "threads", "validation_subject", "validation_entity"}


def parse_args(cls, argv=None, parser: argparse.ArgumentParser | None = None):
    """Dataclass fields -> dashed argparse flags with the same defaults (bools get --x / --no-x), also spelt with
    underscores and as diffusers or kohya spell them (a class adds its own: `aliases`). --config FILE.json sets
    defaults by field name (a run's args.json works; keys naming no flag are reported and skipped); the command line wins."""
    parser, names, choices = parser or argparse.ArgumentParser(), {f.name for f in fields(cls)}, {**FLAG_CHOICES, **getattr(cls, "choices", {})}
    parser.add_argument("--config", default="", help="a JSON file of flags by field name (e.g. a run's args.json)")
    aliases = {"pretrained_model": ["pretrained_model_name_or_path"], "resume": ["resume_from_checkpoint"], "checkpointing_steps": ["save_every_n_steps"],
               "images": ["instance_data_dir", "train_data_dir"], **getattr(cls, "aliases", {})}  # USERS.md 2c; a method's own
    for f, typ in ((f, typing.get_type_hints(cls)[f.name]) for f in fields(cls)):
        flags = list(dict.fromkeys("--" + n for n in [f.name.replace("_", "-"), f.name, *aliases.get(f.name, [])]))
        default = f.default_factory() if f.default is MISSING else f.default
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # "int | None" -> int
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        nargs = "+" if typing.get_origin(typ) in (list, tuple) else None
        kind = ({"action": argparse.BooleanOptionalAction} if typ is bool else
                {"type": typing.get_args(typ)[0] if nargs else typ, "nargs": nargs, "choices": choices.get(f.name)})
        parser.add_argument(flags[0], dest=f.name, default=default, **kind)  # the other spellings work but stay out of --help
        parser.add_argument(*flags[1:], dest=f.name, default=default, help=argparse.SUPPRESS, **kind) if flags[1:] else None
    if config := parser.parse_known_args(argv)[0].config:
        try:
            given = {k.replace("-", "_"): v for k, v in json.loads(Path(config).read_text()).items()}
        except (OSError, ValueError, AttributeError) as e:
            parser.error(f"--config '{config}' is not a readable JSON object of flags ({e}).")
        if skipped := sorted(set(given) - names):
            print(f"--config {config}: skipped keys that are no flag of this command: {', '.join(skipped)}", file=sys.stderr)
        parser.set_defaults(**{k: v for k, v in given.items() if k in names})
    args = cls(**{f.name: getattr(parser.parse_args(argv), f.name) for f in fields(cls)})
    for k, lo in {**FLAG_MINIMA, **getattr(cls, "minima", {})}.items():
        if k in names and (v := getattr(args, k)) is not None and min(v if isinstance(v, list) else [v], default=lo) < lo:
            parser.error(f"--{k.replace('_', '-')} must be at least {lo} (got {v}).")
    if "eta" in names and args.eta != cls.eta and getattr(args, "sampler", "ddim") != "ddim":  # a method's default stays
        parser.error(f"--eta applies to the DDIM sampler only, not {args.sampler}; use --sampler ddim or leave --eta out.")
    return args


def save_checkpoint(folder, step: int, tensors: dict, optimizer, scheduler=None, generator=None, scaler=None, args=None) -> None:
    """Everything `--resume` needs to continue bit for bit: trainable tensors, optimizer and LR schedule state, the
    gradient scaler, the data/noise generator, the global RNGs, and the run's settings (`args`) to check a resume by."""
    state, osd = {f"param.{k}": v for k, v in tensors.items()} | {"rng.torch": torch.get_rng_state()}, optimizer.state_dict()
    state.update({f"optim.{i}.{name}": torch.as_tensor(v) for i, st in osd["state"].items() for name, v in st.items()})
    state.update({"rng.generator": generator.get_state()} if generator is not None else {})
    state.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())} if torch.cuda.is_available() else {})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"step": step, "param_groups": osd["param_groups"], "numpy": [kind, pos, has_gauss, gauss],
            "random": random.getstate(), "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None, "args": _settings(args)}
    save_safetensors(state, Path(folder) / "training_state.safetensors", {k: json.dumps(v, default=lambda o: None) for k, v in meta.items()})


def weights_digest(path) -> str:
    """What a resume knows --pretrained-model and --vae by: a moved folder resumes, other weights of the same shapes do not."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"))
    return _digest(tuple((str(f), str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)  # each file's name, size and 64 KiB at 64 even places (a single file's VAE too), read once
def _digest(files: tuple) -> str:  # while its size and mtime stay (every checkpoint asks)
    h = hashlib.sha256()
    for path, name, size, _ in files:
        with open(path, "rb") as fh:
            h.update(f"{name}:{size}".encode())
            for i in range(64):
                fh.seek(i * max(0, size - 2**16) // 63)
                h.update(fh.read(2**16))
    return "weights " + h.hexdigest()[:16]


def _settings(args) -> dict | None:  # paths (files that exist, alone or in a list) are left out, as folders move; the weights
    is_path = lambda v: any(isinstance(x, str) and x and Path(x).exists() for x in (v if isinstance(v, list) else [v]))
    model = lambda k, v: k in ("pretrained_model", "vae") and is_path(v)  # of --pretrained-model and --vae by content
    return None if args is None else json.loads(json.dumps({k: weights_digest(v) if model(k, v) else v for k, v in asdict(args).items()
                                                            if k not in RESUME_FREE and (model(k, v) or not is_path(v))}))


def load_checkpoint(folder, tensors: dict, optimizer, scheduler=None, generator=None, scaler=None, args=None) -> int:
    """Restore what `save_checkpoint` wrote (tensors in place); returns the step to continue from. One sentence, loading
    nothing, for a checkpoint of other settings (tensor names or shapes: copy_ would broadcast; or `args` outside
    RESUME_FREE: the optimizer state would keep the old learning rate silently) or past `args.max_train_steps`."""
    path = Path(folder) / "training_state.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no training checkpoint in '{folder}' (training_state.safetensors is missing).")
    state, meta = load_file(str(path)), {k: json.loads(v) for k, v in safe_open(str(path), "pt").metadata().items()}
    saved, here = {k[6:]: tuple(v.shape) for k, v in state.items() if k.startswith("param.")}, {k: tuple(v.shape) for k, v in tensors.items()}
    for k, now in (_settings(args).items() if meta.get("args") and args is not None else ()):  # paths: skipped on either side
        if k in meta["args"] and (meta["args"][k] or not str(now).startswith("weights ")):  # (older checkpoints: no digest)
            saved["--" + k.replace("_", "-")], here["--" + k.replace("_", "-")] = meta["args"][k], now
    if bad := next((k for k in sorted(saved.keys() | here.keys()) if saved.get(k) != here.get(k)), None):
        raise ValueError(f"'{folder}' was trained with other settings ({bad}: {saved.get(bad, 'absent')} there, {here.get(bad, 'absent')} "
                         "here); resume with its settings (its args.json), or use a new --output-dir.")
    if args is not None and meta["step"] > args.max_train_steps:
        raise ValueError(f"'{folder}' is at step {meta['step']}, past --max-train-steps {args.max_train_steps}; raise it to go on.")
    with torch.no_grad():
        for k, v in tensors.items():
            v.copy_(state[f"param.{k}"])
    osd = {"state": {}, "param_groups": meta["param_groups"]}
    for (_, i, name), v in ((k.split(".", 2), v) for k, v in state.items() if k.startswith("optim.")):
        osd["state"].setdefault(int(i), {})[name] = v
    optimizer.load_state_dict(osd)
    for obj, key in ((scheduler, "scheduler"), (scaler, "scaler")):
        obj.load_state_dict(meta[key]) if obj is not None and meta[key] else None
    torch.set_rng_state(state["rng.torch"])
    generator.set_state(state["rng.generator"]) if generator is not None else None
    torch.cuda.set_rng_state_all([state[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())]) if torch.cuda.is_available() and "rng.cuda.0" in state else None
    np.random.set_state((meta["numpy"][0], state["rng.numpy"].numpy().astype(np.uint32), *meta["numpy"][1:]))
    random.setstate((meta["random"][0], tuple(meta["random"][1]), meta["random"][2]))
    return int(meta["step"])


def find_checkpoint(output_dir, resume: str) -> Path | None:
    """--resume latest -> the newest complete checkpoint-N in output_dir (its training state is written last)."""
    found = sorted((p for p in Path(output_dir).glob("checkpoint-*") if (p / "training_state.safetensors").exists()), key=lambda p: int(p.name.split("-")[1]))
    return None if not resume else Path(resume) if resume != "latest" else (found[-1] if found else None)


def lr_lambda(args: TrainArgs):
    def f(step):
        if step < args.lr_warmup_steps:
            return (step + 1) / args.lr_warmup_steps
        frac = (step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[args.lr_scheduler]
    return f


def train_loop(args: TrainArgs, optimizer, tensors: dict, loss_fn, save_fn, generator, validate_fn=None, after_step=None,
               device="cpu", metadata: dict | None = None) -> Path:
    """The loop every method shares: gradient accumulation, mixed precision (fp16 with a gradient scaler, bf16
    without), clipping, LR schedule, a progress bar with the loss, JSONL logs, validation grids, checkpoints every
    `checkpointing_steps` and exact `--resume`. loss_fn(generator) -> (loss, logs) for one micro-batch, drawing all
    randomness from `generator`; save_fn(folder) writes the method's outputs; after_step() runs after each optimizer
    step (e.g. renormalising token rows); validate_fn() -> PIL images. `tensors`: the trainables to checkpoint."""
    out, resume_from = Path(args.output_dir), find_checkpoint(Path(args.output_dir), args.resume)
    start_run(out, args, resume_from)
    out.mkdir(parents=True, exist_ok=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=args.mixed_precision == "fp16")
    step = load_checkpoint(resume_from, tensors, optimizer, scheduler, generator, scaler, args) if resume_from else 0
    trim_log(out, step) if resume_from else None
    atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(json.dumps({**asdict(args), **(metadata or {})}, indent=1)))
    print("config: " + json.dumps(asdict(args)) + (f"\nresumed from {resume_from} at step {step}" if resume_from else ""), file=sys.stderr)
    amp = torch.autocast(torch.device(device).type, DTYPES[args.mixed_precision], enabled=args.mixed_precision != "no")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar, last_good = tqdm(range(step, args.max_train_steps), desc="train", initial=step, total=args.max_train_steps), resume_from
    for step in bar:
        mean = {}  # the logs of a step: means over its micro-batches, as the loss it optimised is
        for _ in range(args.gradient_accumulation_steps):
            with amp:
                loss, logs = loss_fn(generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}; the last good checkpoint is "
                                         f"{last_good or 'none'}. Try --mixed-precision bf16 or no, or a lower learning rate.")
            scaler.scale(loss / args.gradient_accumulation_steps).backward()
            for k, v in {"loss": loss.item(), **logs}.items():
                mean[k] = mean.get(k, 0.0) + v / args.gradient_accumulation_steps if isinstance(v, (int, float)) else v
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(optimizer)
        scaler.update()
        if not scaler.is_enabled() or scaler.get_scale() >= scale:  # fp16: a step skipped for inf/NaN gradients
            scheduler.step()  # leaves the LR schedule where it was (accelerate's rule; no PyTorch warning)
        optimizer.zero_grad(set_to_none=True)
        after_step() if after_step is not None else None
        logs = {"step": step + 1, "loss": mean.pop("loss"), "lr": scheduler.get_last_lr()[0], **mean}
        logs.update({"grad_scale": scaler.get_scale(), "step_skipped": scaler.get_scale() < scale} if scaler.is_enabled() else {})
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(logs) + "\n")
        done = step + 1 == args.max_train_steps
        if args.checkpointing_steps and ((step + 1) % args.checkpointing_steps == 0 or done):
            save_fn(ckpt := out / f"checkpoint-{step + 1}")
            save_checkpoint(last_good := ckpt, step + 1, tensors, optimizer, scheduler, generator, scaler, args)
            old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for p in old[: -args.checkpoints_total_limit] if args.checkpoints_total_limit else []:
                shutil.rmtree(p)
        if validate_fn is not None and args.validation_prompt and ((step + 1) % args.validation_steps == 0 or done):
            save_image(image_grid(validate_fn()), out / "validation" / f"step-{step + 1:06d}.png")
    save_fn(out)
    return out


# ---- 10. Sampling flags shared by every command, and `python sd_model.py sample --prompt "..."`.


@dataclass
class SampleArgs:
    prompt: str = ""
    negative_prompt: str = ""
    output_dir: str = "outputs/samples"
    pretrained_model: str = ""  # converted dir, diffusers dir or single file; "" = the toy model
    variant: str = ""  # SD 2.x single files: sd21 (v) or sd21-base (eps)
    vae: str = ""  # another VAE of the same shape (diffusers folder or single file, e.g. SDXL's fp16-fix); "" = the model's
    clip_skip: int = 1  # SD 1.x/2.x: condition on the text encoder's layer -N (A1111/kohya; 2 for NovelAI-style models)
    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"  # ddim | ddpm | euler | dpmpp_2m
    eta: float = 0.0
    height: int = 0  # 0 = the model's native size
    width: int = 0
    batch_size: int = 1
    precision: str = "fp32"  # fp32 | fp16 | bf16
    vae_precision: str = ""  # "" = --precision (SDXL at fp16: fp32, its VAE overflows); fp32 avoids NaN/black images
    compile: bool = False  # torch.compile the UNet: minutes to compile, then faster steps (GPU)
    channels_last: bool = False  # the UNet in channels-last memory format (GPU convolutions; slower on CPU)
    device: str = ""  # "" = cuda when available
    overwrite: bool = False


def pick_device(device: str = "") -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():  # torch's own answer is an AssertionError traceback
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU; leave --device out to run on the CPU.")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str = "", precision: str = "fp32", vae_precision: str = "", device: str = "", variant: str = "",
               compile: bool = False, channels_last: bool = False, vae: str = "", clip_skip: int = 1) -> StableDiffusion:
    """from_pretrained with the command-line conventions: "" = the toy model, precision names, --vae, --clip-skip, the UNet's
    speed switches (in-place compilation keeps the state-dict keys and traces hooks on the first call)."""
    import weights_convert
    if precision not in DTYPES or (vae_precision or precision) not in DTYPES:
        raise ValueError(f"unknown precision '{precision}/{vae_precision}'; use fp32, fp16 or bf16.")
    if vae and not Path(vae).exists():  # before the model loads, and naming the flag
        raise FileNotFoundError(f"--vae '{vae}' does not exist.")
    model = StableDiffusion.from_pretrained(path or None, pick_device(device), DTYPES[precision],
                                            DTYPES[vae_precision] if vae_precision else None, variant or None)
    model.vae.load_state_dict(weights_convert.load_vae(vae, model.vae)) if vae else None  # copied in: keeps dtype and device
    if clip_skip != 1 and (model.text_encoder_2 is not None or clip_skip > model.cfg.text.layers):  # kohya ignores it on SDXL
        raise ValueError(f"--clip-skip {clip_skip}: " + ("SDXL already conditions on its text towers' penultimate layers; leave it at 1." if
                         model.text_encoder_2 is not None else f"this text encoder has {model.cfg.text.layers} layers."))
    model.text_encoder.skip = clip_skip
    model.unet.to(memory_format=torch.channels_last) if channels_last else None
    model.unet.compile() if compile else None
    return model


@dataclass
class _SampleCLI(SampleArgs):
    random_tiny: bool = False  # an untrained tiny model built on the spot (its images are noise)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sys.exit("usage: python sd_model.py sample --prompt TEXT --output-dir DIR [options]; see --help") if argv[:1] != ["sample"] else None
    args = parse_args(_SampleCLI, argv[1:], argparse.ArgumentParser(prog="sd_model.py sample", description="text -> images"))
    try:
        device, out = pick_device(args.device), prepare_output_dir(args.output_dir, args.overwrite, create=False)  # save_image makes it
        if args.random_tiny or (not args.pretrained_model and not (TOY_MODEL_PATH / "config.json").exists()):
            print("note: a tiny Stable Diffusion with random weights, built on the spot (its images are noise).", file=sys.stderr)
            torch.manual_seed(args.seed)
            model = StableDiffusion(TINY).eval().requires_grad_(False).to(device)
        else:
            model = load_model(args.pretrained_model, args.precision, args.vae_precision, device, args.variant,
                               args.compile, args.channels_last, args.vae, args.clip_skip)
        images = model.sample([args.prompt] * args.batch_size, args.negative_prompt, args.steps, args.guidance_scale,
                              args.sampler, args.eta, args.height or None, args.width or None,
                              torch.Generator(device).manual_seed(args.seed))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    for i, img in enumerate(tensor_to_images(images)):
        save_image(img, out / f"{args.seed:04d}_{i:02d}.png")
    print(f"wrote {len(images)} image(s) to {out}")


if __name__ == "__main__":
    main()
