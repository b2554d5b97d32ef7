"""Convert the Stable Diffusion and CLIP checkpoints people have into this project's layout, and back.

    python weights_convert.py SRC DST [--variant sd21] [--ema] [--dtype fp16] [--vae VAE] [--zero-terminal-snr] [--overwrite]
    python weights_convert.py DIR OUT.safetensors --to ldm

SRC is an original single file (CompVis/Stability `.ckpt` or `.safetensors`, SD 1.x / 2.x / XL,
with or without a `state_dict` wrapper), a diffusers pipeline folder, one of our converted
directories, or a CLIP vision model (a Hugging Face folder or an OpenCLIP file). DST is a
directory: `config.json` + one safetensors file per part (`unet`, `vae`, `text_encoder`,
`text_encoder_2`, `image_encoder`), which `StableDiffusion.from_pretrained` reads.

Because sd_model.py is named after the original checkpoint, most of the work is stripping
prefixes (PREFIXES). Real renames are short rule tables: OpenCLIP text/vision towers to Hugging
Face names (q/k/v are fused in OpenCLIP), and diffusers' block names to LDM's (index arithmetic
plus RESNET_RULES / VAE_RULES). Every conversion prints what it dropped (EMA copies, schedule
buffers, SD2's unused 24th text layer) and fails on any missing or unexpected key.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sd_model as sdm

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")
# Original single-file prefixes per family -> our parts. "openclip" parts need the rename rules below.
PREFIXES = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."},
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."},
    "sdxl": {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
}
OPENCLIP_PARTS = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}
# Keys a single file carries that no model part uses: (pattern, why), reported when dropped.
DROPPED = ((r"^model_ema\.", "EMA copy of the UNet (use --ema to convert it instead)"),
           (r"^(betas|alphas_cumprod.*|sqrt_.*|log_one_minus.*|posterior_.*|model_ema_decay|num_updates|logvar)$", "noise-schedule buffers (recomputed)"),
           (r"position_ids$", "position-id buffers (recomputed)"),
           (r"(logit_scale|attn_mask)$", "CLIP training-only tensors"),
           (r"^first_stage_model\.loss\.", "VAE training-loss weights"),
           (r"^(v_pred|ztsnr)$", "ComfyUI's empty schedule markers (read into the schedule)"))


def single_file_schedule(path: Path, sd: dict) -> dict:
    """What a single file says of its schedule, as ScheduleConfig fields: ComfyUI's empty `v_pred` / `ztsnr`
    tensors, or the ModelSpec / kohya header (`modelspec.prediction_type`, `ss_v_parameterization`)."""
    meta = (safe_open(str(path), "pt").metadata() or {}) if path.suffix == ".safetensors" else {}
    pred = meta.get("modelspec.prediction_type", "").lower()
    out = {"prediction": "v"} if "v_pred" in sd or pred == "v" or meta.get("ss_v_parameterization") == "True" else \
        {"prediction": "eps"} if pred == "epsilon" else {}
    if "ztsnr" in sd:  # zero terminal SNR is a v-prediction schedule (Lin et al. 2024)
        out.update(prediction="v", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return out


def _rules(s: str, rules) -> str:  # the first rule whose prefix `s` has renames that prefix
    return next((new + s[len(old):] for old, new in rules if s.startswith(old)), s)


# ---- OpenCLIP <-> Hugging Face CLIP names (q/k/v fused in OpenCLIP as in_proj) ----------------

OPENCLIP_RULES = (  # (OpenCLIP, HF) inside one residual block
    ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def _openclip_top(tower: str) -> dict:
    """Top-level OpenCLIP keys -> HF keys, for the "text" or "vision" tower."""
    if tower == "text":
        return {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "positional_embedding": "text_model.embeddings.position_embedding.weight",
                "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias"}
    return {"class_embedding": "vision_model.embeddings.class_embedding",
            "positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "conv1.weight": "vision_model.embeddings.patch_embedding.weight", **{f"{oc}.{w}": f"vision_model.{hf}.{w}"
            for oc, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")) for w in ("weight", "bias")}}


def openclip_to_hf(sd: dict, tower: str, keep_layers: int | None = None) -> tuple[dict, list[str]]:
    """OpenCLIP tower (keys without `visual.` for vision) -> HF keys; `tower` is "text" or "vision".
    With `keep_layers`, deeper layers and the projection are returned as dropped (SD2 uses neither)."""
    out, dropped, top = {}, [], _openclip_top(tower)
    root = "text_model." if tower == "text" else "vision_model."
    proj = "text_projection.weight" if tower == "text" else "visual_projection.weight"
    for k, v in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", k)
        if k in top:
            out[top[k]] = v
        elif k in ("text_projection", "proj") and keep_layers is None:  # stored (width, out), used as x @ P; a Linear holds P^T
            out[proj] = v.T.contiguous()
        elif m and keep_layers is not None and int(m[1]) >= keep_layers:
            dropped.append(k)
        elif m and m[2].startswith("attn.in_proj_"):
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{root}encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2].rsplit('_', 1)[1]}"] = part.contiguous()
        elif m:
            out[f"{root}encoder.layers.{m[1]}." + _rules(m[2], OPENCLIP_RULES)] = v
        else:
            dropped.append(k)
    return out, dropped


def hf_to_openclip(sd: dict, tower: str) -> dict:
    """Inverse of `openclip_to_hf` (for --to ldm on SD2 and SDXL text towers)."""
    out, top = {}, {hf: oc for oc, hf in _openclip_top(tower).items()}
    root = "text_model." if tower == "text" else "vision_model."
    back = tuple((hf, oc) for oc, hf in OPENCLIP_RULES)
    for k, v in sd.items():
        m = re.match(re.escape(root) + r"encoder\.layers\.(\d+)\.(.*)", k)
        if k in top:
            out[top[k]] = v
        elif k in ("text_projection.weight", "visual_projection.weight"):
            out["text_projection" if tower == "text" else "proj"] = v.T.contiguous()
        elif m and m[2].startswith("self_attn.q_proj."):
            kind = m[2].rsplit(".", 1)[1]
            qkv = [sd[f"{root}encoder.layers.{m[1]}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        elif m and not m[2].startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            out[f"transformer.resblocks.{m[1]}." + _rules(m[2], back)] = v
    return out


# ---- diffusers -> LDM names ----------------------------------------------------------------------

RESNET_RULES = (  # diffusers ResnetBlock2D -> LDM ResBlock
    ("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
UNET_TOP = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
            "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
            "add_embedding.linear_2.": "label_emb.0.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
VAE_RULES = (  # diffusers AutoencoderKL -> LDM, applied in order to the whole key
    (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."), (r"conv_norm_out\.", "norm_out."),
    (r"conv_shortcut\.", "nin_shortcut."), (r"attn_1\.(group_norm)\.", "attn_1.norm."),
    (r"attn_1\.(to_q|query)\.", "attn_1.q."), (r"attn_1\.(to_k|key)\.", "attn_1.k."),
    (r"attn_1\.(to_v|value)\.", "attn_1.v."), (r"attn_1\.(to_out\.0|proj_attn)\.", "attn_1.proj_out."))


def diffusers_unet_to_ldm(sd: dict, cfg: sdm.UNetConfig) -> dict:
    """diffusers UNet2DConditionModel keys -> LDM keys: down_blocks.i.resnets.j is input_blocks.{1 + i(n+1) + j}.0, etc."""
    n, levels, out = cfg.num_res_blocks, len(cfg.channel_mult), {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "down_blocks":
            i, j, rest = int(p[1]), int(p[3]), ".".join(p[4:])
            new = {"resnets": f"input_blocks.{1 + i * (n + 1) + j}.0." + _rules(rest, RESNET_RULES),
                   "attentions": f"input_blocks.{1 + i * (n + 1) + j}.1.{rest}",
                   "downsamplers": f"input_blocks.{(i + 1) * (n + 1)}.0.op." + rest.removeprefix("conv.")}[p[2]]
        elif p[0] == "up_blocks":
            i, j, rest = int(p[1]), int(p[3]), ".".join(p[4:])
            has_attn = cfg.transformer_depth[levels - 1 - i] > 0  # up block i works at level L-1-i
            new = {"resnets": f"output_blocks.{i * (n + 1) + j}.0." + _rules(rest, RESNET_RULES),
                   "attentions": f"output_blocks.{i * (n + 1) + j}.1.{rest}",
                   "upsamplers": f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}.{rest}"}[p[2]]
        elif p[0] == "mid_block":
            idx, rest = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"], ".".join(p[3:])
            new = f"middle_block.{idx}." + (_rules(rest, RESNET_RULES) if idx != 1 else rest)
        else:
            new = _rules(k, tuple(UNET_TOP.items()))
        out[new] = v
    return out


def diffusers_vae_to_ldm(sd: dict, cfg: sdm.VAEConfig) -> dict:
    levels, out = len(cfg.ch_mult), {}
    for k, v in sd.items():
        new = k
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", k)
        if m:  # diffusers counts decoder levels from the bottom, LDM from the top
            new = f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.{m[3]}"
        for old, rep in VAE_RULES:
            new = re.sub(old, rep, new)
        linear = re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", new) and v.ndim == 2  # diffusers' 1x1 convs as Linear weights
        out[new] = v[:, :, None, None] if linear else v
    return out


# ---- architectures read off the weights (openai/CLIP `build_model` style) ----

def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix` has (e.g. the transformer blocks of one SpatialTransformer)."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def unet_config_from_weights(sd: dict, **heads) -> sdm.UNetConfig:
    """Read a UNet's architecture off its LDM-named weights (openai/CLIP `build_model` style).
    Head counts and GroupNorm groups leave no trace in the shapes: `heads` gives num_heads or
    num_head_channels, and norm_groups stays 32 as in every released model."""
    mc = (w := sd["input_blocks.0.0.weight"]).shape[0]
    downs = _count({k: 0 for k in sd if ".0.op." in k}, "input_blocks.")
    levels = downs + 1
    n = (_count(sd, "input_blocks.") - 1 - downs) // levels
    first = [1 + lvl * (n + 1) for lvl in range(levels)]  # the first input block of each level
    depth = tuple(_count(sd, f"input_blocks.{i}.1.transformer_blocks.") for i in first)
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sd.items() if k.endswith(".proj_in.weight")), None)
    return sdm.UNetConfig(
        in_channels=w.shape[1], out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
        channel_mult=tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first),
        num_res_blocks=n, attention_resolutions=tuple(2**lvl for lvl in reversed(range(levels)) if depth[lvl]),
        transformer_depth=depth, transformer_depth_middle=_count(sd, "middle_block.1.transformer_blocks."),
        context_dim=0 if to_k is None else to_k.shape[1], use_linear_in_transformer=proj_in is not None and proj_in.ndim == 2,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else None,
        **({"num_heads": None, **heads} if "num_head_channels" in heads else heads),
    )


def vae_config_from_weights(sd: dict, scale_factor: float) -> sdm.VAEConfig:
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(sd, "encoder.down.")
    return sdm.VAEConfig(ch=ch, ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
                     num_res_blocks=_count(sd, "encoder.down.0.block."), z_channels=sd["post_quant_conv.weight"].shape[0],
                     in_channels=sd["encoder.conv_in.weight"].shape[1], scale_factor=scale_factor)


def text_config_from_weights(sd: dict, act: str, pad_id: int, penultimate: bool = False) -> sdm.CLIPTextConfig:
    """Every CLIP text tower released has 64-wide heads, so the head count is width / 64."""
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    proj = sd.get("text_projection.weight")
    return sdm.CLIPTextConfig(vocab_size=vocab, max_positions=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                          width=width, layers=_count(sd, "text_model.encoder.layers."), heads=width // 64,
                          mlp_dim=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], act=act,
                          projection_dim=None if proj is None else proj.shape[0], pad_id=pad_id, penultimate=penultimate)


# ---- reading -------------------------------------------------------------------------------------

# stands in for a pickled training-time object (a Lightning callback's state) that a converter never reads
_Inert = type("_Inert", (), {"__init__": lambda self, *a, **k: None, "__setstate__": lambda self, state: None})


def _torch_load(path: Path):
    """torch.load with weights_only; original LDM .ckpt files (v1-5-pruned-emaonly.ckpt among them) also pickle
    Lightning's ModelCheckpoint and numpy scalars, which weights_only refuses: those names, and only those, are
    allowed on a second try (the callback as an inert stub, so pytorch_lightning need not be installed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
        allowed = [(_Inert, f"{m}.callbacks.model_checkpoint.ModelCheckpoint") for m in ("pytorch_lightning", "lightning.pytorch")]
        allowed += [(scalar, f"numpy.{m}.multiarray.scalar") for m in ("core", "_core")]
        allowed += [np.dtype] + [type(np.dtype(t)) for t in ("int64", "int32", "float64", "float32", "bool")]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: Path) -> dict:
    """A flat {key: tensor} from a .safetensors / .ckpt / .pt / .bin file, with one clear error if unreadable."""
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist.")
    try:
        sd = load_file(str(path)) if path.suffix == ".safetensors" else _torch_load(path)
    except Exception as e:
        raise ValueError(f"'{path}' is not a readable checkpoint (truncated, or not a .ckpt/.safetensors file; {type(e).__name__}).") from None
    while isinstance(sd, dict) and len(sd) <= 4 and isinstance(sd.get("state_dict", sd.get("model")), dict):
        sd = sd.get("state_dict", sd.get("model"))  # Lightning's wrapper, or {"model": ...}
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    if not sd:
        raise ValueError(f"'{path}' holds no tensors; it is not a model checkpoint.")
    return sd


