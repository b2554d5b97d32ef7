"""Subject-Diffusion (Ma, Liang, Chen, Lu, "Subject-Diffusion: Open Domain Personalized Text-to-Image
Generation without Test-time Fine-tuning", arXiv:2307.11410, SIGGRAPH 2024) on sd_model.py.

Trained once on captioned images whose subjects carry boxes and masks, the model then personalises
from one reference image per subject (at most two) with no test-time tuning. Equations come from the
official code (OPPO-Mente-Lab/Subject-Diffusion @ f4c44b8) as rebuilt in the method card
(shared/methods/subject_diffusion.md, "card §N" below); the paper's equations were not available.

Three conditioning paths (card §1):
  1. Location (card §3): one more UNet input channel m = prod_k (1 - box_k), 0 on the union of the
     subjects' boxes and 1 elsewhere, drawn at image size and nearest-resized to the latent. The
     official conv_in is widened to 5 input channels, the new kernel zero. Here the checkpoint's
     conv_in stays as it is and `SubjectDiffusion.conv_in` is a zero-initialised 5-channel delta:
     W = [W_base, 0] + dW, b = b_base + db, so "widened conv_in" = base + delta exactly, and the
     trainable count is the card's 14,720 (SD2). `widened_state_dict` writes the official layout.
  2. Dense image tokens (card §4): CLIP patch tokens P_k (last block, before post-LN, unprojected)
     and Fourier box features g(b_k) = [sin(f_i b), cos(f_i b)]_i, f_i = 100^(i/8), go through
     o_k = MLP([P_k ; g(b_k)]) (absent slots: learned null features). Every transformer block gets
     GLIGEN's gated self-attention (Li et al. 2023, arXiv:2301.07093, Eq. 8) plus its gated FF:
        h <- h + tanh(a_attn) TS(SA(LN([h ; W o])))      TS keeps the first H*W outputs
        h <- h + tanh(a_dense) FF(LN(h))                 a = 0 at init: exactly the base model
     placed between self- and cross-attention (the `after_attn1` slot).
  3. Fused text (card §5): the prompt becomes "<caption>, the <entity> is sks" per subject, and the
     k-th "sks" token embedding is replaced by MLP_cls(pooled image embedding of subject k) before
     the position embeddings; the whole text encoder is fine-tuned (our own copy of it).
Objective (card §6.4):  L = ||eps - eps_theta([z_t ; m], t, tau(y, c), o)||^2 + 0.01 L_attn, with
L_attn the balanced-L1 cross-attention localisation loss of FastComposer (Xiao et al. 2023,
arXiv:2305.10431) on the "sks" token and the entity word, over the 11 attn2 layers below 64x64.
Guidance (card §8.2, InstructPix2Pix form): eps = eps_u + s_T (eps_c - eps_i) + s_I (eps_i - eps_u).

Code vs paper (card §9), and what this file does:
  1 image encoder: as the code (OpenCLIP ViT-H/14 raw patch tokens, projected pooled "CLS").
  2 location mask: as the code (inverted box rectangles merged into one channel), kept.
  3 captions: the code's are BLIP-large (the paper says BLIP-2); here each record brings its own
    caption, and the toy world writes its scene descriptions, so no captioner runs.
  4 entity images: training composites the cut-out subject on random backgrounds with the card's
    augmentation; there is no BG-20k here: `--backgrounds DIR` takes any background set, and by
    default the background is the least-occupied square crop of another training image, its object
    pixels filled with its background's mean colour. Records' masks replace SAM; the filters that need
    SAM statistics or detector logits (is_valid_bbox, logit > 0.3) and the ">10 % near-white pixels"
    image filter are not applied (the latter would drop the toy world's snow scenes). Inference: white
    background, padded to a square (test_subject.py), so elongated subjects are not cut (test.py).
  5, 6 extra trainables (conv_in, attn2 K/V) and the dense gated FF in all 16 blocks: kept.
  7 CFG mismatch: FIXED by default (`drop_objects`): when the location is dropped in training (10 %)
    the grounding tokens are dropped too (null features), and the unconditional branch at inference
    uses those same null tokens. `--no-drop-objects` restores the code: objs never dropped in
    training, zeros after GroundingNet for the unconditional branch. Folders of the official code
    sample that way (they were trained without the fix); ours record which in their metadata.
    The second half of §9.7, kept as in the code: a dropped location is the all-zero channel, which
    the inverted convention also reads as "a box over the whole image". Training shows that value
    in 10 % of the steps (with and without text), so the channel of `--no-location` at sampling is in
    distribution and means "anywhere", as it does in the code. Its object tokens are not quite: it keeps
    the subject's patch tokens (null positions), which training with `drop_objects` drops along with the
    location (without it, training kept them with their boxes).
  8 box coordinates for one subject: kept at inference (`--use-bbox`, test_subject.py); pass
    `--no-use-bbox` for test.py's null position features.
  9 hybrid hand-off to the original SD2: not implemented (test.py never triggers it).
  10 localisation loss on both the "sks" token and the entity word (FastComposer supervises only its
    image tokens): as the code.
  11 "sks" count: checked per prompt (the code's batch-level assert lets 4 slots share 1 embedding);
    a training caption long enough to cut an "sks" off keeps only the subjects whose "sks" survived.
Sampler: sd_model has no PNDM; DDIM 50 steps is the default instead of test.py's PNDM 50.
Prediction type: the official run trains an eps-model (SD2-base, card §2.1). The target here is the base
model's own (`NoiseSchedule.target`): eps on SD1.x and SD2-base, v on a 768-v base such as SD2.1 (an
extension the card does not cover; sampling reads the same schedule).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps

import sd_model as sdm

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data workers fork after the main process tokenised
MAX_SUBJECTS = 2  # MAX_NUM_OBJECTS (train.py): two image slots; the paper reports >2 subjects often fail
SKS_ID = 48136  # CLIP BPE id of "sks</w>": the token whose embedding becomes the subject's image embedding


@dataclass
class TrainConfig(sdm.TrainArgs):
    """Official defaults (train.sh, train.py, custom_dataset.py; card §7) on the shared training flags."""

    data: list[str] = field(default_factory=list)  # folders of records and/or .tar shards (format: `Records`)
    image_encoder: str = ""  # converted CLIP image tower; "" = the one stored beside the base model
    learning_rate: float = 3e-5  # all groups, AdamW, betas (0.9, 0.999), weight decay 0 (card §7.2)
    lr_warmup_steps: int = 1000  # constant_with_warmup
    train_batch_size: int = 8  # per process: 8 x 8 GPUs x 4 nodes = 256 global in train.sh
    max_train_steps: int = 450_000  # the test scripts load step 449,999
    mixed_precision: str = "fp16"
    checkpointing_steps: int = 5000
    attn_loss_weight: float = 0.01  # lambda of L_attn (card §6.4)
    p_drop_text: float = 0.05  # r < 0.05: "" text (card §7.3)
    p_drop_both: float = 0.05  # next 5 %: "" text and no location
    p_drop_location: float = 0.05  # next 5 %: no location
    drop_objects: bool = True  # also drop the grounding tokens with the location (card §9.7 fix)
    min_box_area: float = 0.08  # subject box filters of verify_keys: area fraction, aspect ratio
    max_box_area: float = 0.7
    min_box_aspect: float = 0.3  # ratio_min/max of custom_dataset.py: w/h of the record's box in (0.3, 3)
    max_box_aspect: float = 3.0  # (verify_keys), then h/w of the cropped box (post_bbox_filter): (1/3, 3) in all
    min_box_logit: float = 0.3  # a box's detector "logit", where the json has one, must pass it (verify_keys)
    backgrounds: str = ""  # folder of background images for the entity crops (the paper: BG-20k)
    num_workers: int = 2
    validation_subject: str = ""  # image for the validation grid, with --validation-entity and -prompt
    validation_entity: str = ""
    minima = {"attn_loss_weight": 0, "p_drop_text": 0, "p_drop_both": 0, "p_drop_location": 0, "min_box_area": 0, "num_workers": 0}


# ---- 1. The new modules (official key names, so the official weights map one to one).


def fourier_embed(boxes, num_freqs: int = 8, temperature: float = 100.0):
    """g(b) of modules.py FourierEmbedder: [sin(f_0 b), cos(f_0 b), sin(f_1 b), ...], f_i = T^(i/n), no 2 pi."""
    freqs = temperature ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)
    x = boxes.float()[..., None, :] * freqs[:, None]
    return rearrange(torch.stack([x.sin(), x.cos()], dim=-2), "... f s c -> ... (f s c)")


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, no residual (modules.py MLP with use_residual=False)."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int):
        super().__init__()
        self.layernorm, self.fc1, self.fc2 = nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.layernorm(x))))


class GroundingNet(nn.Module):
    """Patch tokens + Fourier boxes -> object tokens o (card §4.1); absent slots get the null features."""

    def __init__(self, d_image: int, d_out: int, n_tokens: int, num_freqs: int = 8):
        super().__init__()
        self.num_freqs = num_freqs
        self.linears_image = MLP(d_image + 8 * num_freqs, d_out, d_out)
        self.null_image_feature = nn.Parameter(torch.zeros(1, 1, n_tokens, d_image))
        self.null_position_feature = nn.Parameter(torch.zeros(1, 1, n_tokens, 8 * num_freqs))

    def forward(self, tokens, valid, boxes, pos_valid=None):
        """tokens (b, 2, n, d_image), valid (b, 2), boxes (b, 2, 4) in [0, 1] -> (b, 2n, d_out).
        pos_valid (default: valid) says which slots get their box's g(b) rather than the null feature."""
        v = valid[..., None, None].to(tokens.dtype)
        image = v * tokens + (1 - v) * self.null_image_feature  # blended, not indexed: every weight stays in the graph
        v = (valid if pos_valid is None else pos_valid)[..., None, None].to(tokens.dtype)
        pos = v * fourier_embed(boxes, self.num_freqs)[:, :, None].to(tokens.dtype) + (1 - v) * self.null_position_feature
        return rearrange(self.linears_image(torch.cat([image, pos.expand(*image.shape[:3], -1)], -1)), "b k n d -> b (k n) d")


