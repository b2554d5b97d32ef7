"""ViCo: plug-and-play visual condition for personalized text-to-image generation.

Hao, Han, Zhao, Wong, arXiv:2306.00971v2 (official code: haoosz/ViCo @ 4ac2463; method card
methods/vico.md). Textual inversion (a learned token S*, Gal et al. 2022) plus a *visual
condition*: the frozen UNet runs a second stream on the clean latent z_r of a reference image,
and at four decoder layers a new trainable transformer block lets the noisy tokens attend to the
reference tokens, restricted to the object by a mask that emerges from the reference stream's own
attention to S*.

What is implemented, with the paper's equation numbers:
  - Eq. 2-3, the image cross-attention n'_t = A_I(n̂_t, ĉ_I): n̂_t and ĉ_I are the noisy and the
    reference tokens after the frozen text block of the same layer; A_I is SD's own
    BasicTransformerBlock with C-wide keys (self-attn, cross-attn to ĉ_I, GEGLU FF; card 4.1).
    Layers: decoder SpatialTransformers with an even construction id (openaimodel.py l.563-669),
    on SD1.x output_blocks.{4,6,8,10}.1, 51,248,960 parameters (card 4.4).
  - Eq. 4-5, the mask: head-averaged reference-stream attn2 probabilities of S* per patch,
    min-max normalised, cut by the code's 9-threshold "Otsu", applied as a masked softmax.
  - Eq. 6, the regulariser: mean((a_S/max a_S - sg(a_E)/max sg(a_E))^2) per layer, summed over the
    layers, weight 5e-4 (Eq. 7). Only S* receives its gradient.
  - Training as in v1-finetune.yaml (card 8): AdamW, S* at 5e-3 x total batch, image blocks at 1e-5,
    weight decay 0.01; textual-inversion template captions; reference = another random training image.
  - Sampling: any sampler of sd_model; CFG runs the visual condition in both halves (card 9);
    several references by concatenating their tokens and masks (App. C); several concepts (App. J).

Where the official code and the paper disagree we follow the code (card 11): masked softmax
renormalised over the foreground instead of Eq. 5's M ⊙ softmax (#1; `--mask-mode multiply` gives
Eq. 5), the coarse Otsu (#2), an MSE instead of ‖·‖² (#3), EOT map detached (#4), probabilities not
logits (#5), A_I with its own self-attention (#8), PyTorch-default init, not zero (#9). We differ
from the code where it is a bug or an accident: the S*/EOT columns are gathered per sample (#10,
the code takes sample 0's at batch > 1), the reference is resized bicubically at sampling as in
training (#15), and the frozen model runs as one doubled batch [z_t; z_r] instead of two loops
(exact: every op is per sample). `--no-visual-condition` is plain textual inversion with the same
code (the paper's Table 4 baseline); `--mask-mode none` is its "TI + visual condition" row.

The reference half stops after the last image layer where that is exact (card 15): when at most one
output block follows that layer (SD 1.x, 2.x and the toy model: output_blocks.11), a pre-hook hands
that block (or `out`) the noisy rows only; the reference rows' outputs there were thrown away (7.9 %
of an SD1.5 UNet pass at 512 px). With more blocks after it the skip stacks still hold both halves, so
the batch cannot shrink, and nothing is skipped. SDXL: `check_model` refuses it (its UNet also needs
the vector condition y, and S* would need both text encoders).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

import sd_model as sdm

# Textual inversion's `imagenet_templates_small` (ldm/data/personalized.py): these 27, then the
# same with "a photo of" -> "an illustration of" and -> "a depiction of": 81 entries, 57 distinct.
_TEMPLATES_27 = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}")
IMAGENET_TEMPLATES = tuple(t.replace("a photo of", kind, 1) if t.startswith("a photo of") else t
                           for kind in ("a photo of", "an illustration of", "a depiction of") for t in _TEMPLATES_27)


@dataclass
class ViCoArgs(sdm.TrainArgs):
    """Training flags: the project's standard ones plus ViCo's, with the official defaults."""

    images: list[str] = field(default_factory=list)  # one folder per concept (two: App. J)
    init_word: list[str] = field(default_factory=list)  # one per concept, a single CLIP token (card 8)
    placeholder: list[str] = field(default_factory=list)  # default "S*" (or S1*, S2*, ...)
    output_dir: str = "outputs/vico"
    learning_rate: float = 5e-3  # S*: base_learning_rate of v1-finetune.yaml ...
    scale_lr: bool = True  # ... times the total batch (main.py --scale_lr, default True; card 11 #6)
    image_lr: float = 1e-5  # image blocks: the AdamW default in configure_optimizers, never scaled
    weight_decay: float = 0.01  # torch AdamW's default, on both groups
    reg_weight: float = 5e-4  # λ of Eq. 7 (ddpm.py l.1131)
    visual_condition: bool = True  # --no-visual-condition: plain textual inversion (Table 4, row 1)
    mask_mode: str = "renorm"  # renorm (code) | multiply (paper Eq. 5) | none (Table 4, row 2)
    zero_init_image_attn: bool = False  # zero A_I's three output Linears: exactly SD at step 0 (deviation, card 11 #9)
    templates: list[str] = field(default_factory=lambda: ["imagenet"])  # "imagenet" = TI's 81, or "a {}" ...
    seed: int = 23  # main.py --seed in the README's command
    cache_latents: bool = True  # encode each image once and sample its posterior every step (exact; --no-: every step)
    minima = {"image_lr": 0, "weight_decay": 0, "reg_weight": 0}  # floors checked by sdm.parse_args
    aliases = {"placeholder": ["placeholder_token", "token_string"], "init_word": ["initializer_token"],  # diffusers', kohya's
               "weight_decay": ["adam_weight_decay"]}


# ---- 1. The parts of ViCo that are plain functions: layers, Otsu mask, regulariser, masked attention.


def image_layers(unet: sdm.UNetModel) -> list[str]:
    """SpatialTransformers that get an image block: in the decoder, even construction id (card 2)."""
    sts = [n for n, m in unet.named_modules() if isinstance(m, sdm.SpatialTransformer)]
    return [n for i, n in enumerate(sts) if n.startswith("output_blocks") and i % 2 == 0]


def otsu_mask(a, n: int = 10):
    """The code's "Otsu" (attention.py l.66-97, card 5.3), vectorised: min-max normalise each row,
    try τ = 0.1 .. 0.9 (τ = 0 leaves the low class empty, its g is NaN and never wins), keep the first
    τ with the largest between-class variance g = w0 w1 (m0 - m1)^2, foreground = u >= τ. A constant
    row is all foreground (0/0 = NaN, and bool(NaN) is True in the code)."""
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    u = (a - lo) / (hi - lo)
    tau = torch.tensor([k / n for k in range(1, n)], dtype=u.dtype, device=u.device)
    low = u[:, None, :] < tau[:, None]  # (rows, thresholds, patches)
    n0 = low.sum(-1)
    n1 = u.shape[-1] - n0
    m0 = (u[:, None, :] * low).sum(-1) / n0
    m1 = (u[:, None, :] * ~low).sum(-1) / n1
    g = (n0 / u.shape[-1]) * (n1 / u.shape[-1]) * (m0 - m1) ** 2
    best = g.nan_to_num(-1.0).argmax(-1)  # argmax returns the first maximum: the code's strict ">"
    return (u >= tau[best][:, None]) | (hi == lo)


def attention_regularizer(a_s, a_e):
    """Eq. 6 as coded (attention.py l.368-369): MSE between the max-normalised S* and EOT maps,
    the EOT map detached, so that S* is pulled towards the whole-object attention of the EOT token."""
    a_e = a_e.detach()
    return F.mse_loss(a_s / a_s.amax(-1, keepdim=True), a_e / a_e.amax(-1, keepdim=True))


def masked_attention(attn, q, k, v, mask, mode: str = "renorm"):
    """Processor for A_I's attn2. renorm: background logits get -inf before the softmax, so the
    weights renormalise over the object (the code, attention.py l.245-252); multiply: M ⊙ softmax
    without renormalising (paper Eq. 5). mask: (b, n_keys), True = object."""
    if mode == "multiply":
        p = sdm.attention_probs(attn, q, k) * mask[:, None, None, :]
        return (p @ v.float()).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def _layer(block_name: str) -> str:
    return block_name.split(".transformer_blocks.")[0]


@dataclass
class _Call:
    """What the hooks need to know about the UNet call in flight. It stays after the call, because
    with gradient checkpointing the blocks (and these hooks) run again during backward."""

    n_refs: int
    cols: torch.Tensor  # per reference row: the column of its concept token (S*)
    eot: torch.Tensor | None  # per reference row: the first <|endoftext|> (regulariser only)
    probs: dict = field(default_factory=dict)  # layer -> head-mean attn2 probabilities of the reference rows
    reg: dict = field(default_factory=dict)  # layer -> Eq. 6 term
    masks: dict = field(default_factory=dict)  # layer -> object mask (reference rows, patches)


# ---- 2. The method's module: S* rows and the image blocks (new parameters only).


class ViCo(nn.Module):
    """S* (one fp32 row per placeholder) and the image cross-attention blocks A_I, one per image layer,
    keyed by the layer's path with "_" for "." (state-dict keys `image_blocks.output_blocks_4_1.attn1
    .to_q.weight`; `official_state_dict` gives the release's names)."""

    def __init__(self, unet: sdm.UNetModel, placeholders: list[str], token_ids: list[int], init_rows,
                 visual_condition: bool = True, mask_mode: str = "renorm", zero_init: bool = False):
        super().__init__()
        if mask_mode not in ("renorm", "multiply", "none"):
            raise ValueError(f"unknown mask mode '{mask_mode}'; use renorm, multiply or none.")
        self.placeholders, self.token_ids, self.mask_mode = list(placeholders), list(token_ids), mask_mode
        self.embeddings = nn.Parameter(init_rows.detach().float().clone())
        self.layers = image_layers(unet) if visual_condition else []
        blocks = {}
        for name in self.layers:
            a = unet.get_submodule(name).transformer_blocks[0].attn1
            # ctx_dim=None: keys and values are C-wide reference tokens, not 768-wide text (card 4.1)
            blocks[name.replace(".", "_")] = sdm.BasicTransformerBlock(a.to_q.in_features, a.heads, a.to_q.out_features // a.heads)
        self.image_blocks = nn.ModuleDict(blocks)
        if zero_init:
            for b in self.image_blocks.values():
                for lin in (b.attn1.to_out[0], b.attn2.to_out[0], b.ff.net[2]):
                    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        self.call: _Call | None = None
        self.installed = 0
        self.metadata: dict = {}  # set by load_concept: what vico.safetensors says about training

    @property
    def visual_condition(self) -> bool:
        return bool(self.layers)

    def text_rows(self, table_size: int):
        """`extra` for CLIPTextModel.embed: row (id - table_size) holds that added token's vector."""
        ids = torch.tensor(self.token_ids, device=self.embeddings.device) - table_size
        rows = self.embeddings.new_zeros(int(ids.max()) + 1, self.embeddings.shape[1])
        return rows.index_copy(0, ids, self.embeddings)

    # -- hooks on the frozen UNet (installed once by `install`, fed per call by `denoise`)

    def _text_attention(self, attn, q, k, v):
        """attn2 of the frozen block at an image layer: SDPA for the noisy rows, the explicit softmax
        for the reference rows, whose head-averaged probabilities (attention.py l.259) make the mask."""
        c = self.call
        if c is None:
            return F.scaled_dot_product_attention(q, k, v)
        m = len(q) // (c.n_refs + 1)
        with torch.autocast(q.device.type, enabled=False):  # else autocast recasts its fp32 matmul to half
            out_r, p = sdm.attention_with_probs(attn, q[m:], k[m:], v[m:])
        c.probs[_layer(attn.name)] = p.mean(1)
        return torch.cat([F.scaled_dot_product_attention(q[:m], k[:m], v[:m]), out_r])

    def _after_block(self, block, h, ctx):
        """After the frozen text block (Sec. 3.2): mask from the reference rows (Eq. 4), the
        regulariser (Eq. 6), then the noisy rows go through A_I; the reference rows pass untouched."""
        c = self.call
        if c is None:
            return h
        layer = _layer(block.name)
        m = len(h) // (c.n_refs + 1)
        x, r = h[:m], h[m:]
        p = c.probs[layer]
        rows = torch.arange(len(p), device=p.device)
        a_s = p[rows, :, c.cols]  # each row's own S* column (card 5.7: the code used sample 0's)
        if c.eot is not None:
            c.reg[layer] = attention_regularizer(a_s, p[rows, :, c.eot])
        mask = torch.ones_like(a_s, dtype=torch.bool) if self.mask_mode == "none" else otsu_mask(a_s.detach())
        c.masks[layer] = mask
        # several references: concatenate their tokens and masks along the key axis (App. C)
        ref = rearrange(r, "(k b) n c -> b (k n) c", k=c.n_refs)
        mask = rearrange(mask, "(k b) n -> b (k n)", k=c.n_refs)
        return torch.cat([self.image_attention(layer, x, ref, mask).to(r.dtype), r])

    def image_attention(self, layer: str, x, ref, mask):
        """n' = A_I(n̂, ĉ_I) with the object mask on A_I's cross-attention only (its attn1 is unmasked)."""
        block = self.image_blocks[layer.replace(".", "_")]
        with sdm.hooked(block, processor=functools.partial(masked_attention, mask=mask, mode=self.mask_mode)):
            return block(x, ref)

    @contextlib.contextmanager
    def install(self, unet: sdm.UNetModel):
        """Put the hooks on the image layers; they stay for training (backward recomputes blocks
        under gradient checkpointing) and do nothing until `denoise` gives them a call."""
        if not self.layers:
            yield
            return
        # one image block per layer, after the layer's *last* text block (card 3: ĉ_I is the reference after
        # the whole text transformer, before proj_out); its attn2 gives the mask. SD1/2 have one block per
        # layer, SDXL-like configs several: hooking every block would apply A_I after each of them.
        last = {f"{n}.transformer_blocks.{len(unet.get_submodule(n).transformer_blocks) - 1}" for n in self.layers}
        # the first module after the last image layer that takes no skip connection after it: the last
        # output block (its input is [h; skip] already) when one follows that layer, else `out`
        after = len(unet.output_blocks) - 1 - max(int(n.split(".")[1]) for n in self.layers)
        stop = {0: unet.out, 1: unet.output_blocks[-1]}.get(after)
        outermost = not self.installed  # validation inside training installs again: one pre-hook only
        handle = stop.register_forward_pre_hook(self._drop_reference_rows) if stop is not None and outermost else None
        self.installed += 1
        try:
            with sdm.hooked(unet, processor=self._text_attention, attn="attn2", after_block=self._after_block,
                            where=lambda n: n.removesuffix(".attn2") in last):
                yield
        finally:
            self.installed -= 1
            self.call = None
            if handle is not None:
                handle.remove()

    def _drop_reference_rows(self, block, args):
        """Past the last image layer the reference rows feed nothing the method reads (card 15)."""
        if self.call is None:
            return None
        m = len(args[0]) // (self.call.n_refs + 1)
        return tuple(a[:m] for a in args)

    def denoise(self, unet, x, t, context, refs, cols, eot=None):
        """eps(z_t, t, z_r, c_T) for the noisy rows; the frozen UNet runs once on [x; refs] (card 15).

        refs (R, b, 4, h, w): clean reference latents; cols (R, b): column of each reference's concept
        token; eot (b,): <|endoftext|> column, which turns on the regulariser (training). Returns
        (eps, L_reg summed over the layers)."""
        if not self.installed:
            raise RuntimeError("ViCo.denoise runs inside `with vico.install(unet):` (the hooks carry the visual condition).")
        R = len(refs)
        self.call = _Call(R, cols.reshape(-1), None if eot is None else eot.repeat(R))
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x)).repeat(R + 1)
        out = unet(torch.cat([x, *refs]), t, context.repeat(R + 1, 1, 1))
        reg = sum(self.call.reg.values()) if self.call.reg else out.new_zeros(())
        return out[: len(x)], reg  # all of `out` when the reference rows stopped early (see `install`)


# ---- 3. Tokens, weights and files: ours (safetensors) and the official release's (pickles).


def check_model(model: sdm.StableDiffusion) -> None:
    """ViCo's UNet calls pass the text context only; SDXL's UNet also needs the vector condition y, and S*
    would need a row in both text encoders. Refuse it here rather than fail deep inside a forward pass."""
    if model.cfg.text2 is not None or model.cfg.unet.adm_in_channels:
        raise ValueError("ViCo here supports SD 1.x and 2.x base models, not SDXL (it would need the vector condition y "
                         "and S* in both text encoders).")


def add_placeholders(model: sdm.StableDiffusion, placeholders: list[str]) -> list[int]:
    """Token ids of the placeholders, adding them to the tokenizer when new (an existing vocabulary
    word is refused: its pretrained meaning would leak in)."""
    ids = []
    for ph in placeholders:
        try:
            i = model.tokenizer.token_id(ph)
        except ValueError:
            i = None
        ids.append(i if i is not None and i >= model.text_encoder.token_embedding.num_embeddings
                   else model.tokenizer.add_tokens([ph])[0])
    return ids


def official_state_dict(vico: ViCo) -> dict:
    """The image blocks under the release's keys: diffusion_model.<layer>.image_cross_attention.* (card 4.4)."""
    return {f"diffusion_model.{layer}.image_cross_attention.{k}": v
            for layer in vico.layers for k, v in vico.image_blocks[layer.replace(".", "_")].state_dict().items()}


def load_image_blocks(vico: ViCo, sd: dict, what: str) -> None:
    """Official-keyed tensors into the image blocks, strictly: a key missing or left over is an error."""
    mine = official_state_dict(vico)
    missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    if missing or extra:
        raise ValueError(f"{what} does not fit this model's image layers {vico.layers}: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}).")
    for k, v in mine.items():
        if v.shape != sd[k].shape:
            raise ValueError(f"{what}: {k} has shape {tuple(sd[k].shape)}, this model needs {tuple(v.shape)}.")
        with torch.no_grad():
            v.copy_(sd[k])


def save_concept(vico: ViCo, folder, metadata: dict) -> list[Path]:
    """vico.safetensors (blocks under the official keys + `token_embeddings`), and S* in the diffusers
    (learned_embeds.safetensors, {token: (1, d)}) and A1111 (a1111/<token>.safetensors, emb_params; A1111
    names an embedding after its file, so the folder keeps the name typeable)
    formats. diffusers' loader takes one token per file, so two concepts write <token>.learned_embeds
    .safetensors each (load them with load_textual_inversion([file1, file2])). Returns the files written."""
    folder, written = Path(folder), [Path(folder) / "vico.safetensors"]
    rows = vico.embeddings.detach().float()
    meta = {"method": "vico", "placeholders": vico.placeholders, "layers": vico.layers, "mask_mode": vico.mask_mode, **metadata}
    sdm.save_safetensors({**official_state_dict(vico), "token_embeddings": rows}, folder / "vico.safetensors", meta)
    for i, p in enumerate(vico.placeholders):
        name = re.sub(r"[^\w-]", "_", p.replace("*", "star"))
        diffusers_name = "learned_embeds" if len(vico.placeholders) == 1 else f"{name}.learned_embeds"
        sdm.save_embeddings(folder / f"{diffusers_name}.safetensors", {p: rows[i : i + 1]}, "diffusers", meta)
        sdm.save_embeddings(folder / "a1111" / f"{name}.safetensors", {p: rows[i : i + 1]}, "a1111", {**meta, "token": p})
        written += [folder / f"{diffusers_name}.safetensors", folder / "a1111" / f"{name}.safetensors"]
    return written


def concept_files(folder) -> list[Path]:
    """The files an earlier `save_concept` wrote in `folder` (their metadata says method vico): what a new concept there
    replaces. Left behind, an old vico.safetensors is read as the folder's finished concept, and an old token's
    learned_embeds file sits beside the new ones."""
    folder = Path(folder)
    found = [folder / "vico.safetensors", *sorted(folder.glob("*learned_embeds.safetensors")), *sorted(folder.glob("a1111/*.safetensors"))]
    return [p for p in found if p.is_file() and _method(p) == "vico"]


def _method(path) -> str:
    """The method a safetensors file's metadata names ("" for none, or for a file that is not safetensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("method", "")
    except Exception:  # not a safetensors file
        return ""


def remove_files(paths) -> None:
    """Unlink `paths`, and a1111/ when that leaves it empty."""
    for p in paths:
        p.unlink(missing_ok=True)
        if p.parent.name == "a1111" and not any(p.parent.iterdir()):
            p.parent.rmdir()


class _ParameterDict(dict):
    """Stand-in for the nn.ParameterDict pickled in embeddings_gs-*.pt: the weights-only unpickler
    builds this instead, and it keeps the tensors of the module's `_parameters` and nothing else."""

    def __setstate__(self, state):
        self.update(state.get("_parameters") or {})


def official_folder(folder) -> Path:
    """Where a release's files are: the folder itself, or its checkpoints/ (the log folder the official
    scripts take as --ft_path: they read <ft_path>/checkpoints/cross_attention-N.pt)."""
    folder = Path(folder)
    sub = folder / "checkpoints"
    return sub if not any(folder.glob("cross_attention*.pt")) and any(sub.glob("cross_attention*.pt")) else folder


def _load_embeddings(path) -> dict:
    """An EmbeddingManager pickle (embeddings_gs-N.pt), read with the weights-only unpickler."""
    with torch.serialization.safe_globals([(_ParameterDict, "torch.nn.modules.container.ParameterDict")]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_official(folder, step: str = "") -> tuple[dict, dict, int]:
    """(image-block state dict, {string: rows}, step) from a release folder or its log folder (cross_attention-399.pt
    and embeddings_gs-399.pt; `step` picks another, "" the highest; the unnumbered cross_attention.pt + embeddings.pt,
    step -1, when nothing is numbered). Pickles are read with torch.load(weights_only=True): only tensors and
    containers, never code; the one class in the embedding file, nn.ParameterDict, is allow-listed by name as a
    passive stand-in."""
    folder = official_folder(folder)
    if step and not step.isdigit():
        raise ValueError(f"--step must be a checkpoint number such as 399 (got '{step}').")
    numbered = lambda *globs: {int(m[1]) if (m := re.search(r"-(\d+)\.pt$", p.name)) else -1: p
                               for g in globs for p in sorted(folder.glob(g))}
    # on_save_checkpoint writes embeddings_gs-N.pt and, for the latest, an unnumbered embeddings.pt
    blocks, embeds = numbered("cross_attention*.pt"), numbered("embeddings.pt", "embeddings_gs*.pt")
    pairs = sorted(blocks.keys() & embeds.keys())  # the blocks and S* of one step, never of two
    want = int(step) if step else (pairs[-1] if pairs else None)
    if want not in pairs:
        raise FileNotFoundError(f"no cross_attention{'-' + step if step else '*'}.pt with its embeddings_gs file in '{folder}' "
                                f"(steps with both: {', '.join(str(k) if k >= 0 else 'unnumbered' for k in pairs) or 'none'}).")
    files = blocks[want], embeds[want]
    try:
        blocks, emb = torch.load(files[0], map_location="cpu", weights_only=True), _load_embeddings(files[1])
        rows = {k: (v[None] if v.ndim == 1 else v).float() for k, v in dict(emb["string_to_param"]).items()}
        return {k: v.float() for k, v in blocks.items()}, rows, want
    except Exception as e:  # a truncated or foreign pickle fails in many ways (UnpicklingError, RuntimeError, KeyError ...)
        raise ValueError(f"'{files[0].name}' + '{files[1].name}' in '{folder}' are not readable official ViCo files "
                         f"({type(e).__name__}); they should be the tensor dict and the EmbeddingManager pickle.") from e


def save_official(vico: ViCo, folder, step: int, star_id: int) -> Path:
    """The release format, for the official scripts: <folder>/checkpoints/cross_attention-{step}.pt (80 tensors on
    SD1.x) and embeddings_gs-{step}.pt = {"string_to_token": {"*": id}, "string_to_param": ParameterDict}, the layout
    of a training log folder, so that `vico_txt2img.py --ft_path <folder> --load_step {step}` finds them."""
    if len(vico.placeholders) != 1:
        raise ValueError("the official format holds one placeholder ('*'); this concept has several.")
    if not vico.visual_condition:  # the official scripts load image blocks unconditionally
        raise ValueError("this concept was trained without the visual condition (plain textual inversion): it has no image "
                         "blocks for the official format; export --format vico for its learned_embeds files.")
    folder = Path(folder) / "checkpoints"
    emb = {"string_to_token": {"*": torch.tensor(star_id)}, "written_by": EXPORT_MARK,  # EmbeddingManager.load reads 2 keys
           "string_to_param": nn.ParameterDict({"*": nn.Parameter(vico.embeddings.detach().float().cpu().clone())})}
    blocks = {k: v.detach().cpu().clone() for k, v in official_state_dict(vico).items()}
    sdm.atomic_write(folder / f"cross_attention-{step}.pt", lambda tmp: torch.save(blocks, tmp))
    sdm.atomic_write(folder / f"embeddings_gs-{step}.pt", lambda tmp: torch.save(emb, tmp))
    return folder


EXPORT_MARK = "vico.py export"  # in the embeddings pickle save_official writes: what a later --overwrite may remove


def earlier_official(out, step: int | None) -> tuple[list[Path], list[Path]]:
    """An export's view of its --output-dir: (the files an earlier `export --format official` wrote in out/checkpoints/
    for another step than `step` (None: any), known by the mark in their embeddings_gs-N.pt; the official files
    there that no export of ours wrote, a training log's, at the top as well, which `sample --concept` would read
    instead of or beside the new ones)."""
    out, ours, other = Path(out), [], []
    for where in (out, out / "checkpoints"):
        for p in sorted(where.glob("*.pt")) if where.is_dir() else ():
            m = re.fullmatch(r"(cross_attention|embeddings_gs)-(\d+)\.pt", p.name)
            if m and where != out and int(m[2]) == step:
                continue  # the new export replaces it
            if m and where != out and _is_export(where / f"embeddings_gs-{m[2]}.pt"):
                ours.append(p)
            elif m or p.name.startswith(("cross_attention", "embeddings")):
                other.append(p)
    return ours, other


def _is_export(path) -> bool:
    try:
        return _load_embeddings(path).get("written_by") == EXPORT_MARK
    except Exception:  # missing, or not a pickle of ours
        return False


def _written_by(folder) -> str:
    """The method another script of this project recorded in a safetensors file of `folder` ("" if none): a DCO, DCI or
    Subject-Diffusion run given as --concept."""
    return next((m for p in sorted(Path(folder).glob("*.safetensors")) if (m := _method(p)) not in ("", "vico")), "")


def _checkpoints(folder) -> list[int]:
    """The N of our run folder's checkpoint-N/ that hold a concept, in order."""
    numbers = (q.parent.name.removeprefix("checkpoint-") for q in Path(folder).glob("checkpoint-*/vico.safetensors"))
    return sorted(int(n) for n in numbers if n.isdigit())


def load_concept(model: sdm.StableDiffusion, folder, placeholder: str = "S*", step: str = "") -> ViCo:
    """A trained concept (ours: vico.safetensors; official: the two .pt files) on `model`."""
    from safetensors import safe_open

    check_model(model)
    folder, meta, official = Path(folder), {}, False
    if step and ((folder / "vico.safetensors").exists() or any(folder.glob("checkpoint-*/vico.safetensors"))):
        # our run folder (finished or not): its checkpoint-N holds that step's concept
        if not (folder / f"checkpoint-{step}" / "vico.safetensors").exists():
            found = _checkpoints(folder)
            raise FileNotFoundError(f"no checkpoint-{step} in '{folder}' (checkpoints: {', '.join(map(str, found)) or 'none'}).")
        folder = folder / f"checkpoint-{step}"
    if (folder / "vico.safetensors").exists():
        try:
            with safe_open(str(folder / "vico.safetensors"), "pt") as f:
                meta = f.metadata()
                sd = {k: f.get_tensor(k) for k in f.keys()}
            rows, phs, mode = sd.pop("token_embeddings"), json.loads(meta["placeholders"]), meta["mask_mode"]
            vis = json.loads(meta["layers"]) != []
        except Exception as e:  # truncated (SafetensorError), or not ours: no header (TypeError), a key missing (KeyError)
            raise ValueError(f"'{folder / 'vico.safetensors'}' is not a readable ViCo concept ({type(e).__name__}); "
                             "write it again with `vico.py train` or `vico.py export --format vico`.") from e
    elif any(official_folder(folder).glob("cross_attention*.pt")):
        sd, emb, number = load_official(folder, step)
        if len(emb) != 1:
            raise ValueError(f"'{folder}' holds {len(emb)} official placeholders {list(emb)}; the official code trains one ('*').")
        rows, phs, mode, vis, official = next(iter(emb.values())), [placeholder], "renorm", True, True
        meta = {"step": json.dumps(number + 1)} if number >= 0 else {}  # file -399 holds the 400th step's weights
    elif other := _written_by(folder):
        raise FileNotFoundError(f"'{folder}' holds another method's output (its files say method {other}), not a ViCo concept "
                                "(vico.safetensors, or the official cross_attention-*.pt + embeddings_gs-*.pt); sample it with "
                                "that method's script, or give a folder `vico.py train` wrote.")
    elif found := _checkpoints(folder):
        # a run stopped before its end: only its checkpoints hold a concept
        raise FileNotFoundError(f"'{folder}' holds no finished concept, only checkpoints {', '.join(map(str, found))}; "
                                f"pick one with --step (e.g. --step {found[-1]}).")
    else:
        raise FileNotFoundError(f"'{folder}' holds no ViCo concept (vico.safetensors, or cross_attention-*.pt "
                                "+ embeddings_gs-*.pt from the official code, there or in its checkpoints/).")
    width = model.text_encoder.token_embedding.embedding_dim
    if rows.shape[-1] != width:
        raise ValueError(f"the concept's token vectors are {rows.shape[-1]} wide; this text encoder is {width} wide.")
    if rows.ndim != 2 or len(rows) != len(phs):  # e.g. a TI file with several vectors per token
        raise ValueError(f"the concept has {rows.numel() // width} token vectors for its {len(phs)} placeholder(s) {phs}; "
                         "ViCo learns one vector per placeholder.")
    try:
        ids = add_placeholders(model, phs)
    except ValueError as e:  # the official prompts' '*' is a CLIP word: the concept cannot take over its embedding row here
        if official:  # named by --placeholder
            raise ValueError(f"--placeholder '{placeholder}' is already a CLIP token, so it cannot name the concept; call the "
                             "official '*' by a new string such as S* (the default) and write 'a photo of S* on the beach'.") from e
        raise
    vico = ViCo(model.unet, phs, ids, rows, vis, mode)
    load_image_blocks(vico, sd, f"'{folder}'")
    vico.metadata = meta  # the file's metadata (JSON strings), so that `export` can keep the training facts
    return vico.to(model.device, model.unet.out[2].weight.dtype)


# ---- 4. Sampling.


def token_columns(ids, token_id: int, what: str):
    """Column of `token_id` in each row of ids (b, 77); one clear error if a prompt lacks it."""
    hit = ids == token_id
    if not hit.any(-1).all():
        raise ValueError(f"the prompt has no '{what}'; ViCo needs the concept token in it, e.g. 'a photo of {what} on the beach'.")
    return hit.int().argmax(-1)


def _cover(H: int, W: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Scale (H, W) to cover (h, w), keeping its aspect: (new height, new width, top, left) of the centred crop."""
    s = max(h / H, w / W)
    nh, nw = max(h, round(H * s)), max(w, round(W * s))
    return nh, nw, (nh - h) // 2, (nw - w) // 2


def fit_reference(img, h: int, w: int) -> torch.Tensor:
    """A reference image at the output size with its aspect kept: scaled to cover (h, w), then centre-cropped.
    The UNet runs on [z_t; z_r] as one batch (card 15), so z_r takes z_t's size; squashing distorted the object."""
    nh, nw, top, left = _cover(img.size[1], img.size[0], h, w)
    return sdm.image_to_tensor(img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + w, top + h)))


def cover(r: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`fit_reference` for a tensor (3, H, W) in [-1, 1], as `generate` takes them from Python (it squashed them)."""
    if r.shape[-2:] == (h, w):
        return r
    nh, nw, top, left = _cover(*r.shape[-2:], h, w)
    r = F.interpolate(r[None], (nh, nw), mode="bicubic", antialias=True)[0]
    return r[:, top : top + h, left : left + w].clamp(-1, 1)


def model_fn(model, vico: ViCo, cond, uncond, refs, cols, guidance_scale: float, on_step=None):
    """model_fn for sdm.sample_loop. CFG as in DDIMSampler.p_sample_ddim (card 9): x, the references
    and t are doubled, the contexts are [uc; c], and both halves use the visual condition; the
    unconditional half's mask is read at the same S* column of the "" map (a padding EOT)."""
    guided = uncond is not None and guidance_scale != 1.0

    def fn(x, t, i):
        if guided:
            t2 = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x)).repeat(2)
            eps = vico.denoise(model.unet, torch.cat([x, x]), t2, torch.cat([uncond, cond]),
                               torch.cat([refs, refs], 1), torch.cat([cols, cols], 1))[0]
        else:
            eps = vico.denoise(model.unet, x, t, cond, refs, cols)[0]
        if on_step is not None:
            on_step(i, vico.call.masks)
        if not guided:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)
    return fn


@torch.no_grad()
def generate(model, vico: ViCo, prompts, references=None, ref_tokens=None, negative_prompt: str = "", steps: int = 50,
             guidance_scale: float = 7.5, sampler: str = "ddim", eta: float = 0.0, generator=None,
             size: tuple[int, int] | None = None, on_step=None, progress: bool = True):
    """Prompts (with S*) and reference images (R, 3, H, W) in [-1, 1] -> images (b, 3, h, w).
    ref_tokens[k]: the placeholder reference k shows (default: the one placeholder in the prompts)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    h, w = size or (model.cfg.image_size, model.cfg.image_size)
    f = model.vae.downsample_factor
    rows = vico.text_rows(model.text_encoder.token_embedding.num_embeddings)
    cond = model.encode_prompt(prompts, extra=(rows, None)).context
    ids = model.tokenize(prompts)
    present = [p for p, i in zip(vico.placeholders, vico.token_ids) if (ids == i).any()]  # tokens, not substrings: S1* vs S11*
    if not present:  # a placeholder typed another way ("s*", "S *", the official "*") is a different token
        typed = " ".join(prompts).lower().replace(" ", "")
        near = next((p for p in vico.placeholders if p.lower() in typed), None)
        hint = (f" ('{near}' is past the 75 tokens a prompt holds)" if near and any(near in q for q in prompts) else
                f" ('{near}' is matched as typed: the same case, no spaces inside)" if near else
                f" (the official code's '*' is called {vico.placeholders[0]} here)" if any("*" in q.split() for q in prompts) else "")
        raise ValueError(f"the prompt has no concept token ({', '.join(vico.placeholders)}){hint}; "
                         f"e.g. 'a photo of {vico.placeholders[0]} on the beach'.")
    uncond = model.encode_prompt([negative_prompt] * len(prompts), extra=(rows, None)).context if guidance_scale != 1.0 else None
    shape = (len(prompts), model.cfg.unet.in_channels, h // f, w // f)
    x = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(model.device)
    if not vico.visual_condition:  # textual inversion: the plain UNet
        fn = model.cfg_model_fn(sdm.Cond(cond), None if uncond is None else sdm.Cond(uncond), guidance_scale)
        return model.decode_latents(sdm.sample_loop(fn, x, model.schedule, steps, sampler, eta, generator, progress=progress))
    if references is None or len(references) == 0:
        raise ValueError("this concept has a visual condition: give at least one reference image (--reference).")
    ref_tokens = list(ref_tokens or [])
    if not ref_tokens:
        if len(present) > 1:
            raise ValueError(f"the prompt has several concept tokens {present}; say which each reference shows (--reference-tokens).")
        ref_tokens = present * len(references)
    if len(ref_tokens) != len(references):
        raise ValueError(f"{len(references)} references but {len(ref_tokens)} reference tokens.")
    unknown = [tk for tk in ref_tokens if tk not in vico.placeholders]
    if unknown:
        raise ValueError(f"unknown reference token '{unknown[0]}'; this concept's tokens are: {', '.join(vico.placeholders)}.")
    cols = torch.stack([token_columns(ids, vico.token_ids[vico.placeholders.index(tk)], tk) for tk in ref_tokens])
    refs = torch.stack([model.encode_images(cover(r.float(), h, w)[None].to(model.device), generator) for r in references])
    refs = refs.expand(-1, len(prompts), -1, -1, -1)
    with vico.install(model.unet):
        fn = model_fn(model, vico, cond, uncond, refs, cols, guidance_scale, on_step)
        z = sdm.sample_loop(fn, x, model.schedule, steps, sampler, eta, generator, progress=progress)
    return model.decode_latents(z)


def mask_overlays(masks: dict, references, row_of, height: int = 128) -> dict:
    """{layer: PIL image}: each reference with its object mask (at the layer's resolution) in red, side by side."""
    out = {}
    for layer, m in masks.items():
        tiles = []
        for k, ref in enumerate(references):
            size = (height, round(height * ref.shape[-1] / ref.shape[-2]))
            rows = round((m.shape[-1] * ref.shape[-2] / ref.shape[-1]) ** 0.5)
            mk = m[row_of(k)].float().reshape(1, 1, rows, -1)
            img = F.interpolate(ref[None].float().cpu(), size, mode="bilinear", align_corners=False)[0]
            mk = F.interpolate(mk.cpu(), size, mode="nearest")[0]
            red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
            tiles.append(img * (1 - 0.5 * mk) + red * 0.5 * mk)
        out[layer] = sdm.tensor_to_images(torch.cat(tiles, -1)[None])[0]
    return out


# ---- 5. Training.


def draw_batch(g, counts: list[int], n_templates: int, batch: int):
    """(concept, image, reference, template) indices for one micro-batch: a uniform concept, a
    uniform image of it, the reference uniform among its *other* images (itself when there is one,
    as in PersonalizedBase), a uniform template. All from the generator, so resume is exact."""
    out = []
    for _ in range(batch):
        c = int(torch.randint(len(counts), (1,), generator=g))
        n = counts[c]
        i = int(torch.randint(n, (1,), generator=g))
        j = (i + 1 + int(torch.randint(n - 1, (1,), generator=g))) % n if n > 1 else i
        out.append((c, i, j, int(torch.randint(n_templates, (1,), generator=g))))
    return out


def init_token(tokenizer, word: str) -> int:
    """The id of --init-word, or one sentence: S* starts from a pretrained token's embedding (card 8), so the
    tokenizer's "or add it as a new token" does not apply; the prompt's whole words that are one token each do."""
    ids = tokenizer.tokenize(word)
    if len(ids) == 1:
        return ids[0]
    words = [w for w in word.split() if len(tokenizer.tokenize(w)) == 1]
    hint = f"one of its words ({' or '.join(repr(w) for w in words)})" if words else "a single-token word such as 'dog'"
    raise ValueError(f"--init-word '{word}' is {len(ids)} CLIP tokens, not one; S* starts from one pretrained token's "
                     f"embedding: give {hint}.")


def make_optimizer(vico: ViCo, args: ViCoArgs) -> torch.optim.AdamW:
    """configure_optimizers (ddpm.py l.1469-1494): S* at the base LR times the total batch (scale_lr),
    the image blocks at a fixed 1e-5; AdamW's default weight decay 0.01 on both."""
    scale = args.train_batch_size * args.gradient_accumulation_steps if args.scale_lr else 1
    groups = [{"params": [vico.embeddings], "lr": args.learning_rate * scale}]
    if vico.visual_condition:
        groups.append({"params": list(vico.image_blocks.parameters()), "lr": args.image_lr})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


def train(args: ViCoArgs, model: sdm.StableDiffusion | None = None) -> ViCo:
    if not args.images:
        raise ValueError("give the concept's image folder(s) with --images DIR [DIR ...].")
    if len(args.init_word) != len(args.images):
        raise ValueError(f"give one --init-word per image folder ({len(args.images)}): a word for what the concept is, e.g. 'dog'.")
    placeholders = args.placeholder or (["S*"] if len(args.images) == 1 else [f"S{i + 1}*" for i in range(len(args.images))])
    if len(placeholders) != len(args.images):
        raise ValueError(f"give one --placeholder per image folder ({len(args.images)}).")
    if not all(p.strip() for p in placeholders):
        raise ValueError(f"a --placeholder is empty ({placeholders}); give each concept a string such as S*.")
    if len(set(placeholders)) != len(placeholders):  # one token id for two concepts: one row would silently win
        raise ValueError(f"the placeholders {placeholders} repeat; give each image folder its own, e.g. S1* S2*.")
    templates = list(IMAGENET_TEMPLATES) if args.templates == ["imagenet"] else list(args.templates)
    for t in templates:  # captions are t.format(placeholder), as in TI: try it now, not at step 1 with the folder made
        try:
            ok = "\0" in t.format("\0")
        except (IndexError, KeyError, ValueError, AttributeError):  # "{} and {}", "{name}", a lone "{", "{.x}"
            ok = False
        if not ok:
            raise ValueError(f"caption template '{t}' needs one '{{}}' where the placeholder goes and no other braces "
                             "(write '{{' for a literal one), e.g. 'a photo of a {}'.")
    concepts = [sdm.load_image_folder(d) for d in args.images]
    device = sdm.pick_device(args.device)
    torch.manual_seed(args.seed)
    model = model or sdm.load_model(args.pretrained_model, args.mixed_precision, "fp32", device, args.variant,
                                    args.compile, args.channels_last, args.vae, args.clip_skip)
    check_model(model)
    for d, c in zip(args.images, concepts):
        if len(c) == 1 and args.visual_condition:
            print(f"'{d}' holds one image: it is also its own reference (as in the official code, App. C).", file=sys.stderr)
    size = args.resolution or model.cfg.image_size
    if size % model.size_multiple:
        raise ValueError(f"--resolution must be a multiple of {model.size_multiple} for this model (got {size}).")
    table = model.text_encoder.token_embedding
    init_ids = [init_token(model.tokenizer, w) for w in args.init_word]
    for ph, w, i in zip(placeholders, args.init_word, init_ids):
        print(f"{ph} initialised from the token embedding of '{w}' (id {i})", file=sys.stderr)
    token_ids = add_placeholders(model, placeholders)
    for ph, i in zip(placeholders, token_ids):  # else S* would be read at column 0 (BOS) and its row never train
        if bad := next((t.format(ph) for t in templates if (model.tokenize([t.format(ph)])[0] == i).sum() != 1), None):
            raise ValueError(f"the placeholder '{ph}' is not one token of the caption '{bad}' (spaces around it are "
                             "dropped, a caption is cut at 77 tokens); choose a placeholder such as S* and shorter templates.")
    init = table.weight[torch.tensor(init_ids, device=table.weight.device)].float()  # token only, no position (card 8)
    vico = ViCo(model.unet, placeholders, token_ids, init, args.visual_condition, args.mask_mode, args.zero_init_image_attn).to(device)
    model.unet.gradient_checkpointing = args.gradient_checkpointing

    # posterior moments of every image, once: each step then samples a fresh latent (LDM samples, card 2)
    images = [torch.stack([sdm.image_to_tensor(im, size) for _, im in c]) for c in concepts]
    encode = lambda x, chunk=0: model.vae.encode(x.to(device, model.vae.quant_conv.weight.dtype), chunk)
    latent_shape = (model.cfg.vae.z_channels, size // model.vae.downsample_factor, size // model.vae.downsample_factor)
    if args.cache_latents:
        with torch.no_grad():
            post = [(d.mean.float(), d.std.float()) for d in (encode(c, 8) for c in images)]  # 8 a pass: a small peak
    opt = make_optimizer(vico, args)
    n_blocks = sum(p.numel() for p in vico.image_blocks.parameters())
    print(f"trainable: {vico.embeddings.numel():,} (tokens, lr {opt.param_groups[0]['lr']:g}) + {n_blocks:,} (image blocks, lr "
          f"{args.image_lr:g}); layers {vico.layers or 'none: plain textual inversion'}", file=sys.stderr)
    ids_of = {p: i for p, i in zip(placeholders, token_ids)}

    def loss_fn(g):
        draws = draw_batch(g, [len(c) for c in concepts], len(templates), args.train_batch_size)
        def sample(c, i, needed=True):  # a fresh posterior sample, scaled as the UNet expects
            eps = torch.randn(latent_shape, generator=g).to(device)  # drawn even when not needed: one random stream
            if not needed:
                return None
            if args.cache_latents:
                mean, std = post[c][0][i], post[c][1][i]
            else:
                with torch.no_grad():
                    d = encode(images[c][i : i + 1])
                mean, std = d.mean[0].float(), d.std[0].float()
            return (mean + std * eps) * model.vae.scale_factor

        z0 = torch.stack([sample(c, i) for c, i, _, _ in draws])
        zr = [sample(c, j, vico.visual_condition) for c, _, j, _ in draws]  # textual inversion has no reference
        prompts = [templates[k].format(placeholders[c]) for c, _, _, k in draws]
        t = torch.randint(0, model.schedule.cfg.num_train_timesteps, (len(draws),), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        ctx = model.encode_prompt(prompts, extra=(vico.text_rows(table.num_embeddings), None)).context
        x_t = model.schedule.q_sample(z0, t, noise)
        if vico.visual_condition:
            ids = model.tokenize(prompts)
            cols = torch.stack([ids[b] == ids_of[placeholders[c]] for b, (c, *_) in enumerate(draws)]).int().argmax(-1)
            eot = (ids == model.tokenizer.eos_id).int().argmax(-1)  # the first EOT (card 5.2)
            eps, reg = vico.denoise(model.unet, x_t, t, ctx, torch.stack(zr)[None], cols[None], eot)
        else:
            eps, reg = model.unet(x_t, t, ctx), torch.zeros((), device=device)
        mse = F.mse_loss(eps.float(), model.schedule.target(z0, noise, t).float())
        return mse + args.reg_weight * reg, {"mse": mse.item(), "reg": reg.item()}

    lrs = [g["lr"] for g in opt.param_groups]  # the effective ones, after --scale-lr
    meta = {"base_model": args.pretrained_model or "toy", "init_words": args.init_word, "seed": args.seed,
            "resolution": size, "max_train_steps": args.max_train_steps, "clip_skip": args.clip_skip,
            "learning_rates": dict(zip(("tokens", "image_blocks"), lrs))}

    def save(folder):
        name = Path(folder).name
        earlier = concept_files(folder)  # an earlier run's (--overwrite keeps final outputs until they are replaced)
        written = save_concept(vico, folder, {**meta, "step": int(name.split("-")[1]) if name.startswith("checkpoint-") else args.max_train_steps})
        remove_files([p for p in earlier if p not in written])  # e.g. a one-concept run's S* files under a two-concept one

    # every concept the validation prompt names gets its first image as reference (App. J: "S1* next to S2*")
    # by token, as `generate` finds them: a substring test took an S* cut at 77 tokens, and the run failed at its
    # first validation, with its folder written
    val_ids = model.tokenize([args.validation_prompt])[0] if args.validation_prompt else None
    shown = [p for p, i in zip(placeholders, token_ids) if val_ids is not None and (val_ids == i).any()]

    def validate():
        refs = [images[placeholders.index(p)][0] for p in shown]
        out = generate(model, vico, [args.validation_prompt] * args.num_validation_images, refs, shown,
                       generator=torch.Generator().manual_seed(args.seed), size=(size, size), progress=False)
        return sdm.tensor_to_images(out)

    if args.validation_prompt and not shown:
        raise ValueError(f"the validation prompt has no concept token ({', '.join(placeholders)}) in its first 75 tokens.")
    tensors = {"embeddings": vico.embeddings, **{f"image_blocks.{k}": v for k, v in vico.image_blocks.state_dict(keep_vars=True).items()}}
    resume_from = sdm.find_checkpoint(Path(args.output_dir), args.resume)
    if resume_from is not None and (resume_from / "training_state.safetensors").exists() and not (resume_from / "vico.safetensors").exists():
        # every checkpoint of ours holds its concept; without one it is another method's, whose settings differ first
        raise ValueError(f"--resume: '{resume_from}' is not a ViCo checkpoint (no vico.safetensors; another method's run?); "
                         "use a new --output-dir.")
    with vico.install(model.unet):
        sdm.train_loop(args, opt, tensors, loss_fn, save, torch.Generator().manual_seed(args.seed), validate, device=device,
                       metadata={"placeholders": placeholders, "layers": vico.layers})
    return vico


# ---- 6. Command line: train, sample, export, toy-benchmark.


@dataclass
class ViCoSampleArgs(sdm.SampleArgs):
    concept: str = ""  # folder of a trained concept: ours (vico.safetensors) or the official release's .pt files
    reference: list[str] = field(default_factory=list)  # one or more reference images (App. C)
    reference_tokens: list[str] = field(default_factory=list)  # the placeholder each reference shows (two concepts)
    placeholder: str = "S*"  # what to call the official release's '*' in prompts
    step: str = ""  # which checkpoint: official files' number (399 = the paper's 400 steps; "" = the highest), or our checkpoint-N
    save_masks: bool = False  # masks/stepNNN_<layer>.png: each reference with its object mask, per layer and step
    output_dir: str = "outputs/vico-samples"


def read_reference(path):
    """A reference image as PIL RGB, or one sentence naming the file."""
    if Path(path).is_dir():  # a training folder given whole: each reference is its own file (App. C concatenates them)
        files = sorted(str(p) for p in Path(path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        example = f" (--reference {' '.join(files[:3])}{' ...' if len(files) > 3 else ''})" if files else ""
        raise ValueError(f"reference image '{path}' is a folder; give its image files{example}.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference image '{path}' does not exist.")
    try:
        return sdm.load_image(path)
    except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError ...)
        raise ValueError(f"reference image '{path}' is not a readable image ({type(e).__name__}).") from e


def check_concept_flag(concept: str) -> None:
    """Before the model loads: an empty --concept was read as the current folder, a missing one as holding nothing."""
    if not concept:
        raise ValueError("give the trained concept with --concept DIR (a `vico.py train` --output-dir, or the official "
                         "release's folder).")
    if Path(concept).is_file():  # e.g. its vico.safetensors: the folder also holds the official files' pair, or checkpoints
        raise ValueError(f"--concept takes the concept's folder, not a file: --concept {Path(concept).parent}")
    if not Path(concept).is_dir():
        raise FileNotFoundError(f"--concept '{concept}' does not exist.")


def sample_cli(a: ViCoSampleArgs) -> None:
    check_concept_flag(a.concept)
    ref_images = [read_reference(r) for r in a.reference]  # before the model: bad input fails in a second
    device = sdm.pick_device(a.device)
    model = sdm.load_model(a.pretrained_model, a.precision, a.vae_precision, device, a.variant, a.compile, a.channels_last, a.vae,
                           a.clip_skip)
    vico = load_concept(model, a.concept, a.placeholder, a.step)
    if (trained := int(vico.metadata.get("clip_skip", "1"))) != a.clip_skip:  # S* was learned on that layer's output
        warnings.warn(f"this concept was trained with --clip-skip {trained}; sampling with --clip-skip {a.clip_skip}.")
    if ref_images and not vico.visual_condition:
        warnings.warn("this concept is plain textual inversion (trained with --no-visual-condition): "
                      "the --reference images are not used.")
    if a.save_masks and not vico.visual_condition:
        warnings.warn("this concept is plain textual inversion (trained with --no-visual-condition): it has no object masks; "
                      "--save-masks writes none.")
    h, w = a.height or model.cfg.image_size, a.width or model.cfg.image_size
    if h % model.size_multiple or w % model.size_multiple:
        raise ValueError(f"height and width must be multiples of {model.size_multiple} for this model (got {h}x{w}).")
    refs = [fit_reference(im, h, w) for im in ref_images]
    out = sdm.prepare_output_dir(a.output_dir, a.overwrite, create=False)  # the first image makes it: a bad prompt leaves none
    guided, b = a.guidance_scale != 1.0, a.batch_size

    def on_step(i, masks):  # the conditional half of the first image; reference k's rows are block k
        row = lambda k: k * (2 * b if guided else b) + (b if guided else 0)
        for layer, img in mask_overlays(masks, refs, row).items():
            sdm.save_image(img, out / "masks" / f"step{i:03d}_{layer}.png")

    t0 = time.time()
    images = generate(model, vico, [a.prompt] * b, refs, a.reference_tokens, a.negative_prompt, a.steps, a.guidance_scale,
                      a.sampler, a.eta, torch.Generator(device).manual_seed(a.seed), (h, w), on_step if a.save_masks else None)
    for i, img in enumerate(sdm.tensor_to_images(images)):
        sdm.save_image(img, out / f"{a.seed:04d}_{i:02d}.png")
    print(f"wrote {len(images)} image(s) to {out} in {time.time() - t0:.1f} s")


# what a trained concept's metadata says about its training; `export --format vico` carries it over
TRAINING_METADATA = ("init_words", "seed", "step", "learning_rates", "resolution", "max_train_steps", "clip_skip")


def export_cli(argv) -> None:
    p = argparse.ArgumentParser(prog="vico.py export", description="convert a concept between our format and the official release's")
    p.add_argument("--concept", required=True, help="ours (vico.safetensors) or official (cross_attention-N.pt + embeddings_gs-N.pt, "
                   "or the log folder whose checkpoints/ holds them)")
    # diffusers and a1111 name the token files the vico set holds (what --format asks for in the other methods' exports)
    p.add_argument("--format", choices=("vico", "official", "diffusers", "a1111"), required=True,
                   help="vico (or diffusers, a1111: the same set): vico.safetensors + S* as diffusers learned_embeds.safetensors "
                        "and A1111 a1111/<token>.safetensors; official: OUTPUT/checkpoints/cross_attention-N.pt + "
                        "embeddings_gs-N.pt (the official scripts' --ft_path OUTPUT --load_step N)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--pretrained-model", default="", help="the base model the concept belongs to (default: the toy model)")
    p.add_argument("--variant", default="", help="SD 2.x single files: sd21 (v) or sd21-base (eps)")
    p.add_argument("--placeholder", default="S*", help="name of the official '*' token in our format")
    p.add_argument("--step", default="", help="which checkpoint to read: official files' number (default the highest), or our "
                   "run folder's checkpoint-N")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.step and not a.step.isdecimal():  # a file number (cross_attention-399.pt) or our checkpoint-N
        raise ValueError(f"--step must be a checkpoint number such as 399 (got '{a.step}').")
    check_concept_flag(a.concept)
    out = sdm.prepare_output_dir(a.output_dir, a.overwrite, create=False)  # the writers make it: a refusal leaves none
    model = sdm.load_model(a.pretrained_model, variant=a.variant)
    vico = load_concept(model, a.concept, a.placeholder, a.step)
    in_place = Path(a.concept).resolve() in (out.resolve(), (out / "checkpoints").resolve())  # its files stay
    if a.format == "official":
        # named by the last global step, as the official code names them: the weights after 400 steps -> 399; a concept
        # that records no step (converted from the unnumbered official files) -> 399, the paper's checkpoint
        step = int(json.loads(vico.metadata.get("step", "400"))) - 1
        if vico.mask_mode != "renorm":  # the official SpatialTransformer always masks, renormalising over the object
            warnings.warn(f"this concept was trained with --mask-mode {vico.mask_mode}; the official code samples it with its "
                          "own mask (renorm), which it was not trained for.")
        ours, other = earlier_official(out, step)
        other += [out / "vico.safetensors"] if (out / "vico.safetensors").exists() and not in_place else []  # read first
        if other:
            raise ValueError(f"--overwrite: '{out}' holds {', '.join(str(p.relative_to(out)) for p in other)}, which no earlier "
                             f"official export wrote and `sample --concept` would read instead of or beside step {step}; move "
                             "them away or choose another --output-dir.")
        where = save_official(vico, out, step, model.tokenizer.token_id("*"))
        print(f"official scripts: scripts/vico_txt2img.py --ft_path {out} --load_step {step} (files in {where})")
    else:
        kept = {k: v for k, v in vico.metadata.items() if k in TRAINING_METADATA}  # ours -> ours; official: its step
        ours = earlier_official(out, None)[0]  # our vico.safetensors is read first; the official scripts would take these
        earlier = concept_files(out)  # an earlier concept's token files that the new one does not write over
        written = save_concept(vico, out, {"base_model": a.pretrained_model or "toy", **kept, "converted_from": str(a.concept)})
        ours += [p for p in earlier if p not in written]
        print("diffusers (pipe.load_textual_inversion): " + ", ".join(str(p) for p in written if p.name.endswith("learned_embeds.safetensors"))
              + "; A1111 (its embeddings folder): " + ", ".join(str(p) for p in written if p.parent == out / "a1111"))
    remove_files([] if in_place else ours)  # after the new files are in place: a failed export leaves the earlier one whole
    print(f"wrote {a.format} files to {out}")


def toy_benchmark(argv) -> None:
    """ViCo and plain textual inversion on every toy concept, the same steps, captions and seed, then
    images for every eval prompt with a manifest for `python toy_world.py eval --images OUT/images`."""
    import toy_world as tw

    p = argparse.ArgumentParser(prog="vico.py toy-benchmark", description=toy_benchmark.__doc__)
    p.add_argument("--out", default="outputs/vico-toy")
    p.add_argument("--pretrained-model", default="", help="default: the toy model")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=1)
    # TI's 81 templates are mostly words the toy CLIP never read ("rendering", "depiction", "dirty"), and
    # some ("small", "large") are attributes the benchmark asks for; these two are toy captions' own.
    p.add_argument("--templates", nargs="+", default=["a photo of a {}", "a {}"], help="caption templates; 'imagenet' = TI's list")
    p.add_argument("--per-prompt", type=int, default=4, help="images per eval prompt")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--concepts", nargs="+", default=[c.id for c in tw.CONCEPTS])
    variants = {"vico": {}, "ti": {"visual_condition": False}, "vico-nomask": {"mask_mode": "none"},
                "vico-zero": {"zero_init_image_attn": True}}  # the last two: Table 4's middle row, card 11 #9
    p.add_argument("--methods", nargs="+", default=["vico", "ti"], choices=list(variants))
    a = p.parse_args(argv)
    out = Path(a.out)
    if not (out / "concepts").exists():
        tw.make_concepts(str(out / "concepts"))
    model = sdm.load_model(a.pretrained_model)
    rows, timing = [], {}
    for cid in a.concepts:
        c = tw.find_concept(cid)
        folder = out / "concepts" / cid
        reference = sdm.image_to_tensor(sdm.load_image(folder / "00.png"))  # one fixed reference per concept (Sec. 4.1)
        for method in a.methods:
            run = out / "runs" / method / cid
            if not (run / "vico.safetensors").exists():
                args = ViCoArgs(images=[str(folder)], init_word=[c.init_word()], output_dir=str(run),
                                max_train_steps=a.steps, train_batch_size=a.batch_size, checkpointing_steps=a.steps, templates=a.templates,
                                resume="latest", pretrained_model=a.pretrained_model, **variants[method])
                t0 = time.time()
                train(args, model)
                timing[f"train/{method}/{cid}"] = time.time() - t0
            vico = load_concept(model, run)
            t0 = time.time()
            for prompt in tw.eval_prompts(c):
                names = [f"{method}_{cid}_{prompt['id']}_{j}.png" for j in range(a.per_prompt)]
                if all((out / "images" / n).exists() for n in names):  # a rerun after an interruption
                    rows += [{"file": n, "concept": cid, "prompt": prompt["id"], "method": method} for n in names]
                    continue
                images = generate(model, vico, [prompt["text"].format("S*")] * a.per_prompt, [reference],
                                  steps=a.sample_steps, guidance_scale=a.guidance_scale,
                                  generator=torch.Generator().manual_seed(0), progress=False)
                for j, img in enumerate(sdm.tensor_to_images(images)):
                    name = f"{method}_{cid}_{prompt['id']}_{j}.png"
                    sdm.save_image(img, out / "images" / name)
                    rows.append({"file": name, "concept": cid, "prompt": prompt["id"], "method": method})
            timing[f"sample/{method}/{cid}"] = time.time() - t0
    if (earlier := out / "images" / "manifest.jsonl").is_file():  # a run of other methods or concepts into this --out:
        done = {(r["method"], r["concept"]) for r in rows}  # its rows stay, so that eval scores the union
        rows = [r for r in map(json.loads, filter(str.strip, earlier.read_text().splitlines()))
                if (r["method"], r["concept"]) not in done and (out / "images" / r["file"]).is_file()] + rows
    sdm.atomic_write(out / "images" / "manifest.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    sdm.atomic_write(out / "timing.json", lambda tmp: Path(tmp).write_text(json.dumps({**vars(a), **timing}, indent=1)))
    print(f"wrote {len(rows)} images; score them with: python toy_world.py eval --images {out / 'images'}")


@torch.no_grad()
def toy_masks(argv) -> None:
    """Does the object mask emerge (Sec. 3.2)? For each toy concept trained by `toy-benchmark`, the
    IoU of the Otsu mask (Eq. 4) with the ground-truth object on the concept's own references (soft: each
    patch counts by the share of it the object covers), per
    image layer and timestep, from three columns of the reference stream's attention: the trained S*,
    the init word (S* before training) and <|endoftext|> (the regulariser's target). "object" is the
    IoU of an all-foreground mask (the object's area share): the floor a mask must beat."""
    from PIL import Image

    import toy_world as tw

    p = argparse.ArgumentParser(prog="vico.py toy-masks", description=toy_masks.__doc__)
    p.add_argument("--out", default="outputs/vico-toy", help="the toy-benchmark folder (runs/vico/<concept>)")
    p.add_argument("--pretrained-model", default="", help="default: the toy model")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    p.add_argument("--prompt", default="a photo of a {}")
    p.add_argument("--concepts", nargs="+", default=[c.id for c in tw.CONCEPTS])
    a = p.parse_args(argv)
    model = sdm.load_model(a.pretrained_model)
    rows = []
    for cid in a.concepts:
        run = Path(a.out) / "runs" / "vico" / cid
        if not (run / "vico.safetensors").exists():
            raise FileNotFoundError(f"no trained concept in '{run}'; run `python vico.py toy-benchmark --out {a.out} --concepts {cid}` first.")
        c = tw.find_concept(cid)
        vico = load_concept(model, run)
        table = model.text_encoder.token_embedding.weight
        trained = vico.embeddings.detach().clone()
        init = table[model.tokenizer.token_id(c.init_word())][None].float()
        ids = model.tokenize([a.prompt.format("S*")])
        col, eot = token_columns(ids, vico.token_ids[0], "S*"), (ids == model.tokenizer.eos_id).int().argmax(-1)
        g = torch.Generator().manual_seed(0)
        for i, (scene, image) in enumerate(tw.concept_references(c)):  # the images make_concepts wrote
            truth = torch.from_numpy(tw.render(scene, image.shape[0])[1] == 1).float()[None, None]
            ref = model.encode_images(sdm.image_to_tensor(Image.fromarray(image))[None].to(model.device), g)
            for t in a.timesteps:
                for which, row in (("S*", trained), ("init word", init)):
                    vico.embeddings.data.copy_(row)
                    cond = model.encode_prompt([a.prompt.format("S*")], extra=(vico.text_rows(len(table)), None)).context
                    with vico.install(model.unet):
                        vico.denoise(model.unet, ref, t, cond, ref[None], col[None])
                        probs = dict(vico.call.probs)
                    for layer, pr in probs.items():
                        side = round(pr.shape[1] ** 0.5)
                        gt = F.adaptive_avg_pool2d(truth, side).flatten().to(pr.device)  # object share of each patch
                        cols = {which: col} if which == "init word" else {which: col, "<|endoftext|>": eot}
                        for name, k in cols.items():
                            m = otsu_mask(pr[0, :, int(k)][None])[0]
                            m = m.float()  # soft IoU: a patch half covered by the object counts half
                            rows.append({"concept": cid, "ref": i, "t": t, "layer": layer, "column": name,
                                         "iou": (torch.minimum(m, gt).sum() / torch.maximum(m, gt).sum()).item(),
                                         "recall": (torch.minimum(m, gt).sum() / gt.sum()).item(),
                                         "kept": m.mean().item(), "object": gt.mean().item()})
        vico.embeddings.data.copy_(trained)
    sdm.atomic_write(Path(a.out) / "mask_quality.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    names = ["S*", "init word", "<|endoftext|>"]
    print("| layer | t | " + " | ".join(f"IoU {n}" for n in names) + " | IoU object (all kept) | kept (S*) | object recall (S*) |")
    print("|---|---|" + "---|" * (len(names) + 3))
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for t in a.timesteps:
            sel = [r for r in rows if r["layer"] == layer and r["t"] == t]
            by = {n: [r for r in sel if r["column"] == n] for n in names}
            print(f"| {layer} | {t} | " + " | ".join(f"{mean(by[n], 'iou'):.3f}" for n in names)
                  + f" | {mean(by['S*'], 'object'):.3f} | {mean(by['S*'], 'kept'):.3f} | {mean(by['S*'], 'recall'):.3f} |")
    print(f"wrote {len(rows)} rows to {Path(a.out) / 'mask_quality.jsonl'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cmds = ("train", "sample", "export", "toy-benchmark", "toy-masks")
    if not argv or argv[0] not in cmds:
        sys.exit(f"usage: python vico.py {{{','.join(cmds)}}} [options]; add --help after a command for its flags")
    try:
        if argv[0] == "train":
            train(sdm.parse_args(ViCoArgs, argv[1:], argparse.ArgumentParser(prog="vico.py train", description="train S* and A_I")))
        elif argv[0] == "sample":
            parser = argparse.ArgumentParser(prog="vico.py sample", description="sample with a visual condition")
            sample_cli(sdm.parse_args(ViCoSampleArgs, argv[1:], parser))
        elif argv[0] == "export":
            export_cli(argv[1:])
        elif argv[0] == "toy-masks":
            toy_masks(argv[1:])
        else:
            toy_benchmark(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:  # FloatingPointError: a non-finite loss
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