def split_single_file(sd: dict, ema: bool = False, quiet: bool = False) -> tuple[dict, str]:
    """An original single file -> ({part: our-keys state dict}, family)."""
    family = ("sdxl" if any(k.startswith("conditioner.embedders.1.") for k in sd)
              else "sd2" if any(k.startswith("cond_stage_model.model.") for k in sd)
              else "sd1" if any(k.startswith("cond_stage_model.transformer.") for k in sd) else None)
    if family is None or not any(k.startswith("model.diffusion_model.") for k in sd):
        if any(k.startswith("conditioner.embedders.0.model.") for k in sd):  # bigG alone, aesthetic-score conditioning
            raise ValueError("this is an SDXL refiner, which this project does not run; convert the SDXL base model.")
        raise ValueError("this file is not a Stable Diffusion single-file checkpoint "
                         "(no model.diffusion_model.* UNet keys and a known text-encoder prefix).")
    parts, dropped, used = {}, Counter(), set()
    if ema:  # LitEma stores "model_ema." + the key with its dots removed
        flat = {k[len("model_ema."):]: k for k in sd if k.startswith("model_ema.")}
        if not flat:
            raise ValueError("--ema: this checkpoint has no EMA weights (model_ema.*).")
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            src = flat.get(k[len("model."):].replace(".", ""))
            if src is None:
                raise ValueError(f"--ema: no EMA copy of '{k}'.")
            sd = {**sd, k: sd[src]}
        dropped["the trained (non-EMA) UNet weights, replaced by their EMA copy (--ema)"] = len(flat)
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    for part, prefix in PREFIXES[family].items():
        mine = [k for k in sd if k.startswith(prefix) and not any(re.search(pat, k) for pat, _ in DROPPED)]
        if not mine:  # a UNet-only or VAE-less file: every part is needed to build the model
            raise ValueError(f"this {family} file has no {part} weights (no '{prefix}*' keys); "
                             "convert a full checkpoint, or a diffusers folder that has every part.")
        sub, used = {k[len(prefix):]: sd[k] for k in mine}, used | set(mine)
        if (family, part) in OPENCLIP_PARTS:
            keep = 23 if family == "sd2" else None  # SD2 conditions on the penultimate layer: layer 24 is never used
            sub, extra = openclip_to_hf(sub, "text", keep)
            dropped.update({"text layers/projection the model never uses": len(extra)} if extra else {})
        else:
            sub = hf_clip_layout(sub, "text_model.") if part.startswith("text") else sub
        parts[part] = sub
    for k in sd:
        if k not in used:
            why = next((w for pat, w in DROPPED if re.search(pat, k)), None)
            if why is None:
                raise ValueError(f"unexpected key '{k}' in the checkpoint; this converter does not know what it is.")
            dropped[why] += 1
    for why, n in dropped.items() if not quiet else ():
        print(f"  dropped {n} key(s): {why}", file=sys.stderr)
    return parts, family