class GatedSelfAttentionDense(nn.Module):
    """GLIGEN's gated self-attention and gated FF ("fuser", third_party/attention.py), identity at a = 0."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.linear = nn.Linear(ctx_dim, dim)  # object tokens into the block's width
        self.attn = sdm.Attention(dim, None, heads, dim_head)  # q/k/v without bias, out with bias, as diffusers'
        self.ff = sdm.FeedForward(dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.alpha_attn, self.alpha_dense = nn.Parameter(torch.tensor(0.0)), nn.Parameter(torch.tensor(0.0))
        self.scale = 1.0  # beta: 0 switches the adapter off whatever a is

    def forward(self, x, objs):
        n = x.shape[1]
        x = x + self.scale * torch.tanh(self.alpha_attn) * self.attn(self.norm1(torch.cat([x, self.linear(objs)], 1)))[:, :n]
        return x + self.scale * torch.tanh(self.alpha_dense) * self.ff(self.norm2(x))


def _key(name: str) -> str:
    return name.replace(".", "_")  # module paths as ModuleDict keys


class SubjectDiffusion(nn.Module):
    """Every weight Subject-Diffusion adds or fine-tunes (card §7.1); the backbone's own stay untouched.

    conv_in: the widened conv_in minus the base one; kv: attn2 to_k/to_v minus the base ones (K/V
    trained Custom-Diffusion style); fuser: one adapter per transformer block; grounding, mlp: the
    GroundingNet ("proj") and MLP_cls; text_encoder: the fine-tuned copy of the SD text encoder.
    """

    def __init__(self, unet: sdm.UNetModel, text_encoder: sdm.CLIPTextModel, vision_cfg: sdm.CLIPVisionConfig):
        super().__init__()
        c = unet.cfg
        self.conv_in = nn.Conv2d(c.in_channels + 1, c.model_channels, 3, padding=1)
        nn.init.zeros_(self.conv_in.weight), nn.init.zeros_(self.conv_in.bias)
        layers = sdm.attention_layers(unet)
        self.kv_names = [f"{l.name}.{p}" for l in layers for p in ("to_k", "to_v")]
        self.kv = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros_like(unet.get_submodule(n).weight, dtype=torch.float32))
                                    for n in self.kv_names})
        blocks = [m for m in unet.modules() if isinstance(m, sdm.BasicTransformerBlock)]
        self.block_names = [b.name for b in blocks]
        self.fuser = nn.ModuleDict({_key(b.name): GatedSelfAttentionDense(
            b.attn1.to_q.in_features, c.context_dim, b.attn1.heads, b.attn1.to_q.out_features // b.attn1.heads) for b in blocks})
        self.grounding = GroundingNet(vision_cfg.width, c.context_dim, (vision_cfg.image_size // vision_cfg.patch_size) ** 2)
        self.mlp = MLP(vision_cfg.projection_dim, text_encoder.cfg.width, text_encoder.cfg.width)
        self.text_encoder = copy.deepcopy(text_encoder).float().requires_grad_(True)
        self.text_encoder.text_projection = None  # the UNet reads hidden states; a pooled projection would get no gradient
        # unet_store_cross_attention_scores(layers=5): down_blocks.1-2, mid, up_blocks.1-2 = every attn2 below
        # the full latent resolution (11 on SD1/SD2, at 32/16/8/16/32 for 64x64 latents; card §6.1)
        self.loss_layers = [l.name for l in layers if l.res < 64]

    def encode_text(self, ids, cls=None, valid=None):
        """The fused text encoder (card §5): the k-th "sks" of a row takes the row's k-th valid subject
        embedding `cls` (b, 2, width), before the position embeddings are added."""
        emb = self.text_encoder.embed(ids)
        if cls is not None:
            sks = ids == SKS_ID
            bad = (sks.sum(1) != valid.sum(1)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"prompt {bad[0]} has {int(sks[bad[0]].sum())} 'sks' token(s) for "
                                 f"{int(valid[bad[0]].sum())} subject(s); each subject needs exactly one.")
            order = torch.argsort((~valid).int(), dim=1, stable=True)  # valid slots first, in slot order
            slot = order.gather(1, (sks.cumsum(1) - 1).clamp(0, MAX_SUBJECTS - 1))
            rows = cls.gather(1, slot[..., None].expand(-1, -1, cls.shape[-1]))
            emb = torch.where(sks[..., None], rows.to(emb.dtype), emb)
        return self.text_encoder(ids, emb)[0]


@contextlib.contextmanager
def install(method: SubjectDiffusion, unet: sdm.UNetModel, cond: dict):
    """Make `unet` the Subject-Diffusion UNet while inside: it takes [z_t ; m] (5 channels), attn2 K/V
    carry their deltas, the fusers read the object tokens cond["objs"] (b, 2n, ctx) and, when
    cond["maps"] is a dict, the localisation layers store their attention probabilities in it by layer
    name. The hooks read `cond` at call time, so one `install` can stay open over many steps; keep it
    open over the backward too: gradient checkpointing re-runs the blocks, hooks included, and the
    re-run overwrites the same entries (idempotent)."""
    conv, stash = unet.input_blocks[0][0], {}

    def split(module, args):  # keep the latent for the frozen kernel, the whole input for the delta
        if args[0].shape[1] != conv.in_channels + 1:
            raise ValueError(f"the Subject-Diffusion UNet takes {conv.in_channels} latent channels + 1 location "
                             f"channel, got {args[0].shape[1]} channels.")
        stash["x"] = args[0]
        return (args[0][:, : conv.in_channels],)

    handles = [conv.register_forward_pre_hook(split),
               conv.register_forward_hook(lambda m, a, out: out + method.conv_in(stash["x"]))]
    for n in method.kv_names:
        w = method.kv[_key(n)]
        handles.append(unet.get_submodule(n).register_forward_hook(lambda m, a, out, w=w: out + F.linear(a[0], w)))

    def record(attn, q, k, v):
        if cond.get("maps") is None:
            return F.scaled_dot_product_attention(q, k, v)
        out, cond["maps"][attn.name] = sdm.attention_with_probs(attn, q, k, v)
        return out

    fuse = lambda block, x, ctx: method.fuser[_key(block.name)](x, cond["objs"])
    try:
        with sdm.hooked(unet, after_attn1=fuse), sdm.hooked(unet, processor=record, where=lambda n: n in method.loss_layers):
            yield cond
    finally:
        for h in handles:
            h.remove()


# ---- 2. Conditions, loss and guidance.


def location_mask(boxes, valid, size: tuple[int, int], latent: tuple[int, int]):
    """m (card §3): 1 - box per subject, multiplied over the subjects, at image size (pixel centres),
    then nearest-resized to the latent as transforms.Resize(NEAREST) does. boxes in [0, 1]."""
    H, W = size
    ys = (torch.arange(H, device=boxes.device) + 0.5)[:, None]
    xs = (torch.arange(W, device=boxes.device) + 0.5)[None, :]
    b = boxes[..., None, None]
    inside = (xs >= b[..., 0, :, :] * W) & (xs < b[..., 2, :, :] * W) & (ys >= b[..., 1, :, :] * H) & (ys < b[..., 3, :, :] * H)
    m = torch.prod(1 - (inside & valid[..., None, None]).float(), dim=1, keepdim=True)
    return F.interpolate(m, size=latent, mode="nearest")


def dropout_masks(r, cfg: TrainConfig):
    """Classifier-free dropout from one uniform draw per sample (training_step l.603-612):
    [0, p1) text, [p1, p1 + p2) text and location, [p1 + p2, p1 + p2 + p3) location."""
    drop_text = r < cfg.p_drop_text + cfg.p_drop_both
    drop_loc = (r >= cfg.p_drop_text) & (r < cfg.p_drop_text + cfg.p_drop_both + cfg.p_drop_location)
    return drop_text, drop_loc


def localization_loss(maps: dict, segmaps, sks_idx, valid):
    """FastComposer's balanced L1 (card §6.3) on the "sks" token and the entity word two tokens before it,
    per layer: mean_{b,head} sum_k v_k [mean A over background - mean A over the mask] / sum_k v_k,
    averaged over the layers. -1 when the token attends only inside its mask, +1 only outside."""
    idx = torch.cat([sks_idx, sks_idx - 2], 1)  # "the {entity} is sks": the entity word is at sks - 2
    v = valid.repeat(1, 2).float()
    idx = torch.where(v > 0, idx, 0)
    seg, total = segmaps.float().repeat(1, 2, 1, 1), segmaps.new_zeros((), dtype=torch.float32)
    for p in maps.values():
        b, heads, n, _ = p.shape
        side = math.isqrt(n)
        m = rearrange(F.interpolate(seg, size=(side, side), mode="bilinear", antialias=True), "b k h w -> b 1 (h w) k")
        a = p.gather(3, idx[:, None, None, :].expand(b, heads, n, idx.shape[1]))
        l = (a * (1 - m)).sum(2) / ((1 - m).sum(2) + 1e-5) - (a * m).sum(2) / (m.sum(2) + 1e-5)
        total = total + ((l * v[:, None]).sum(-1) / (v.sum(-1, keepdim=True) + 1e-5)).mean()
    return total / max(1, len(maps))


def guide(eps_c, eps_i, eps_u, text_scale: float, image_scale: float):
    """Three-way classifier-free guidance (test.py l.455): text on top of image on top of nothing."""
    return eps_u + text_scale * (eps_c - eps_i) + image_scale * (eps_i - eps_u)


def training_loss(method: SubjectDiffusion, sd: sdm.StableDiffusion, vision: sdm.CLIPVisionModel, batch: dict,
                  cfg: TrainConfig, empty_ids, cond: dict):
    """L (card §6.4) for one micro-batch, inside `install(method, sd.unet, cond)`; every random number
    comes with the batch (see `Records`)."""
    dev, b = sd.device, len(batch["pixels"])
    with torch.no_grad():  # frozen VAE and image tower (the code lets gradients flow into them, then discards them)
        dist_ = sd.vae.encode(batch["pixels"].to(dev, sd.vae.quant_conv.weight.dtype))
        z0 = (dist_.mean + dist_.std * batch["vae_noise"].to(dev, dist_.mean.dtype)).float() * sd.vae.scale_factor
        tokens, pooled = vision(vision.preprocess(batch["entity"].flatten(0, 1).to(dev)).to(vision.visual_projection.weight.dtype))
    t, noise, valid = batch["t"].to(dev), batch["noise"].to(dev), batch["valid"].to(dev)
    drop_text, drop_loc = dropout_masks(batch["r"].to(dev), cfg)
    cls = method.mlp(pooled.float()).unflatten(0, (b, MAX_SUBJECTS))
    keep_objs = valid & ~drop_loc[:, None] if cfg.drop_objects else valid
    objs = method.grounding(tokens.float().unflatten(0, (b, MAX_SUBJECTS)), keep_objs, batch["boxes"].to(dev))
    ctx = method.encode_text(batch["ids"].to(dev), cls, valid)
    ctx = torch.where(drop_text[:, None, None], method.encode_text(empty_ids.to(dev)), ctx)
    m = batch["location"].to(dev) * (~drop_loc).float()[:, None, None, None]  # dropped location = all-zero channel
    cond.update(objs=objs, maps={})
    out = sd.unet(torch.cat([sd.schedule.q_sample(z0, t, noise), m], 1), t, ctx)
    mse = F.mse_loss(out.float(), sd.schedule.target(z0, noise, t).float())
    attn = localization_loss(cond["maps"], batch["segmaps"].to(dev), batch["sks_idx"].to(dev), valid & ~drop_text[:, None])
    return mse + cfg.attn_loss_weight * attn, mse.detach(), attn.detach()


class Objective(nn.Module):
    """The loss as a module, because DistributedDataParallel synchronises the gradients of the module it
    wraps; the frozen backbone is held outside the module tree, so DDP neither broadcasts nor syncs it."""

    def __init__(self, method, sd, vision, cfg, empty_ids):
        super().__init__()
        self.method, self.frozen, self.cfg, self.empty_ids, self.cond = method, (sd, vision), cfg, empty_ids, {}

    def forward(self, batch):
        return training_loss(self.method, *self.frozen, batch, self.cfg, self.empty_ids, self.cond)


# ---- 3. Data: the record format, entity images, a world-size-independent shard sampler.


# What a record can lack; each is explained once and counted in log.jsonl, cumulatively over the run (carried
# over on --resume). The counts are events: a bad record is counted each time a batch draws it.
SKIPS = {
    "unreadable": "a record could not be read (missing or corrupt image or json); it is skipped",
    "bad_mask": "a record's label map (mask.png, or the png beside a jpg) is not a one-channel label map of its image's size; the record is skipped",
    "no_boxes": "a record has no object boxes; it is skipped (every training image needs a subject box)",
    "box_outside": "an object's box is missing, outside its image or empty; that object is ignored",
    "entity_missing": "an object's label is not one whole word of the caption; that object is ignored",
    "box_filtered": "an object's box is outside the area/aspect limits (--min-box-area ...); that object is ignored",
    "no_subject": "a record has no usable subject left; it is skipped",
    "caption_sks": "a caption already contains 'sks', the token that carries the image; the record is skipped",
    "truncated": "a caption is so long that a subject's ', the <entity> is sks' clause was cut at 77 tokens; that subject is dropped",
    "extra_subjects": f"a record has more than {MAX_SUBJECTS} usable subjects; the first {MAX_SUBJECTS} that pass post_verify's "
                      f"checks are kept (MAX_NUM_OBJECTS), the rest are ignored",
}


class Skip(Exception):
    pass


def _png(data: bytes, rgb: bool = True):
    """8-bit RGB as sd_model.load_image makes it (16-bit scaled, not clipped; alpha on white; no EXIF turn, which
    the label map, made from the stored pixels, would not follow), or the raw label map."""
    return np.asarray(sdm.load_image(io.BytesIO(data), exif=False) if rgb else Image.open(io.BytesIO(data)))


def _box(o) -> np.ndarray | None:
    """An object's "box" as 4 finite floats; None for anything else (a hand-written json can hold anything)."""
    try:
        box = np.asarray(o["box"], dtype=np.float64)
    except (TypeError, KeyError, ValueError):
        return None
    return box if box.shape == (4,) and np.isfinite(box).all() else None