def folder_weights(folder: Path, stem: str) -> dict:
    """A diffusers/transformers component: plain, sharded (index.json) or .fp16 variant, safetensors or bin."""
    stems = (stem, "pytorch_model") if stem == "model" else (stem,)  # transformers 4.x named .bin weights pytorch_model
    for st in stems:
        for ext in (".safetensors", ".bin"):
            for variant in ("", ".fp16"):
                f = folder / f"{st}{variant}{ext}"
                if f.exists():
                    return read_state_dict(f)
                # a sharded variant's index: <stem>.safetensors.index.fp16.json (diffusers/transformers' _add_variant)
                for index in (folder / f"{st}{ext}.index{variant}.json", folder / f"{st}{variant}{ext}.index.json"):
                    if index.exists():
                        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                        return {k: v for s in shards for k, v in read_state_dict(folder / s).items()}
    raise FileNotFoundError(f"no weights in '{folder}' (looked for {' / '.join(stems)} .safetensors / .bin, "
                            "plain, .fp16 or sharded).")


def diffusers_unet_config(c: dict) -> sdm.UNetConfig:
    boc, n_levels = c["block_out_channels"], len(c["block_out_channels"])
    attn = [t.startswith("CrossAttn") for t in c["down_block_types"]]
    depth = c.get("transformer_layers_per_block", 1)
    depth = [depth] * n_levels if isinstance(depth, int) else list(depth)
    # diffusers' `attention_head_dim` is the number of heads for SD1/SD2 (a known misnomer).
    heads = c.get("num_attention_heads") or c["attention_head_dim"]
    widths = set() if isinstance(heads, int) else {b // h for b, h in zip(boc, heads)}  # per level: a fixed head width
    if len(widths) > 1:
        raise ValueError(f"unsupported UNet: per-level head widths differ ({heads}).")
    head_kw = {"num_heads": None, "num_head_channels": widths.pop()} if widths else {"num_heads": heads}
    return sdm.UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], model_channels=boc[0],
        channel_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(2**i for i in reversed(range(n_levels)) if attn[i]),
        transformer_depth=tuple(d if a else 0 for d, a in zip(depth, attn)), transformer_depth_middle=depth[-1],
        context_dim=c["cross_attention_dim"], use_linear_in_transformer=c.get("use_linear_projection", False),
        adm_in_channels=c.get("projection_class_embeddings_input_dim") if c.get("addition_embed_type") == "text_time" else None,
        norm_groups=c.get("norm_num_groups", 32), **head_kw)


def diffusers_vae_config(c: dict) -> sdm.VAEConfig:
    ch = c["block_out_channels"][0]
    return sdm.VAEConfig(ch, tuple(b // ch for b in c["block_out_channels"]), c["layers_per_block"], c["latent_channels"],
                         c["in_channels"], c.get("scaling_factor", 0.18215), c.get("norm_num_groups", 32))


def _hf_text_config(c: dict, pad_id: int, penultimate: bool) -> sdm.CLIPTextConfig:
    with_proj = "CLIPTextModelWithProjection" in c.get("architectures", [])
    return sdm.CLIPTextConfig(c["vocab_size"], c["max_position_embeddings"], c["hidden_size"], c["num_hidden_layers"],
                              c["num_attention_heads"], c["intermediate_size"], c["hidden_act"],
                              c.get("projection_dim") if with_proj else None, pad_id, penultimate)


def hf_clip_layout(sd: dict, root: str) -> dict:
    """HF CLIP keys under their `text_model.` / `vision_model.` level. transformers >= 5 saves a plain
    CLIPTextModel / CLIPVisionModel without it, and so did transformers < 4 inside SD1 single files."""
    keep = (root, "text_projection.", "visual_projection.")
    return {(k if k.startswith(keep) else root + k): v for k, v in sd.items() if not k.endswith("position_ids")}


def _pad_id(tok_folder: Path) -> int:
    """SD1's tokenizer pads with <|endoftext|>; SD2's and SDXL's second with "!" (id 0)."""
    files = [tok_folder / n for n in ("special_tokens_map.json", "tokenizer_config.json") if (tok_folder / n).exists()]
    if not files:  # guessing would encode every prompt of the other family with the wrong padding
        raise FileNotFoundError(f"diffusers folder '{tok_folder.parent}' has no '{tok_folder.name}/' part (its pad token decides the prompt encoding).")
    pad = json.loads(files[0].read_text()).get("pad_token") or "<|endoftext|>"
    pad = pad["content"] if isinstance(pad, dict) else pad
    return {"<|endoftext|>": 49407, "!": 0}.get(pad, 49407)


def load_diffusers(folder: Path) -> tuple[sdm.SDConfig, dict]:
    for sub, f in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / f).exists():
            raise FileNotFoundError(f"diffusers folder '{folder}' has no '{sub}/' part (missing {sub}/{f}).")
    js = lambda p: json.loads(p.read_text())
    ucfg = diffusers_unet_config(js(folder / "unet" / "config.json"))
    vcfg = diffusers_vae_config(js(folder / "vae" / "config.json"))
    xl = (folder / "text_encoder_2").is_dir()
    tcfg = _hf_text_config(js(folder / "text_encoder" / "config.json"), _pad_id(folder / "tokenizer"), xl)
    t2cfg = _hf_text_config(js(folder / "text_encoder_2" / "config.json"), _pad_id(folder / "tokenizer_2"), True) if xl else None
    sc = js(folder / "scheduler" / "scheduler_config.json")
    if sc.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"unsupported noise schedule '{sc['beta_schedule']}' (only scaled_linear).")
    sched = sdm.ScheduleConfig(sc.get("num_train_timesteps", 1000), sc.get("beta_start", 0.00085), sc.get("beta_end", 0.012),
                               "v" if sc.get("prediction_type") == "v_prediction" else "eps", sc.get("steps_offset", 1),
                               "trailing" if sc.get("timestep_spacing") == "trailing" else "leading",
                               bool(sc.get("rescale_betas_zero_snr", False)))
    size = js(folder / "unet" / "config.json").get("sample_size", 64) * 2 ** (len(vcfg.ch_mult) - 1)
    cfg = sdm.SDConfig("custom", ucfg, vcfg, tcfg, t2cfg, sched, size)
    name = next((n for n, p in sdm.PRESETS.items() if replace(p, name="custom", image_size=cfg.image_size) == cfg), None)
    cfg = replace(cfg, name=sdm.PRESETS[name].name) if name else cfg
    parts = {"unet": diffusers_unet_to_ldm(folder_weights(folder / "unet", "diffusion_pytorch_model"), ucfg),
             "vae": diffusers_vae_to_ldm(folder_weights(folder / "vae", "diffusion_pytorch_model"), vcfg),
             "text_encoder": hf_clip_layout(folder_weights(folder / "text_encoder", "model"), "text_model.")}
    if xl:
        parts["text_encoder_2"] = hf_clip_layout(folder_weights(folder / "text_encoder_2", "model"), "text_model.")
    return cfg, parts