MEMBERS = ("image", "json", "labels")  # a record's three roles
PHOTO_EXTS = ("jpg", "jpeg", "webp")
FILE_EXTS = (*PHOTO_EXTS, "png", "json", "mask.png")


def roles(exts) -> dict:
    """{role: extension} of a record's files. Two layouts: ours (`png` image, `mask.png` label map) and the
    official labeller's (card §7.4: a `jpg` photo beside a `png` label map); a photo makes the png a label map."""
    exts = set(exts)
    photo = next((e for e in PHOTO_EXTS if e in exts), None)
    image, labels = (photo, "png" if "png" in exts else "mask.png") if photo else ("png", "mask.png")
    return {r: e for r, e in zip(MEMBERS, (image, "json", labels)) if e in exts}


def scan_tar(tar) -> np.ndarray | None:
    """(records, 6) int64: offset and size of each record's image, json and label map (-1: none), the records
    sorted by key; None for an unreadable tar. Reading the member headers is the cost: one seek a member."""
    members, size, key, end = {}, Path(tar).stat().st_size if Path(tar).is_file() else 0, None, 0
    try:
        with tarfile.open(tar) as tf:
            for m in tf:  # streamed: a shard cut short (a copy that stopped) keeps the records before the cut
                key, _, ext = Path(m.name).name.partition(".")
                members.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
                end = m.offset_data + -(-m.size // 512) * 512
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError("cut short")
        if members and size - end < 1024:  # no end-of-archive blocks: cut at a member boundary, which tarfile reads as the end
            raise tarfile.ReadError("cut short")
    except (tarfile.TarError, OSError):
        members.pop(key, None)  # the record the cut went through may lack a member
        if not members:
            return None
        warnings.warn(f"shard '{tar}' is cut short; the records before the cut are used.", stacklevel=2)
    found = {k: {r: v[e] for r, e in roles(v).items()} for k, v in members.items()}
    keys = sorted(k for k, v in found.items() if "json" in v and "image" in v)
    return np.array([[x for r in MEMBERS for x in found[k].get(r, (-1, -1))] for k in keys], np.int64).reshape(-1, 6)


def _stamp(path):
    """What says a shard is unchanged since it was indexed: its size and modification time."""
    with contextlib.suppress(OSError):
        st = Path(path).stat()
        return [st.st_size, st.st_mtime_ns]


def read_tar_index(path) -> dict:
    """{tar: (stamp, rows or None)} from an index file `write_tar_index` wrote; {} if there is none."""
    if not path or not Path(path).is_file():
        return {}
    with np.load(path) as f:
        if "jpg_labels" not in f:  # written before jpg + png-label-map records were read: rescan
            return {}
        meta, rows = json.loads(str(f["meta"])), f["rows"]
    return {t: (stamp, None if n < 0 else rows[a:a + n]) for t, stamp, a, n in meta}


def write_tar_index(path, entries: dict) -> None:
    """Every shard's member table in one .npz, written atomically, so that the next run (a resume, or the
    other processes of this one) reads it instead of every tar's headers."""
    meta, parts, a = [], [], 0
    for t, (stamp, rows) in entries.items():
        meta.append([t, stamp, a, -1 if rows is None else len(rows)])
        if rows is not None:
            parts.append(rows)
            a += len(rows)
    rows = np.concatenate(parts) if parts else np.zeros((0, 6), np.int64)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), rows=rows, jpg_labels=np.ones(()))
    sdm.atomic_write(path, write)


def json_objects(rec) -> list | None:
    """The json's object list: "objects", or "mask" as the official labeller names it (card §7.4), less its
    {"value": 0, "label": "background"} entry (the label map's background, with no box: not an object)."""
    objects = rec.get("objects", rec.get("mask")) if isinstance(rec, dict) else None
    if not isinstance(objects, list):
        return None
    return [o for o in objects if not (isinstance(o, dict) and o.get("value") == 0 and "box" not in o)]


def json_boxes(rec: dict, W: int, H: int) -> list:
    """Every usable box of the json, clipped to the image, chosen or not: transform() crops to hold the span
    of all of them (card §7.4), not only of the subjects verify_keys kept."""
    out = []
    for box in map(_box, json_objects(rec) or []):
        if box is not None:
            x1, y1, x2, y2 = np.clip(box, 0, [W, H, W, H])
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                out.append((x1, y1, x2, y2))
    return out


class Records(torch.utils.data.Dataset):
    """Training records: `{key}.png` (RGB), `{key}.json` and optional `{key}.mask.png`, loose in a folder
    or as members of webdataset-style `.tar` shards (toy_world.py make-records writes both forms); or the
    official labeller's `{key}.jpg` photo, `{key}.json` and `{key}.png` label map.

    json: {"caption": str, "objects": [{"value": k, "label": entity word in the caption,
    "box": [x1, y1, x2, y2] pixels, x2/y2 exclusive}, ...]}; the mask is a label map (k = object k,
    0 = background); without it the boxes serve as masks. The official labeller's json (card §7.4) reads as
    it is: its "mask" list for "objects", its background entry left out, its "logit"s filtered (> 0.3) and
    ordered (highest first). Unreadable shards are skipped and counted.
    Items are (index, epoch, position): every random number of a sample (crop, entity-image
    augmentation, noise, timestep, dropout draw) is drawn from a generator seeded by
    (seed, epoch, position), so the data do not depend on the number of processes or on resuming.
    """

    def __init__(self, paths, cfg: TrainConfig, size: int, latent: int, z_channels: int, clip_size: int, pad_id: int,
                 verbose: bool = True, index: str | Path | None = None, write_index: bool = True):
        self.cfg, self.size, self.latent, self.zc, self.clip_size, self.verbose = cfg, size, latent, z_channels, clip_size, verbose
        self.pad_id = pad_id
        bg = Path(cfg.backgrounds) if cfg.backgrounds else None  # checked first: a refusal writes no shard index
        self.bg_files = sorted(q for q in bg.iterdir() if q.is_file() and not q.name.startswith(".")) if bg and bg.is_dir() else []
        if bg and not self.bg_files:
            raise ValueError(f"--backgrounds '{bg}' is not a folder of background images.")
        # A compact index, since every rank holds all of it (the paper's 76 M records): per shard its source
        # and first record; per tar record the (offset, size) of its image, json and label-map members (-1: none),
        # 48 bytes; keys only for loose folders. self.shards are ranges, the unit the sampler shuffles.
        self.bad_shards, self._warned, sources, starts, offsets, self.loose_keys = [], set(), [], [0], [], {}
        cached, scanned = read_tar_index(index), {}
        for p in map(Path, paths):
            tars = [p] if p.suffix == ".tar" else sorted(p.glob("*.tar")) if p.is_dir() else None
            if tars is None:
                raise FileNotFoundError(f"training data '{p}' is neither a folder nor a .tar shard.")
            if not tars:
                names = {q.name.lower() for q in p.iterdir()}
                keys = sorted(q.name[:-5] for q in p.glob("*.json"))
                keys = [k for k in keys if "image" in roles(e for e in FILE_EXTS if f"{k}.{e}".lower() in names)]
                self.loose_keys[len(sources)] = keys
                sources.append(str(p)), starts.append(starts[-1] + len(keys))
                offsets.append(np.full((len(keys), 6), -1, np.int64))
            for tar in tars:
                stamp = _stamp(tar)
                if stamp is not None and cached.get(str(tar), (None,))[0] == stamp:
                    rows = cached[str(tar)][1]
                else:
                    rows = scanned[str(tar)] = (stamp, scan_tar(tar))[1]
                if rows is None:
                    self.bad_shards.append(str(tar))
                    self._say(f"skipping shard '{tar}': not a readable tar file; "
                              f"{len(self.bad_shards)} shard(s) skipped so far, training goes on.", str(tar))
                    continue
                sources.append(str(tar)), starts.append(starts[-1] + len(rows))
                offsets.append(rows)
        self._index = (index, {**cached, **{t: (_stamp(t), r) for t, r in scanned.items()}}) if index and scanned else None
        self.sources, self.starts = sources, np.array(starts)
        self.offsets = np.concatenate(offsets) if offsets else np.zeros((0, 6), np.int64)
        self.shards = [range(a, b) for a, b in zip(starts, starts[1:])]
        if not len(self):
            raise ValueError(f"no training records in {', '.join(map(str, paths))}; write {{key}}.png/.json"
                             "(/.mask.png) or {key}.jpg/.json/.png files, or .tar shards of them (python toy_world.py make-records).")
        self.tokenizer = sdm.CLIPTokenizer()
        self.save_index() if write_index else None  # after the check: refused data leave no index behind

    def save_index(self):
        """Write the shard index, when this Records scanned a shard the index did not hold (train: once the data passed)."""
        if self._index:
            write_tar_index(*self._index)

    def _say(self, msg, key):
        if self.verbose and key not in self._warned:
            self._warned.add(key)
            print(f"warning: {msg}", file=sys.stderr)

    def __len__(self):
        return len(self.offsets)

    def locate(self, i):
        """(source, key or None, its place in the shard, row of member offsets) of record i."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        keys, j = self.loose_keys.get(shard), int(i - self.starts[shard])
        return self.sources[shard], None if keys is None else keys[j], j, self.offsets[i]

    def name(self, i) -> str:
        src, key, j, _ = self.locate(i)
        return f"{src}/{key}" if key is not None else f"record {j} of {src}"

    def read(self, i):
        src, key, _, row = self.locate(i)

        def get(role):  # a loose file, or a tar member read at its offset
            if key is not None:
                files = {e: q for e in FILE_EXTS for q in (Path(src) / f"{key}.{e}", Path(src) / f"{key}.{e.upper()}")
                         if q.is_file()}
                ext = roles(files).get(role)
                return None if ext is None else files[ext].read_bytes()
            off, size = row[2 * MEMBERS.index(role): 2 * MEMBERS.index(role) + 2]
            if off >= 0:
                with open(src, "rb") as f:
                    f.seek(int(off))
                    return f.read(int(size))

        try:
            rec, mask = json.loads(get("json")), get("labels")
            image, labels = _png(get("image")), None if mask is None else _png(mask, rgb=False)
        except Exception as e:  # any reason a record cannot be decoded
            raise Skip("unreadable") from e
        if labels is not None and labels.shape != image.shape[:2]:  # an RGB or resized mask would not line up
            raise Skip("bad_mask")
        return image, rec, labels

    def __getitem__(self, item):
        index, epoch, pos = item
        rng = np.random.default_rng([self.cfg.seed, epoch, pos])
        skips = dict.fromkeys(SKIPS, 0)
        for attempt in range(len(self)):  # a bad record hands over to the next one, deterministically
            try:
                sample = self.make((index + attempt) % len(self), rng, skips)
                sample["skips"] = torch.tensor(list(skips.values()), dtype=torch.float32)
                return sample
            except Skip as e:
                skips[e.args[0]] += 1
                self._say(SKIPS[e.args[0]] + f" (first: {self.name((index + attempt) % len(self))}).", e.args[0])
        raise ValueError("none of the training records has a usable subject; check the boxes and labels.")

    def subjects(self, rec, W, H, skips):
        """verify_keys (card §7.4): clip boxes, the label must be a caption word, area and w/h limits,
        no near-duplicate box (intersection / smaller area > 0.8); every candidate, by descending detector
        logit where the json has them (the official order), else in record order. `make` keeps at most two."""
        cfg, chosen = self.cfg, []
        if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str):
            raise Skip("unreadable")
        objects = json_objects(rec)
        if not objects:
            raise Skip("no_boxes")
        logit = lambda o: o.get("logit") if isinstance(o, dict) and isinstance(o.get("logit"), (int, float)) else None
        if any(logit(o) is not None for o in objects):  # the official order: descending detector logit
            objects = sorted(objects, key=lambda o: -logit(o) if logit(o) is not None else math.inf)  # stable
        for o in objects:
            box = _box(o)
            x1, y1, x2, y2 = (0, 0, 0, 0) if box is None else np.clip(box, 0, [W, H, W, H])
            if x2 - x1 < 1 or y2 - y1 < 1:
                skips["box_outside"] += 1
                shown = str(o.get("box") if isinstance(o, dict) else o)[:60]
                self._say(SKIPS["box_outside"] + f" (first: box {shown} in a {W}x{H} image).", "box_outside")
                continue
            label = str(o.get("label", "")).strip()  # one word (the card), matched by the sampler's own rule
            if label.split() != [label] or not has_word(rec["caption"], label):  # "" splits to []
                skips["entity_missing"] += 1
                continue
            area, aspect = (x2 - x1) * (y2 - y1) / (W * H), (x2 - x1) / (y2 - y1)
            if not (cfg.min_box_area < area < cfg.max_box_area and cfg.min_box_aspect < aspect < cfg.max_box_aspect) \
                    or (logit(o) is not None and logit(o) <= cfg.min_box_logit):
                skips["box_filtered"] += 1
                continue
            inter = lambda b: max(0, min(x2, b[2]) - max(x1, b[0])) * max(0, min(y2, b[3]) - max(y1, b[1]))
            if any(inter(b) / min((x2 - x1) * (y2 - y1), (b[2] - b[0]) * (b[3] - b[1])) > 0.8 for b, _, _ in chosen):
                continue
            value = o.get("value")  # a label-map value; anything else falls back to the box as the mask
            chosen.append(((x1, y1, x2, y2), label, value if isinstance(value, (int, float)) else None))
        if not chosen:
            raise Skip("no_subject")
        return chosen

    def make(self, i, rng, skips):
        image, rec, labels = self.read(i)
        H, W = image.shape[:2]
        chosen = self.subjects(rec, W, H, skips)
        caption = rec["caption"].strip()
        if SKS_ID in self.tokenizer.tokenize(caption):
            raise Skip("caption_sks")
        s, corner, R = min(W, H), [], self.size
        px = np.array([b for b, _, _ in chosen] + json_boxes(rec, W, H))
        for lo, hi, n in zip(px[:, 2:].max(0) - s, px[:, :2].min(0), (W, H)):  # transform(): a random square crop
            lo, hi = max(0, math.ceil(lo)), min(n - s, math.floor(hi))  # holding every box of the json, else the centre
            corner.append(int(rng.integers(lo, hi + 1)) if lo <= hi else (n - s) // 2)
        x0, y0 = corner
        img = np.asarray(Image.fromarray(image[y0:y0 + s, x0:x0 + s]).resize((R, R), Image.BILINEAR))
        lab = None if labels is None else np.asarray(Image.fromarray(labels[y0:y0 + s, x0:x0 + s]).resize((R, R), Image.NEAREST))
        boxes, segs, words = np.zeros((MAX_SUBJECTS, 4), np.float32), np.zeros((MAX_SUBJECTS, R, R), np.float32), []
        for j, ((x1, y1, x2, y2), label, value) in enumerate(chosen):
            if len(words) == MAX_SUBJECTS:  # post_verify stops at the first two candidates that pass its checks
                skips["extra_subjects"] += len(chosen) - j
                self._say(SKIPS["extra_subjects"] + ".", "extra_subjects")
                break
            box = np.clip(np.array([x1 - x0, y1 - y0, x2 - x0, y2 - y0]) / s, 0, 1)
            w, h = box[2] - box[0], box[3] - box[1]
            # post_bbox_filter: the cropped box keeps > 200 px at 512, and h/w (verify_keys had w/h) in the limits
            if w * h * 512**2 <= 200 or not self.cfg.min_box_aspect < h / max(w, 1e-9) < self.cfg.max_box_aspect:
                skips["box_filtered"] += 1
                continue
            k, (a, b, c, d) = len(words), np.round(box * R).astype(int)
            boxes[k], segs[k, b:d, a:c] = box, 1  # the box is the mask when the record has none
            if lab is not None and value is not None and (lab == value).any():
                segs[k] = lab == value
            words.append(label)
        if not words:
            raise Skip("no_subject")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut prompt is counted below instead
            ids = self.tokenizer([caption + "".join(f", the {w} is sks" for w in words)], pad_id=self.pad_id)[0]
        sks = (ids == SKS_ID).nonzero().flatten()
        if len(sks) < len(words):
            skips["truncated"] += len(words) - len(sks)
            if not len(sks):
                raise Skip("no_subject")
            words, boxes[len(sks):], segs[len(sks):] = words[: len(sks)], 0, 0
        n, lat, boxes_t = len(words), self.latent, torch.from_numpy(boxes)
        valid = torch.arange(MAX_SUBJECTS) < n
        entity = torch.zeros(MAX_SUBJECTS, 3, self.clip_size, self.clip_size)  # absent slots stay zero images
        for k in range(n):
            entity[k] = sdm.image_to_tensor(self.entity_image(img, segs[k], boxes[k], self.background(rng), rng))
        return {"pixels": sdm.image_to_tensor(Image.fromarray(img)), "ids": ids, "boxes": boxes_t, "valid": valid,
                "sks_idx": torch.cat([sks[:n], torch.zeros(MAX_SUBJECTS - n, dtype=torch.long)]),
                "segmaps": torch.from_numpy(segs), "entity": entity,
                "location": location_mask(boxes_t[None], valid[None], (R, R), (lat, lat))[0],
                "noise": torch.from_numpy(rng.standard_normal((self.zc, lat, lat), dtype=np.float32)),
                "vae_noise": torch.from_numpy(rng.standard_normal((self.zc, lat, lat), dtype=np.float32)),
                "t": torch.tensor(int(rng.integers(0, 1000))), "r": torch.tensor(float(rng.random()))}

    def background(self, rng):
        """A random background at CLIP size: a --backgrounds image, else the least-occupied of 8 random
        square crops of another record, its object pixels filled with the crop's mean background colour."""
        S = self.clip_size
        path = self.bg_files[int(rng.integers(len(self.bg_files)))] if self.bg_files else None
        try:
            img = sdm.load_image(path) if path else None
        except ValueError as e:  # an unreadable file among the backgrounds: a record's crop instead, said once
            img = self._say(f"{e} A crop of another record stands in for it (--backgrounds).", "background")
        if img is not None:
            s = min(img.size)
            x, y = int(rng.integers(img.size[0] - s + 1)), int(rng.integers(img.size[1] - s + 1))
            return np.asarray(img.crop((x, y, x + s, y + s)).resize((S, S), Image.BILINEAR))
        try:
            image, rec, labels = self.read(int(rng.integers(len(self))))
        except Skip:
            return np.full((S, S, 3), 127, np.uint8)
        H, W = image.shape[:2]
        occupied = labels > 0 if labels is not None else np.zeros((H, W), bool)
        if labels is None:  # another record, not vetted by `subjects`: json_boxes takes any json
            for x1, y1, x2, y2 in json_boxes(rec, W, H):
                occupied[int(y1):int(y2), int(x1):int(x2)] = True
        best = None
        for _ in range(8):
            s = int(rng.integers(max(1, min(W, H) // 2), min(W, H) + 1))
            x, y = int(rng.integers(W - s + 1)), int(rng.integers(H - s + 1))
            cover = occupied[y:y + s, x:x + s].mean()
            if best is None or cover < best[0]:
                best = (cover, x, y, s)
        _, x, y, s = best
        crop, occ = image[y:y + s, x:x + s].astype(np.float32), occupied[y:y + s, x:x + s]
        if occ.any():
            crop[occ] = crop[~occ].mean(0) if (~occ).any() else 127
        return np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((S, S), Image.BILINEAR))

    def entity_image(self, img, seg, box, bg, rng):
        """synthesize() (card §2.3): the box crop of the subject, scaled so it fills about half the canvas,
        pasted at a random place with its soft mask as alpha, then RandomHorizontalFlip(0.5),
        RandomRotation(10) and RandomPerspective(0.5, p=0.5), black fill as torchvision's."""
        S, R = self.clip_size, img.shape[0]
        x1, y1, x2, y2 = np.round(box * R).astype(int)
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        h, w = y2 - y1, x2 - x1
        scale = math.sqrt(S * S / 2 / (h * w))
        nh, nw = min(S, max(1, round(h * scale))), min(S, max(1, round(w * scale)))
        crop = np.asarray(Image.fromarray(img[y1:y2, x1:x2]).resize((nw, nh), Image.BILINEAR), np.float32)
        alpha = np.asarray(Image.fromarray(seg[y1:y2, x1:x2].astype(np.float32)).resize((nw, nh), Image.BILINEAR))[..., None]
        top, left = int(rng.integers(S - nh + 1)), int(rng.integers(S - nw + 1))
        out = bg.astype(np.float32)
        out[top:top + nh, left:left + nw] = alpha * crop + (1 - alpha) * out[top:top + nh, left:left + nw]
        pil = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        pil = pil.rotate(float(rng.uniform(-10, 10)), Image.NEAREST, fillcolor=(0, 0, 0))
        if rng.random() < 0.5:  # torchvision RandomPerspective.get_params, then the homography output -> input
            d, hw, hh = 0.5, S // 2, S // 2
            end = [(rng.integers(0, int(d * hw) + 1), rng.integers(0, int(d * hh) + 1)),
                   (rng.integers(S - int(d * hw) - 1, S), rng.integers(0, int(d * hh) + 1)),
                   (rng.integers(S - int(d * hw) - 1, S), rng.integers(S - int(d * hh) - 1, S)),
                   (rng.integers(0, int(d * hw) + 1), rng.integers(S - int(d * hh) - 1, S))]
            start = [(0, 0), (S - 1, 0), (S - 1, S - 1), (0, S - 1)]
            A = [[x, y, 1, 0, 0, 0, -u * x, -u * y] for (x, y), (u, _) in zip(end, start)] + \
                [[0, 0, 0, x, y, 1, -v * x, -v * y] for (x, y), (_, v) in zip(end, start)]
            coeffs = np.linalg.solve(np.array(A, np.float64), np.array([u for u, _ in start] + [v for _, v in start], np.float64))
            pil = pil.transform((S, S), Image.PERSPECTIVE, coeffs.tolist(), Image.BILINEAR, fillcolor=(0, 0, 0))
        return pil


def elastic(ckpt, cfg: TrainConfig, world: int) -> TrainConfig:
    """A resume on another number of processes continues the same run when the global micro-batch (processes x
    --train-batch-size) is the same: the record order is global, so each process then starts at its share of
    it. The settings check then compares the checkpoint's own per-process batch; both numbers are read from the
    checkpoint (its folder's args.json is the last start's, which may not have reached a checkpoint)."""
    from safetensors import safe_open

    w0, b0 = world, cfg.train_batch_size  # checkpoints written before the world size was stored: as here
    with contextlib.suppress(Exception):
        with safe_open(str(Path(ckpt) / "subject_diffusion.safetensors"), "pt") as f:
            w0 = int(f.metadata()["world_size"])
        with safe_open(str(Path(ckpt) / "training_state.safetensors"), "pt") as f:
            b0 = int(json.loads(f.metadata()["args"])["train_batch_size"])
    if w0 == world:
        return cfg
    if b0 * w0 != cfg.train_batch_size * world:
        raise ValueError(f"'{ckpt}' was trained on {w0} process(es) x --train-batch-size {b0} and this run is {world} x "
                         f"{cfg.train_batch_size}: another global batch, another run. Keep {b0 * w0} a micro-batch"
                         + (f" (--train-batch-size {b0 * w0 // world})." if b0 * w0 % world == 0 else "."))
    return replace(cfg, train_batch_size=b0)


class ShardSampler(torch.utils.data.Sampler):
    """DistributedSampler semantics with shards as the unit of shuffling: each epoch permutes the shards
    and the records inside each shard (seeded by seed and epoch), concatenates them, cuts the order to
    a multiple of the global micro-batch, and process r reads every world-th position from r. The
    order is the same for any number of processes, so a global batch is too; `start` (records already
    read by this process) makes --resume continue exactly where the run stopped."""

    def __init__(self, shards: list[list[int]], world: int, rank: int, seed: int, global_batch: int, start: int = 0):
        self.shards, self.world, self.rank, self.seed, self.start = shards, world, rank, seed, start
        self.per_rank = sum(map(len, shards)) // global_batch * global_batch // world
        if not self.per_rank:
            raise ValueError(f"fewer records ({sum(map(len, shards))}) than one global batch ({global_batch}).")

    def __iter__(self):
        epoch, k = divmod(self.start, self.per_rank)
        while True:
            g = np.random.default_rng([self.seed, epoch])
            order = np.concatenate([g.permutation(self.shards[s]) for s in g.permutation(len(self.shards))])
            for j in range(k, self.per_rank):
                yield int(order[self.rank + j * self.world]), epoch, self.rank + j * self.world
            epoch, k = epoch + 1, 0


# ---- 4. Weights: our files, and the official layout (widened conv_in, fusers inside the UNet).


def save_method(method: SubjectDiffusion, folder, metadata: dict) -> None:
    """subject_diffusion.safetensors (everything new: adapters, GroundingNet, MLP_cls, the conv_in and K/V
    deltas) and text_encoder.safetensors (the fine-tuned text encoder, Hugging Face key names)."""
    state = method.state_dict()
    meta = {"method": "subject_diffusion", **metadata}
    sdm.save_safetensors({k: v for k, v in state.items() if not k.startswith("text_encoder.")},
                         Path(folder) / "subject_diffusion.safetensors", meta)
    sdm.save_safetensors({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")}, Path(folder) / "text_encoder.safetensors", meta)


def widened_state_dict(method: SubjectDiffusion, unet: sdm.UNetModel) -> dict:
    """The UNet as the official code holds it (card §3, §4.2): conv_in with 5 input channels, attn2 K/V with
    the deltas merged in, each block's `fuser.*` (GLIGEN names); in this project's LDM key names."""
    out = {k: v.detach().float().clone() for k, v in unet.state_dict().items()}
    w, b = "input_blocks.0.0.weight", "input_blocks.0.0.bias"
    out[w] = F.pad(out[w], (0, 0, 0, 0, 0, 1)) + method.conv_in.weight.detach().float()
    out[b] += method.conv_in.bias.detach().float()
    for n in method.kv_names:
        out[n + ".weight"] += method.kv[_key(n)].detach().float()
    for name in method.block_names:
        out.update({f"{name}.fuser.{k}": v.detach().float() for k, v in method.fuser[_key(name)].state_dict().items()})
    return out


@torch.no_grad()
def load_widened(method: SubjectDiffusion, unet: sdm.UNetModel, state: dict) -> None:
    """The inverse of `widened_state_dict`: deltas = widened weights - the base model's. The file holds the whole UNet, of
    which only these parts were trained: its frozen weights must be this base model's (up to the rounding of either's
    precision), or the deltas would sit on another model's weights (they were not compared)."""
    base, dev = unet.state_dict(), unet.out[2].weight.device
    got = lambda k: state[k].to(dev).float()  # the file is read on the CPU and the base may be on a GPU (a device error)
    w = state["input_blocks.0.0.weight"]
    if w.shape[1] != unet.cfg.in_channels + 1:
        raise ValueError(f"this UNet's conv_in has {w.shape[1]} input channels, not the {unet.cfg.in_channels + 1} of Subject-Diffusion.")
    method.conv_in.weight.copy_(got("input_blocks.0.0.weight") - F.pad(base["input_blocks.0.0.weight"].float(), (0, 0, 0, 0, 0, 1)))
    method.conv_in.bias.copy_(got("input_blocks.0.0.bias") - base["input_blocks.0.0.bias"].float())
    for n in method.kv_names:
        method.kv[_key(n)].copy_(got(n + ".weight") - base[n + ".weight"].float())
    for name in method.block_names:
        p = f"{name}.fuser."
        method.fuser[_key(name)].load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
    trained = {"input_blocks.0.0.weight", "input_blocks.0.0.bias", *(n + ".weight" for n in method.kv_names)}
    for k, v in base.items():  # after the trained parts: another architecture is a shape error there
        if k in state and k not in trained and v.is_floating_point():
            eps = max(torch.finfo(state[k].dtype).eps if state[k].is_floating_point() else 0, torch.finfo(v.dtype).eps)
            if state[k].shape != v.shape or (got(k) - v.float()).abs().max() > 2 * eps * v.float().abs().max() + 1e-8:
                raise ValueError(f"the UNet's frozen weights ({k}) are not this base model's: the weights were trained on "
                                 "another one; pass that one as --pretrained-model.")


OFFICIAL_PARTS = ("unet", "clip_text", "mlp", "proj")  # train.py saves unet_/clip_text_/mlp_/proj_{epoch}_{step}


def export_official(method: SubjectDiffusion, unet: sdm.UNetModel, folder, metadata: dict | None = None) -> None:
    """unet/ clip_text/ mlp/ proj/, each model.safetensors; the headers keep our training facts
    (drop_objects above all: it decides the unconditional branch at sampling, §9.7)."""
    keep = {k: v for k, v in (metadata or {}).items()
            if k in ("base_model", "variant", "image_encoder", "drop_objects", "clip_skip", "step")}
    for part, state in zip(OFFICIAL_PARTS, (widened_state_dict(method, unet), method.text_encoder.state_dict(),
                                            method.mlp.state_dict(), method.grounding.state_dict())):
        sdm.save_safetensors(state, Path(folder) / part / "model.safetensors", {"format": "pt", **keep})


def official_parts(folder) -> dict:
    """part -> its folder: `export_official`'s unet/ clip_text/ mlp/ proj/, or the official train.py's
    unet_{ep}_{step}/ clip_text_{ep}_{step}/ ... (card §7.2), the latest of them; {} if neither."""
    folder = Path(folder)
    if (folder / "unet").is_dir():
        return {p: folder / p for p in OFFICIAL_PARTS}
    saves = [tuple(map(int, m.groups())) for d in folder.glob("unet_*_*") if (m := re.fullmatch(r"unet_(\d+)_(\d+)", d.name))]
    if not saves:
        return {}
    ep, step = max(saves)
    return {p: folder / f"{p}_{ep}_{step}" for p in OFFICIAL_PARTS}


def official_metadata(folder) -> dict:
    """The header of an exported unet/model.safetensors; for the official code's own pickles, what its
    training did: grounding tokens never dropped (drop_objects False, §9.7), so its unconditional
    branch is zeros after GroundingNet."""
    from safetensors import safe_open

    f = official_parts(folder)["unet"] / "model.safetensors"
    if f.exists():
        with safe_open(str(f), "pt") as h:
            return {"drop_objects": "False", **(h.metadata() or {})}  # exports before drop_objects was written: unknown
    return {"drop_objects": "False"}


def import_official(method: SubjectDiffusion, unet: sdm.UNetModel, folder) -> None:
    """Read `export_official` folders, or the official code's own (diffusers UNet keys, pytorch_model.bin)."""
    import weights_convert as wc

    parts = official_parts(folder)

    def read(part):
        for stem in ("model", "pytorch_model"):
            with contextlib.suppress(FileNotFoundError, KeyError):
                return wc.folder_weights(parts[part], stem)
        raise FileNotFoundError(f"'{parts.get(part, Path(folder) / part)}' holds no weights (model.safetensors or pytorch_model.bin).")

    u = read("unet")
    load_widened(method, unet, wc.diffusers_unet_to_ldm(u, unet.cfg) if "conv_in.weight" in u else u)
    method.text_encoder.load_state_dict(wc.hf_clip_layout(read("clip_text"), "text_model."))
    method.mlp.load_state_dict(read("mlp"))
    method.grounding.load_state_dict(read("proj"))


def check_base(sd: sdm.StableDiffusion, path: str) -> None:
    """The method is defined on SD 1.x/2.x UNets (card §2.1): one text encoder, whose states the fused text replaces,
    and no added vector condition. An SDXL base (two towers, y = pooled text + size ids) failed at the first UNet call."""
    if sd.cfg.text2 is not None or sd.cfg.unet.adm_in_channels:
        raise ValueError(f"'{path or 'the toy model'}' is an SDXL model, and Subject-Diffusion runs on SD 1.x/2.x bases only "
                         "(one text encoder, no added size/pooled-text condition); pass an SD 1.x or 2.x model.")


def load_trained(weights, pretrained_model: str = "", image_encoder: str = "", precision: str = "fp32", device: str = "",
                 compile: bool = False, channels_last: bool = False, vae_precision: str = "", variant: str = "", vae: str = "",
                 clip_skip: int = 1):
    """(sd, vision, method, metadata) from a training output folder (or one of its checkpoint-N), or an
    official-layout folder; the base model defaults to the one the weights were trained on."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    folder = Path(weights)
    ours, text = folder / "subject_diffusion.safetensors", folder / "text_encoder.safetensors"
    if not ours.exists() and not official_parts(folder):
        ckpts = sorted(folder.glob("checkpoint-*/subject_diffusion.safetensors"), key=lambda f: int(f.parent.name.split("-")[1]))
        raise FileNotFoundError(f"'{folder}' holds no Subject-Diffusion weights (subject_diffusion.safetensors, or the official "
                                "unet/ clip_text/ mlp/ proj/ folders, or unet_EP_STEP/ ...); " + (
                                    f"its run has not finished: pass its latest checkpoint, '{ckpts[-1].parent}'." if ckpts else
                                    "pass the output folder of `train`."))
    state = None
    if ours.exists():  # read before the models load: a missing or cut file is one sentence, not a traceback at the end
        if not text.exists():
            raise FileNotFoundError(f"'{folder}' has subject_diffusion.safetensors but not text_encoder.safetensors, the fine-tuned "
                                    "text encoder written beside it; copy both files.")
        try:
            with safe_open(str(ours), "pt") as f, safe_open(str(text), "pt") as g:
                meta = f.metadata() or {}
                if meta != (g.metadata() or {}):  # save_method writes one header into both (a stop between them: two runs)
                    raise ValueError(f"subject_diffusion.safetensors and text_encoder.safetensors in '{folder}' come from "
                                     f"different runs or steps (step {meta.get('step')} and {(g.metadata() or {}).get('step')}); "
                                     "use a checkpoint-N folder, whose two files belong together.")
            state = {**load_file(str(ours)), **{"text_encoder." + k: v for k, v in load_file(str(text)).items()}}
        except SafetensorError as e:
            raise ValueError(f"the weights in '{folder}' are not readable safetensors files (cut short by a copy?): {e}.") from None
    else:
        meta = official_metadata(folder)
    device = sdm.pick_device(device)
    variant = variant or ("" if pretrained_model else meta.get("variant", ""))  # the recorded one belongs to the recorded base
    sd = sdm.load_model(pretrained_model or meta.get("base_model", ""), precision, vae_precision or ("fp32" if precision == "fp16" else ""),
                        device, variant, compile, channels_last, vae, clip_skip)
    check_base(sd, pretrained_model or meta.get("base_model", ""))
    vision = sdm.StableDiffusion.load_image_encoder(image_encoder or meta.get("image_encoder") or pretrained_model
                                                    or meta.get("base_model") or None, device, sdm.DTYPES[precision])
    method = SubjectDiffusion(sd.unet, sd.text_encoder, vision.cfg)
    try:  # a missing key (KeyError) or a wrong shape (RuntimeError) means another base model or image encoder
        if state is not None:
            method.load_state_dict(state)
        else:
            import_official(method, sd.unet, folder)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"the weights in '{folder}' do not fit this base model / image encoder ({' '.join(str(e).split())[:300]}).") from None
    return sd, vision, method.to(device, sdm.DTYPES[precision]).eval().requires_grad_(False), meta


# ---- 5. Training: single process or torchrun + DistributedDataParallel.


AGREED = {e.__name__: e for e in (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)}  # main() says these


@contextlib.contextmanager
def together(world: int, device):
    """Run the block on every process, then agree: all go on, or all stop with the first failed process's error. A
    check or read that failed on one process alone (its own records, files or memory) left the others waiting in their
    next collective (gloo: a 'connection closed by peer' traceback; NCCL: a hang until the timeout). The cost when
    all went well is one all_reduce of a flag; the message travels only on failure."""
    error = None
    try:
        yield
    except Exception as e:  # any error: re-raised below, on every process
        error = e
    if world > 1:
        flag = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(flag)
        if flag.item():
            said = [None] * world
            dist.all_gather_object(said, None if error is None else (type(error).__name__, str(error)))
            rank, (kind, msg) = next((r, x) for r, x in enumerate(said) if x)
            error = error or (AGREED[kind](msg) if kind in AGREED else RuntimeError(f"process {rank} stopped: {kind}: {msg}"))
    if error is not None:
        raise error


def train(cfg: TrainConfig) -> SubjectDiffusion:
    """The card's recipe (§7). Written here rather than on sd_model.train_loop, which is single-process:
    one process per GPU (torchrun), DDP gradient all-reduce (no_sync inside an accumulation), logs and
    checkpoints on rank 0 with sd_model's save_checkpoint / load_checkpoint / lr_lambda. All randomness
    comes with the data (`Records`), so N processes x B equals 1 process x N*B, and --resume is exact. What can fail on
    one process alone (a check, a record, a write of rank 0) runs in `together`, so that all processes stop with its sentence."""
    if cfg.p_drop_text + cfg.p_drop_both + cfg.p_drop_location > 1:  # the three bands of one draw (card §7.3)
        raise ValueError(f"--p-drop-text, --p-drop-both and --p-drop-location are shares of one draw and must sum to at most 1 "
                         f"(got {cfg.p_drop_text + cfg.p_drop_both + cfg.p_drop_location:g}).")
    if cfg.min_box_area >= cfg.max_box_area or cfg.min_box_aspect >= cfg.max_box_aspect:
        raise ValueError(f"the box limits leave no box: --min-box-area {cfg.min_box_area} must be below --max-box-area "
                         f"{cfg.max_box_area}, and --min-box-aspect {cfg.min_box_aspect} below --max-box-aspect {cfg.max_box_aspect}.")
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available() and not cfg.device.startswith("cpu")
    device = cfg.device or (f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    main, out = rank == 0, Path(cfg.output_dir)
    with together(world, device):  # every check and load: each process's own files and memory, so agreed on
        sd, vision, method, model, resume_from = prepare(cfg, device, out)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None)
    params = [p for p in method.parameters() if p.requires_grad]
    accum, micro_global = cfg.gradient_accumulation_steps, cfg.train_batch_size * world
    lr = cfg.learning_rate * (micro_global * accum if cfg.scale_lr else 1)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sdm.lr_lambda(cfg))
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=cfg.mixed_precision == "fp16")
    tensors = dict(method.state_dict(keep_vars=True))
    R = cfg.resolution or sd.cfg.image_size
    records = lambda: Records(cfg.data, cfg, R, R // sd.vae.downsample_factor, sd.cfg.vae.z_channels, vision.cfg.image_size,
                              sd.cfg.text.pad_id, verbose=main, index=out / "records_index.npz", write_index=False)
    with together(world, device):  # rank 0 indexes the shards first and writes the index the others read ...
        start = sdm.load_checkpoint(resume_from, tensors, opt, sched, None, scaler, elastic(resume_from, cfg, world)) if resume_from else 0
        if main:
            data = records()
            sampler = ShardSampler(data.shards, world, rank, cfg.seed, micro_global, start * accum * cfg.train_batch_size)
            data.save_index()  # ... once the data passed the checks: a refused run leaves no index (a new folder) behind
    with together(world, device):  # the sampler's check too: 'fewer records than one global batch' came after args.json
        if not main:
            data = records()
            sampler = ShardSampler(data.shards, world, rank, cfg.seed, micro_global, start * accum * cfg.train_batch_size)
    with together(world, device):
        if main:  # after every check (the checkpoint's, the data's, on all processes): a refused run removes and changes nothing
            sdm.start_run(out, cfg, resume_from, keep=("records_index.npz",))  # the shard index stays: it checks its tars
            args = json.dumps({**asdict(cfg), "world_size": world}, indent=1)
            sdm.atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(args))
            print("config: " + json.dumps({**asdict(cfg), "world_size": world}), file=sys.stderr)
            print(f"resumed from {resume_from} at step {start}", file=sys.stderr) if resume_from else None
            sdm.trim_log(out, start) if resume_from else None  # first: a line cut by the stop would not parse
    with together(world, device):
        skipped = torch.zeros(len(SKIPS))
        if resume_from and (out / "log.jsonl").exists():  # the counts so far: the log line of the step resumed from
            lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
            at = [r for r in lines if r.get("step") == start]
            skipped = torch.tensor([float(at[-1].get("skipped", {}).get(k, 0)) if at else 0.0 for k in SKIPS])
    loader = iter(torch.utils.data.DataLoader(data, cfg.train_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                              pin_memory=cuda, persistent_workers=cfg.num_workers > 0))
    meta = {"base_model": cfg.pretrained_model, "image_encoder": cfg.image_encoder, "drop_objects": str(cfg.drop_objects),
            "resolution": str(R), "clip_skip": str(cfg.clip_skip), "variant": cfg.variant}  # an SD 2.x single file needs it
    amp = torch.autocast(torch.device(device).type, sdm.DTYPES[cfg.mixed_precision], enabled=cfg.mixed_precision != "no")
    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.max_train_steps), desc="train", initial=start, total=cfg.max_train_steps, disable=not main)
    last_good = resume_from
    cond, hooks = (model.module if world > 1 else model).cond, contextlib.ExitStack()
    hooks.enter_context(install(method, sd.unet, cond))  # open over forward and backward (see `install`)
    for step in bar:
        t0, stats = time.perf_counter(), torch.zeros(3 + len(SKIPS), device=device)
        for micro in range(accum):
            with model.no_sync() if world > 1 and micro + 1 < accum else contextlib.nullcontext():
                with together(world, device):  # a record or a forward that fails on one process: before the gradient all-reduce
                    batch = next(loader)
                    with amp:
                        loss, mse, attn = model(batch)
                scaler.scale(loss / accum).backward()
            stats += torch.cat([torch.stack([loss.detach(), mse, attn]).float() / accum, batch["skips"].sum(0).to(device)])
        if world > 1:
            dist.all_reduce(stats)
            stats[:3] /= world
        if not torch.isfinite(stats[0]):  # every rank sees the reduced loss, so all stop together
            raise FloatingPointError(f"the loss became {stats[0].item()} at step {step}; the last good checkpoint is "
                                     f"{last_good or 'none'}. Try --mixed-precision bf16 or no, or a lower learning rate.")
        if cfg.max_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(opt)
        scaler.update()
        if not scaler.is_enabled() or scaler.get_scale() >= scale:  # fp16: a step skipped for inf/NaN gradients
            sched.step()  # leaves the LR schedule where it was (accelerate's rule)
        opt.zero_grad(set_to_none=True)
        skipped += stats[3:].cpu()
        done = step + 1 == cfg.max_train_steps
        with together(world, device):  # rank 0's writes and validation: a full disk there stops every process
            if main:
                logs = {"step": step + 1, "loss": stats[0].item(), "mse": stats[1].item(), "attn": stats[2].item(),
                        "lr": sched.get_last_lr()[0], "images_per_s": round(micro_global * accum / (time.perf_counter() - t0), 3),
                        "skipped": {k: int(v) for k, v in zip(SKIPS, skipped) if v}, "unreadable_shards": len(data.bad_shards),
                        **({"peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if cuda else {})}
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(logs) + "\n")
            if cfg.checkpointing_steps and ((step + 1) % cfg.checkpointing_steps == 0 or done):
                ckpt = last_good = out / f"checkpoint-{step + 1}"
                if main:
                    save_method(method, ckpt, {**meta, "step": str(step + 1), "world_size": str(world)})
                    sdm.save_checkpoint(ckpt, step + 1, tensors, opt, sched, None, scaler, cfg)
                    old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                    for p in old[: -cfg.checkpoints_total_limit] if cfg.checkpoints_total_limit else []:
                        shutil.rmtree(p)
            if main and cfg.validation_prompt and cfg.validation_subject and ((step + 1) % cfg.validation_steps == 0 or done):
                hooks.close()  # generate installs its own
                with amp:
                    images, _ = generate(method, sd, vision, cfg.validation_prompt,
                                         [Subject(sdm.load_image(cfg.validation_subject), cfg.validation_entity.strip())],
                                         n=cfg.num_validation_images, steps=25, drop_objects=cfg.drop_objects,
                                         generator=torch.Generator().manual_seed(0), progress=False)
                sdm.save_image(sdm.image_grid(sdm.tensor_to_images(images)), out / "validation" / f"step-{step + 1:06d}.png")
                hooks.enter_context(install(method, sd.unet, cond))
    hooks.close()
    with together(world, device):
        if main:
            save_method(method, out, {**meta, "step": str(cfg.max_train_steps)})
    if world > 1:
        dist.destroy_process_group()
    return method


def prepare(cfg: TrainConfig, device: str, out: Path):
    """train's checks, in order (the cheap ones before the models load), and its models; writes nothing."""
    if not cfg.data:
        raise ValueError("no training data: pass --data FOLDER_OR_SHARDS (python toy_world.py make-records writes some).")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed-precision {cfg.mixed_precision}: use no, fp16 or bf16.")
    if not cfg.validation_prompt and (cfg.validation_subject or cfg.validation_entity):
        print("note: --validation-subject/--validation-entity do nothing without --validation-prompt.", file=sys.stderr)
    if cfg.validation_prompt:  # else validation would be skipped without a word, or fail at the first grid
        if not cfg.validation_subject or not cfg.validation_entity.strip():
            raise ValueError("--validation-prompt needs --validation-subject IMAGE and --validation-entity WORD "
                             "(the word of the prompt the subject is, e.g. 'dog').")
        if not Path(cfg.validation_subject).is_file():
            raise FileNotFoundError(f"--validation-subject '{cfg.validation_subject}' does not exist.")
        sdm.load_image(cfg.validation_subject)  # unreadable: one sentence now, not at the first validation
        try:  # the prompt too: 'sks' in it, or too long with its clause
            fused_prompt(cfg.validation_prompt, [cfg.validation_entity.strip()], sdm.CLIPTokenizer())
        except ValueError as e:
            raise ValueError(f"--validation-prompt: {e}") from None
    sdm.prepare_output_dir(out, True, create=False)  # a file there: one sentence (it was '[Errno 17] File exists')
    resume_from = sdm.find_checkpoint(out, cfg.resume)
    sdm.start_run(out, cfg, resume_from, act=False, keep=("records_index.npz",))  # only the check: the folder may be refused
    torch.manual_seed(cfg.seed)
    frozen = {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)  # frozen weights in half precision
    sd = sdm.load_model(cfg.pretrained_model, frozen, "", device, cfg.variant, cfg.compile, cfg.channels_last, cfg.vae, cfg.clip_skip)
    check_base(sd, cfg.pretrained_model)  # before anything is written (it failed at step 1, after args.json)
    vision = sdm.StableDiffusion.load_image_encoder(cfg.image_encoder or cfg.pretrained_model or None, device, sdm.DTYPES[frozen])
    method = SubjectDiffusion(sd.unet, sd.text_encoder, vision.cfg).to(device)
    sd.unet.gradient_checkpointing = cfg.gradient_checkpointing
    if (cfg.resolution or sd.cfg.image_size) % sd.size_multiple:
        raise ValueError(f"--resolution must be a multiple of {sd.size_multiple} for this model (got {cfg.resolution}).")
    return sd, vision, method, Objective(method, sd, vision, cfg, sd.tokenize([""])), resume_from


# ---- 6. Inference: subject cut-out, boxes, three-way guidance, attention maps.


def load_mask(path) -> np.ndarray:
    """A subject mask (h, w) bool: the alpha of an image that has one (a cut-out: its RGB is no mask, and on white
    it would read all foreground), else gray > 127."""
    img = sdm.load_image(path)  # one sentence for an unreadable file, and the same EXIF turn as the subject photo
    with Image.open(path) as raw:
        if raw.mode in ("RGBA", "LA", "PA") or (raw.mode == "P" and "transparency" in raw.info):
            alpha = np.asarray(ImageOps.exif_transpose(raw).convert("RGBA"))[..., 3]
            if alpha.min() < 255:  # an opaque RGBA file (an editor's black-and-white mask) is read by its gray
                return alpha > 127
    return np.asarray(img.convert("L")) > 127


@dataclass
class Subject:
    image: Image.Image
    entity: str  # the word of the prompt this subject is
    box: tuple | None = None  # (x1, y1, x2, y2) as fractions of the output image; None = default_boxes
    mask: np.ndarray | None = None  # bool (h, w) over `image`; None = `cutout`


# One subject: a centred box of half the side (test.py draws one at random, ~0.41 of the side);
# two: test.py's fixed layout (50, 100, 200, 400) and (300, 100, 500, 400) on 512.
DEFAULT_BOXES = {1: [(0.25, 0.25, 0.75, 0.75)], 2: [(50 / 512, 100 / 512, 200 / 512, 400 / 512), (300 / 512, 100 / 512, 500 / 512, 400 / 512)]}


def default_boxes(k: int, H: int, W: int) -> list[tuple]:
    """DEFAULT_BOXES (a square's layout) on an H x W canvas: on its centred square, so a box keeps its shape in pixels,
    as test_subject.py's random boxes do on any canvas (scaled per axis, one subject's box was 2:1 on 1024 x 512)."""
    if H == W:
        return DEFAULT_BOXES[k]
    s = min(H, W)
    ox, oy = (W - s) / 2, (H - s) / 2
    return [((ox + x1 * s) / W, (oy + y1 * s) / H, (ox + x2 * s) / W, (oy + y2 * s) / H) for x1, y1, x2, y2 in DEFAULT_BOXES[k]]


def _grow(seed, allowed):
    """Flood-fill `seed` inside `allowed` (8-connected) by repeated 3x3 max-pooling."""
    x, a = (seed & allowed).float()[None, None], allowed.float()[None, None]
    while True:
        y = F.max_pool2d(x, 3, 1, 1) * a
        if torch.equal(y, x):
            return y[0, 0] > 0
        x = y


def cutout(image: Image.Image, work: int = 128) -> np.ndarray:
    """A simple automatic cut-out, standing in for SAM (test.py prompts it at the centre): foreground =
    pixels whose colour is far from every border pixel (Otsu threshold on that distance), closed with
    a 9x9 kernel so stripes and dots stay one piece; of its connected components (>= 1 % of the image)
    keep the most salient (largest summed distance: references need not be centred), holes filled.
    Good on plain or textured backgrounds; give --mask for cluttered ones."""
    a = torch.from_numpy(np.asarray(image.resize((work, work), Image.BILINEAR), np.float32).copy())
    border = torch.cat([a[0], a[-1], a[:, 0], a[:, -1]])
    d = torch.cdist(a.reshape(-1, 3), border).min(1).values.reshape(work, work)
    hist = torch.histc(d, 256, 0, float(d.max()) + 1e-6)
    w0, mu = hist.cumsum(0), (hist * torch.arange(256)).cumsum(0)  # Otsu: maximise the between-class variance
    between = (mu[-1] * w0 / w0[-1] - mu) ** 2 / (w0 * (w0[-1] - w0)).clamp(min=1)
    fg = (d > (int(between.argmax()) + 1) * float(d.max() + 1e-6) / 256).float()[None, None]
    fg = -F.max_pool2d(-F.max_pool2d(fg, 9, 1, 4), 9, 1, 4)[0, 0] > 0  # closing: dilate, then erode
    labels = (torch.arange(work * work, dtype=torch.float32).reshape(work, work) + 1) * fg
    while True:  # connected components: every pixel takes the largest label of its component
        nxt = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * fg
        if torch.equal(nxt, labels):
            break
        labels = nxt
    comps = [labels == v for v in labels.unique() if v > 0 and (labels == v).sum() >= 0.01 * work * work]
    if not comps:
        return np.ones(image.size[::-1], bool)
    comp = max(comps, key=lambda c: float(d[c].sum()))
    edge = torch.zeros_like(comp)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    mask = ~_grow(edge & ~comp, ~comp)  # everything the outside cannot reach: the component and its holes
    return np.asarray(Image.fromarray(mask.numpy()).resize(image.size, Image.NEAREST))


def subject_image(subject: Subject, size: int):
    """The reference as test_subject.py prepares it: the cut-out on white, cropped to the mask, padded to a square."""
    mask = subject.mask if subject.mask is not None else cutout(subject.image)
    if mask.shape != subject.image.size[::-1]:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(subject.image.size, Image.NEAREST)) > 127
    if not mask.any():
        raise ValueError(f"the mask of the '{subject.entity}' subject is empty.")
    arr = np.where(mask[..., None], np.asarray(subject.image), 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    crop = arr[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    side = max(crop.shape[:2])
    canvas = np.full((side, side, 3), 255, np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    canvas[top: top + crop.shape[0], left: left + crop.shape[1]] = crop
    return sdm.image_to_tensor(Image.fromarray(canvas), size)


def has_word(text: str, word: str) -> bool:
    """`word` is in `text` as a whole word, any case: not inside a longer one ('star' is not in 'stars'), and words that
    begin or end with punctuation count too (a \\b boundary after 'c++' or before '-x' needs a letter beside it)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I) is not None


def fused_prompt(prompt: str, entities: list[str], tokenize):
    """The ids of "<prompt>, the <entity> is sks" per subject (card §5), or one sentence for a prompt that cannot
    carry its subjects: one holding 'sks' already, one without an entity word, one the clauses push past 77 tokens.
    train checks its --validation-prompt with it before the first step (it failed at the first validation)."""
    if has_word(prompt, "sks"):
        raise ValueError(f"the prompt '{prompt}' already contains 'sks', the token Subject-Diffusion replaces with the "
                         "subject's image embedding; rephrase it.")
    for e in entities:
        if not e.strip():
            raise ValueError("each subject needs its entity word, the word of the prompt it is (e.g. --entity dog).")
        if not has_word(prompt, e):
            raise ValueError(f"the entity word '{e}' is not in the prompt '{prompt}'; each subject is tied to "
                             f"a word of the prompt (e.g. 'a {e} on the beach').")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenize([prompt + "".join(f", the {e} is sks" for e in entities)])
    if int((ids == SKS_ID).sum()) != len(entities):
        raise ValueError("the prompt is too long: with the ', the <entity> is sks' clauses it passes CLIP's 77 tokens; shorten it.")
    return ids


@torch.no_grad()
def generate(method: SubjectDiffusion, sd: sdm.StableDiffusion, vision: sdm.CLIPVisionModel, prompt: str,
             subjects: list[Subject], n: int = 1, steps: int = 50, text_scale: float = 7.5, image_scale: float = 1.5,
             sampler: str = "ddim", eta: float = 0.0, height: int | None = None, width: int | None = None,
             generator=None, use_bbox: bool = True, location: bool = True, drop_objects: bool = True,
             save_maps: bool = False, progress: bool = True):
    """n images of `prompt` with the subjects; -> (images in [-1, 1], maps or None). maps: (n, 2 per subject,
    h, w) cross-attention of the "sks" token and of the entity word, summed over the localisation layers
    and steps, normalised to [0, 1]. `location=False` leaves the layout to the prompt: an all-zero
    location channel (the dropped value of training) and null position features."""
    k = len(subjects)
    if not 1 <= k <= MAX_SUBJECTS:
        raise ValueError(f"Subject-Diffusion conditions on 1 to {MAX_SUBJECTS} subjects (two image slots); got {k}.")
    ids = fused_prompt(prompt, [s.entity for s in subjects], sd.tokenize)
    H, W = height or sd.cfg.image_size, width or sd.cfg.image_size
    if H % sd.size_multiple or W % sd.size_multiple:
        raise ValueError(f"height and width must be multiples of {sd.size_multiple} for this model (got {W}x{H}).")
    f, dev, dtype = sd.vae.downsample_factor, sd.device, sd.unet.out[2].weight.dtype
    S = vision.cfg.image_size
    entity = torch.zeros(MAX_SUBJECTS, 3, S, S)
    boxes, valid = torch.zeros(1, MAX_SUBJECTS, 4), torch.arange(MAX_SUBJECTS) < k
    for i, s in enumerate(subjects):
        entity[i] = subject_image(s, S)
        boxes[0, i] = torch.tensor(s.box or default_boxes(k, H, W)[i])
    tokens, pooled = vision(vision.preprocess(entity.to(dev)).to(dtype))
    valid, boxes = valid[None].to(dev), boxes.to(dev)  # fp32 as in training: bf16 moved box edges by a latent row
    pos = valid & location if use_bbox else valid & (k > 1) & location  # test.py's use_bbox=False rule (card §8.2)
    objs = method.grounding(tokens[None], valid, boxes, pos)
    objs_u = method.grounding(torch.zeros_like(tokens[None]), valid & False, boxes) if drop_objects else torch.zeros_like(objs)
    ctx_c = method.encode_text(ids, method.mlp(pooled)[None], valid)
    ctx_e = method.encode_text(sd.tokenize([""]))
    m = location_mask(boxes, valid, (H, W), (H // f, W // f)).to(dtype) * float(location)
    rep = lambda x: x.expand(n, *x.shape[1:])
    ctx3, m3 = torch.cat([rep(ctx_c), rep(ctx_e), rep(ctx_e)]), torch.cat([rep(m), rep(m), torch.zeros_like(rep(m))])
    objs3, total = torch.cat([rep(objs), rep(objs), rep(objs_u)]), {}
    tok = ((ids[0] == SKS_ID).nonzero() - torch.tensor([0, 2], device=dev)).flatten()  # per subject: "sks", entity word

    def model_fn(x, t, i):
        with install(method, sd.unet, {"objs": objs3, "maps": {} if save_maps else None}) as cond:
            eps_c, eps_i, eps_u = sd.unet(torch.cat([torch.cat([x] * 3).to(dtype), m3], 1), t, ctx3).float().chunk(3)
        for p in (cond["maps"] or {}).values():  # the "cond" rows, mean over heads, at the latent's size
            side = round(math.sqrt(p.shape[2] * H / W))
            a = rearrange(p[:n].mean(1)[..., tok], "b (h w) k -> b k h w", h=side)
            total["maps"] = total.get("maps", 0) + F.interpolate(a.float(), size=(H // f, W // f), mode="bilinear")
        return guide(eps_c, eps_i, eps_u, text_scale, image_scale)

    shape = (n, sd.cfg.unet.in_channels, H // f, W // f)
    latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(dev)
    z = sdm.sample_loop(model_fn, latents, sd.schedule, steps, sampler, eta, generator, progress=progress)
    maps = total.get("maps")
    if maps is not None:
        maps = maps / maps.flatten(2).amax(-1).clamp(min=1e-12)[..., None, None]
    return sd.decode_latents(z), maps


def overlay(image: Image.Image, amap) -> Image.Image:
    """An attention map (h, w) in [0, 1] over an image, in red."""
    m = np.asarray(Image.fromarray((amap.cpu().numpy() * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR), np.float32)[..., None] / 255
    return Image.fromarray((np.asarray(image, np.float32) * (1 - 0.6 * m) + np.array([255, 0, 0]) * 0.6 * m).astype(np.uint8))


# ---- 7. Command line.


@dataclass
class SampleConfig(sdm.SampleArgs):
    subject: list[str] = field(default_factory=list)  # reference image per subject (1 or 2)
    entity: list[str] = field(default_factory=list)  # the prompt's word for each subject
    box: list[float] = field(default_factory=list)  # x1 y1 x2 y2 in output pixels per subject; none = default_boxes
    mask: list[str] = field(default_factory=list)  # a mask image per subject (white = subject); none = automatic cut-out
    weights: str = ""  # output folder of `train` (or checkpoint-N, or an official-layout folder)
    image_encoder: str = ""  # "" = as trained
    guidance_scale: float = 7.5  # s_T (test.py)
    image_guidance_scale: float = 1.5  # s_I (test.py; test_subject.py uses 2.5)
    use_bbox: bool = True  # box coordinates for a single subject too (test_subject.py); off = test.py
    location: bool = True  # --no-location: layout from the prompt (no location channel, null positions)
    save_maps: bool = False  # cross-attention maps of each subject's "sks" token and entity word, as PNG overlays


def sample_main(a: SampleConfig) -> None:
    if not a.weights:
        raise ValueError("pass --weights DIR, the output folder of `subject_diffusion.py train`.")
    if not a.subject or len(a.entity) != len(a.subject):
        raise ValueError(f"give one --entity per --subject image (got {len(a.subject)} subject(s), {len(a.entity)} entity word(s)).")
    if len(a.subject) > MAX_SUBJECTS:
        raise ValueError(f"Subject-Diffusion conditions on at most {MAX_SUBJECTS} subjects (two image slots); got {len(a.subject)}.")
    if a.box and len(a.box) != 4 * len(a.subject):
        raise ValueError(f"--box takes 4 numbers (x1 y1 x2 y2, pixels) per subject: {4 * len(a.subject)}, got {len(a.box)}.")
    if a.box and not a.location:  # both would be drawn from, and the box then reached nothing
        raise ValueError("--box places the subjects and --no-location leaves their place to the prompt; drop one of them.")
    if a.mask and len(a.mask) != len(a.subject):
        raise ValueError("give one --mask per --subject, or none for the automatic cut-out.")
    if a.negative_prompt:  # it used to be accepted and ignored
        raise ValueError("Subject-Diffusion's three-way guidance has no negative prompt (its image and unconditional branches are the "
                         "empty text, card §8.2); drop --negative-prompt.")
    out = sdm.prepare_output_dir(a.output_dir, a.overwrite, create=False)  # save_image makes it: a bad input leaves none
    words = [w.strip() for w in a.entity]  # --entity ' dog' is 'dog'
    fused_prompt(a.prompt, words, sdm.CLIPTokenizer())  # the inputs first: the models take a while to load
    for flag, paths in (("--subject", a.subject), ("--mask", a.mask)):
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{flag} '{path}' does not exist.")
    refs = [sdm.load_image(path) for path in a.subject]
    masks = [load_mask(path) for path in a.mask] or [None] * len(refs)
    for path, mask in zip(a.mask, masks):  # before the models load (it was said after them)
        if not mask.any():
            raise ValueError(f"--mask '{path}' is empty: white (or opaque) pixels mark the subject.")
    sd, vision, method, meta = load_trained(a.weights, a.pretrained_model, a.image_encoder, a.precision, a.device,
                                            a.compile, a.channels_last, a.vae_precision, a.variant, a.vae, a.clip_skip)
    if a.clip_skip != (trained := int(meta.get("clip_skip", "1"))):  # 1: official weights, and ours before it was recorded
        warnings.warn(f"--clip-skip {a.clip_skip} differs from the {trained} these weights were trained with; "
                      f"pass --clip-skip {trained}.", stacklevel=2)
    H, W = a.height or sd.cfg.image_size, a.width or sd.cfg.image_size
    subjects = []
    for i, (image, word, mask) in enumerate(zip(refs, words, masks)):
        box = None
        if a.box:
            x1, y1, x2, y2 = a.box[4 * i: 4 * i + 4]
            if not (0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H):
                raise ValueError(f"box {x1:g} {y1:g} {x2:g} {y2:g} of '{word}' lies outside the {W}x{H} image (x1 < x2 <= {W}, y1 < y2 <= {H}).")
            if min(x2 - x1, y2 - y1) < (f := sd.vae.downsample_factor):  # 0.25 0.25 0.75 0.75 drew no box, silently
                raise ValueError(f"box {x1:g} {y1:g} {x2:g} {y2:g} of '{word}' is under one latent cell ({f} px) and would place "
                                 "nothing; --box takes pixels of the output image, not fractions.")
            box = (x1 / W, y1 / H, x2 / W, y2 / H)
        subjects.append(Subject(image, word, box, mask))
    g = torch.Generator(sdm.pick_device(a.device)).manual_seed(a.seed)
    images, maps = generate(method, sd, vision, a.prompt, subjects, a.batch_size, a.steps, a.guidance_scale,
                            a.image_guidance_scale, a.sampler, a.eta, H, W, g, a.use_bbox, a.location,
                            meta.get("drop_objects", "True") == "True", a.save_maps)
    for i, img in enumerate(sdm.tensor_to_images(images)):
        sdm.save_image(img, out / f"{a.seed:04d}_{i:02d}.png")
        for j, s in enumerate(subjects if maps is not None else []):
            for r, token in enumerate(("sks", s.entity)):
                sdm.save_image(overlay(img, maps[i, 2 * j + r]), out / "maps" / f"{a.seed:04d}_{i:02d}_{j}_{token}.png")
    print(f"wrote {len(images)} image(s) to {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python subject_diffusion.py {train,sample,export} [flags]; --help after a command lists its flags"
    if not argv or argv[0] not in ("train", "sample", "export"):
        sys.exit(usage)
    try:
        if argv[0] == "train":
            cfg = sdm.parse_args(TrainConfig, argv[1:], argparse.ArgumentParser(prog="subject_diffusion.py train"))
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
            train(cfg)
        elif argv[0] == "sample":
            sample_main(sdm.parse_args(SampleConfig, argv[1:], argparse.ArgumentParser(prog="subject_diffusion.py sample")))
        else:
            p = argparse.ArgumentParser(prog="subject_diffusion.py export", description="write the official layout: "
                                        "unet/ (widened conv_in, merged K/V, fusers; LDM key names), clip_text/, mlp/, proj/")
            p.add_argument("--weights", required=True)
            p.add_argument("--out", required=True)
            p.add_argument("--pretrained-model", default="")
            p.add_argument("--variant", default="", help="SD 2.x single files: sd21 (v) or sd21-base (eps); default: as trained")
            p.add_argument("--overwrite", action="store_true")  # the refusal names it
            e = p.parse_args(argv[1:])
            out = sdm.prepare_output_dir(e.out, e.overwrite, create=False)  # before the models load (it was said after them)
            sd, _, method, meta = load_trained(e.weights, e.pretrained_model, device="cpu", variant=e.variant)
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            try:  # the four parts appear together or not at all
                export_official(method, sd.unet, tmp, meta)
                shutil.rmtree(out) if e.overwrite and out.is_dir() else None
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"wrote {e.out}")
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:  # FloatingPointError: a non-finite loss
        lines = str(e).strip().splitlines()  # a DataLoader worker's error carries its whole traceback: its last line says it
        sys.exit(f"error: {lines[-1].split(': ', 1)[-1] if 'Original Traceback' in str(e) else e}")


if __name__ == "__main__":
    main()