def load_vae(path, like: sdm.AutoencoderKL) -> dict:
    """Another VAE for a model (--vae: SD1's ft-mse, SDXL's fp16-fix): a diffusers VAE, pipeline or converted folder, or
    one file in either naming (A1111's VAE files, a checkpoint's first_stage_model.*); checked against `like`, the one it replaces."""
    path = Path(path)
    sd = read_state_dict(path / "vae.safetensors") if (path / "vae.safetensors").exists() else read_state_dict(path) \
        if not path.is_dir() else folder_weights(path / "vae" if (path / "vae").is_dir() else path, "diffusion_pytorch_model")
    sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items()}  # then drop loss.*, EMA and the other parts
    sd = diffusers_vae_to_ldm({k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}, like.cfg)
    check_keys(like.state_dict(), sd, f"--vae {path} (not a VAE of this model's shape)")  # LDM names pass unchanged above
    return sd


def load_clip_vision(path: Path) -> tuple[sdm.CLIPVisionConfig, dict]:
    """A CLIP image tower: HF folder (config.json + weights) or an OpenCLIP file (keys `visual.*`)."""
    if path.is_dir():
        c = json.loads((path / "config.json").read_text())
        c = c.get("vision_config", c)
        sd = folder_weights(path, "model") if any(path.glob("model*")) else folder_weights(path, "pytorch_model")
        sd = hf_clip_layout({k: v for k, v in sd.items() if not k.startswith(("text_model.", "text_projection.", "logit_scale"))}, "vision_model.")
        cfg = sdm.CLIPVisionConfig(c["image_size"], c["patch_size"], c["hidden_size"], c["num_hidden_layers"],
                                   c["num_attention_heads"], c["intermediate_size"], c["hidden_act"],
                                   sd["visual_projection.weight"].shape[0] if "visual_projection.weight" in sd else c["projection_dim"])
        return cfg, sd
    sd = read_state_dict(path)
    sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if not sd:
        raise ValueError(f"'{path}' holds no OpenCLIP image tower (no visual.* keys).")
    sd, _ = openclip_to_hf(sd, "vision")
    width = sd["vision_model.pre_layrnorm.weight"].shape[0]
    grid = int((sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    # The activation is not in the weights: the hub's open_clip_config.json beside the file says QuickGELU (DFN, MetaCLIP).
    occ = path.with_name("open_clip_config.json")
    act = "quick_gelu" if occ.exists() and json.loads(occ.read_text()).get("model_cfg", {}).get("quick_gelu") else "gelu"
    # OpenCLIP ViT-B has 12 heads, L/H/g/bigG 16 (head widths 64, 64, 80, 88, 104).
    cfg = sdm.CLIPVisionConfig(grid * patch, patch, width, _count(sd, "vision_model.encoder.layers."), 12 if width == 768 else 16,
                               sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], act,
                               sd["visual_projection.weight"].shape[0])
    return cfg, sd


def load_any(path, variant: str | None = None, ema: bool = False, quiet: bool = True) -> tuple[sdm.SDConfig, dict]:
    """(config, {part: state dict}) from any supported Stable Diffusion source."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist.")
    if path.is_dir() and (path / "config.json").exists() and "sd" in (meta := json.loads((path / "config.json").read_text())):
        cfg = sdm.config_from_dict(meta["sd"])
        parts = {p: read_state_dict(path / f"{p}.safetensors") for p in PARTS[:4] if (path / f"{p}.safetensors").exists()}
    elif path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ValueError(f"'{path}' is neither a converted model (config.json) nor a diffusers folder (model_index.json).")
        cfg, parts = load_diffusers(path)
    else:
        sd = read_state_dict(path)
        parts, _ = split_single_file(sd, ema, quiet)
        schedule = single_file_schedule(path, sd)
        try:  # an SD 2.x file that says its prediction needs no --variant (the weights are the same for both)
            cfg = sdm.infer_config(parts, variant or {"v": "sd21", "eps": "sd21-base"}.get(schedule.get("prediction")))
        except ValueError:  # not SD 2.x after all: what the weights say
            cfg = sdm.infer_config(parts, variant)
        cfg = replace(cfg, schedule=replace(cfg.schedule, **schedule)) if schedule else cfg
        if path.suffix == ".safetensors" and (own := (safe_open(str(path), "pt").metadata() or {}).get("sd_config")):
            cfg = sdm.config_from_dict(json.loads(own))  # ours (--to ldm): heads, groups, size the weights cannot say
    if variant is not None and cfg.name != sdm.PRESETS.get(variant, cfg).name:
        raise ValueError(f"'{path}' is a '{cfg.name}' model, not '{variant}'.")
    if cfg.unet.in_channels != cfg.unet.out_channels:  # SD inpainting: latents + mask + masked image = 9; depth: 5
        raise ValueError(f"'{path}' is an inpainting or depth model (its UNet takes {cfg.unet.in_channels} input channels), which this project does not run; convert the base model.")
    if cfg.unet.context_dim != (width := cfg.text.width + (cfg.text2.width if cfg.text2 else 0)):  # SDXL: both towers, side by side
        raise ValueError(f"'{path}': its UNet reads {cfg.unet.context_dim}-wide text states and its text encoder(s) give {width}; a part is missing or from another model (SDXL: text_encoder_2/).")
    return cfg, parts


def check_keys(expected: dict, got: dict, what: str) -> None:
    """Fail with one message on any missing or unexpected key, or a shape mismatch."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape)]
    if missing or unexpected or shapes:
        show = lambda ks: ", ".join(ks[:3]) + (" ..." if len(ks) > 3 else "")
        raise ValueError(f"{what}: {len(missing)} missing key(s) [{show(missing)}], {len(unexpected)} unexpected "
                         f"[{show(unexpected)}], {len(shapes)} shape mismatch(es) [{show(sorted(shapes))}].")


def to_ldm(cfg: sdm.SDConfig, parts: dict) -> dict:
    """Our parts -> one original-layout state dict (the inverse of `split_single_file`), with ComfyUI's empty
    `v_pred` / `ztsnr` markers where the schedule needs them: the weights alone cannot say it (single_file_schedule)."""
    family, sc = "sdxl" if cfg.text2 else "sd2" if cfg.text.width == 1024 else "sd1", cfg.schedule
    out = {"v_pred": torch.zeros(0)} if sc.prediction == "v" else {}
    out.update({"ztsnr": torch.zeros(0)} if sc.rescale_betas_zero_snr else {})
    for part, prefix in PREFIXES[family].items():
        sd = parts[part]
        if (family, part) in OPENCLIP_PARTS:
            sd = hf_to_openclip(sd, "text")
        out.update({prefix + k: v for k, v in sd.items()})
    return out


def write_parts(folder: Path, cfg: sdm.SDConfig | None, parts: dict, vision_cfg=None) -> None:
    """One safetensors file per part and the config.json `from_pretrained` reads, each written atomically."""
    for part, sd in parts.items():
        sdm.save_safetensors(sd, folder / f"{part}.safetensors", {"format": "pt"})
    meta = {"format": "sd_model", **({"sd": asdict(cfg)} if cfg else {}),
            **({"image_encoder": asdict(vision_cfg)} if vision_cfg else {})}
    sdm.atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))


def save_converted(dst: Path, cfg: sdm.SDConfig | None, parts: dict, vision_cfg=None, overwrite: bool = False) -> None:
    """Write into a temporary sibling directory, then rename it: DST is complete or absent."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"'{dst}' exists; pass --overwrite to replace it.")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_parts(tmp, cfg, parts, vision_cfg)
        shutil.rmtree(dst) if dst.exists() else None
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(src, dst, variant=None, to="ours", ema=False, dtype=None, overwrite=False, vision=False, zsnr=False, vae=None) -> None:
    """`zsnr`: the model was trained with v-prediction on a zero-terminal-SNR schedule (Lin et al. 2024), which its
    weights cannot say; it then samples with that schedule and trailing timesteps (--to ldm: written as markers). `vae`: baked in."""
    src, dst = Path(src), Path(dst)
    if vision and (zsnr or vae or to == "ldm"):
        raise ValueError("--zero-terminal-snr, --vae and --to ldm belong to a Stable Diffusion model, not a lone CLIP image tower.")
    print(f"reading {src}", file=sys.stderr)
    if vision:
        vcfg, sd = load_clip_vision(src)
        with torch.device("meta"):
            check_keys(sdm.CLIPVisionModel(vcfg).state_dict(), sd, f"image_encoder of {src}")
        parts, cfg = {"image_encoder": sd}, None
    else:
        cfg, parts = load_any(src, variant, ema, quiet=False)
        if zsnr:
            cfg = replace(cfg, schedule=replace(cfg.schedule, prediction="v", rescale_betas_zero_snr=True, timestep_spacing="trailing"))
        with torch.device("meta"):
            model = sdm.StableDiffusion(cfg)
        parts["vae"] = load_vae(vae, model.vae) if vae else parts["vae"]
        for part, sd in parts.items():
            check_keys(getattr(model, part).state_dict(), sd, f"{part} of {src}")
        print(f"variant: {cfg.name}; all parts load strictly (0 missing, 0 unexpected keys)", file=sys.stderr)
    if dtype is not None:
        parts = {p: {k: v.to(sdm.DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()} for p, sd in parts.items()}
    if to == "ldm":
        if dst.suffix != ".safetensors":
            raise ValueError(f"--to ldm writes a .safetensors file; name it so ('{dst.with_suffix('.safetensors').name}'), not '{dst.name}'.")
        if dst.exists() and not overwrite:
            raise FileExistsError(f"'{dst}' exists; pass --overwrite to replace it.")
        pred = {"modelspec.prediction_type": "v" if cfg.schedule.prediction == "v" else "epsilon"}  # A1111/Forge read this
        sdm.save_safetensors(to_ldm(cfg, parts), dst, {"format": "pt", **pred, "sd_config": json.dumps(asdict(cfg))})
    else:
        save_converted(dst, cfg, parts, vcfg if vision else None, overwrite)
    print(f"wrote {dst}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="single file, diffusers folder, converted folder, or CLIP vision model")
    p.add_argument("dst", help="output directory (or .safetensors file with --to ldm)")
    p.add_argument("--variant", choices=sorted(sdm.PRESETS), help="expected variant; required for SD 2.x single files")
    p.add_argument("--to", choices=["ours", "ldm"], default="ours", help="ldm: write an original-layout single file")
    p.add_argument("--clip-vision", action="store_true", help="SRC is a CLIP image tower (HF folder or OpenCLIP file)")
    p.add_argument("--ema", action="store_true", help="take the UNet from the EMA weights of a single file")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: keep the stored dtype")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="a v-prediction model trained on a zero-terminal-SNR schedule (sampled with trailing timesteps)")
    p.add_argument("--vae", default=None, help="bake in another VAE: a diffusers VAE folder or a VAE file (A1111's)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        convert(a.src, a.dst, a.variant, a.to, a.ema, a.dtype, a.overwrite, a.clip_vision, a.zero_terminal_snr, a.vae)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
