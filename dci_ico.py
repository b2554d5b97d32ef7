"""ICO fine-tuning and DCI inference (Jin et al., ECCV 2024, "Customized Generation Reimagined:
Fidelity and Editability Harmonized", arXiv:2412.04831), on sd_model.py's hooks.

ICO, Image-specific Context Optimization (training). Custom Diffusion (Kumari et al. 2023,
arXiv:2212.04488) learns concept tokens V and the cross-attention K/V projections from the caption
"photo of a V noun". ICO replaces the hand-written words around "V noun" by learnt vectors, one
set per reference image, so the things that differ between the references (background, pose) are
soaked up by those contexts instead of V (paper Eq. 2):
    t_i = [SOS] P^i_1..P^i_Lp  V_1..V_Lv  <noun>  S^i_1..S^i_Ls  [EOS]
P^i / S^i are image i's prefix / suffix contexts (never shared between images, and dropped at
inference), V the new tokens the user types, <noun> the frozen class word. Trained: V's embedding
rows, P, S (at 10x the learning rate) and every attn2.to_k / attn2.to_v, with the LDM eps-loss
(LDM Eq. 2), the SOS key/value detached as Custom Diffusion does, and optional regularization
images with their own captions filling half of each batch. `--no-contexts` is the manual-template
baseline: the same code training on "photo of a V noun" (Custom Diffusion without its augmentation).

DCI, Divide, Conquer, then Integrate (sampling). In the early steps (t/1000 > 1 - tau), a second,
auxiliary branch samples the prompt with "V noun" replaced by a common noun ("a dog in times
square"), which the base model lays out well. In every cross-attention layer the dual-branch
integration module (DBIM, Eqs. 3-5) copies the auxiliary branch's attention output into the concept
branch wherever the auxiliary prompt's context words (not its noun) attend, and keeps the concept
branch's own output where V and the noun attend; strength gamma. Later steps are plain sampling.

Where the official code (jinjianRick/DCI_ICO, card ../shared/methods/dci_ico.md) and the paper
differ, we follow the code: token re-normalisation softmax(10 A) over the real tokens and masks per
head (card 6.1), the constants 10 and 500 and gamma on the auxiliary logit (6.2), the window on
DDPM timesteps, t/1000 > 1 - tau strictly (6.3), the auxiliary branch's own initial noise and the
shared unconditional term by default (6.4), contexts at 10x the learning rate (6.6). Our own choices:
  - Position embeddings (card 2.2, 6.6). The code builds V and S^i from embeddings that carry the
    position embeddings of slots 1..Lv and 1..Ls, although they sit later in the sequence; at
    inference V gets the positions of its real slots. Here every vector gets the position embedding
    of the slot it occupies, in training as at inference (`CLIPTextModel` adds them): train and test
    agree, the ICO prompt at initialisation equals the plain prompt "A V noun ." token for token,
    and contexts are free vectors anyway. With Lp = 0, V occupies slots 1..Lv and gets the code's
    position embeddings (S^i still differs: the code gives it those of slots 1..Ls).
  - K/V are trained as fp32 deltas added by forward hooks (W x + dW x): the backbone's weights stay
    bit-identical, and `kv_deltas.safetensors` holds dW (the code saves full weights). Weight decay
    (AdamW 0.01 on every group, as in the code) therefore pulls K/V towards the base weights, and
    the pretrained token table is neither decayed nor saved (the code decays all 49,408 rows).
  - The preset auxiliary nouns and the automatic prompt (paper Sec. 4.5, not in the code): the
    auxiliary prompt is the concept prompt with the tokens of "V noun" replaced by the noun's tokens;
    without --aux-noun the noun is the one of AUX_NOUNS whose text embedding is nearest the class
    word's. Token sets come from the tokenization, so nouns of several tokens work.
  - Any backbone sampler (the code: DDIM only), batches of prompts (the code: one prompt), and the
    reference images are sampled with replacement instead of epoch by epoch.
  - Small things left out: the contexts train at 10x also when there is no suffix (the code drops
    P^i to 1x when end_token=False); regularization rows are exactly half of each batch (the code
    shuffles reg and target items together, about half), and its "dish" caption hack is not copied.

    python dci_ico.py train --images refs/ --class-word cat --output-dir out/cat    # + standard flags
    python dci_ico.py train --images refs/ --class-word cat --no-contexts ...       # the manual template
    python dci_ico.py sample --concept out/cat --prompt "a V cat in times square" --gamma 1 --save-masks
    python dci_ico.py sample --concept out/cat --prompt "a V cat in times square" --no-dci
    python dci_ico.py export --concept out/cat --format diffusers --output-dir out/cat-diffusers
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import sd_model as sdm

KV_PATTERN = re.compile(r"attn2\.to_[kv]$")  # cross-attention keys/values: all CD and ICO train in the UNet
# Rows the new tokens start from: Custom Diffusion's rare tokens "ucd</w>", "pll", "ktn" (ids 43514,
# 47629, 42170); the last Lv of them are used, so with 3 tokens <new1> <- ucd, ..., <new3> <- ktn.
RARE_TOKENS = ["43514", "47629", "42170"]
AUX_NOUNS = ("dog", "cat", "bird", "car", "chair", "cup", "vase", "shoe", "bag", "ball", "house", "toy",
             "circle", "square", "triangle")  # our preset list (paper Sec. 4.5 gives none)


# ---- 1. Configuration: the official defaults (card 2.4-2.5 and 4.5) and where they come from.


@dataclass
class ICOArgs(sdm.TrainArgs):
    images: str = ""  # the reference images
    class_word: str = ""  # the frozen concept descriptor <noun>, one or more words ("teddy bear")
    reg_images: str = ""  # regularization images + captions.jsonl ({"file", "caption"}), NAME.txt beside each, or images.txt + caption.txt
    tokens: list[str] = field(default_factory=lambda: ["<new1>", "<new2>", "<new3>"])  # V, Lv = 3 (train.sh); or "<new1>+<new2>"
    init_tokens: list[str] = field(default_factory=lambda: list(RARE_TOKENS))  # ids or one-token words
    contexts: bool = True  # --no-contexts: the manual-template (Custom Diffusion) baseline
    template: str = "photo of a {}"  # the baseline's caption; {} = "V noun"
    prefix_init: str = "A"  # words P^i starts from (train.sh --init_ctx), Lp = their token count
    suffix_init: str = "."  # words S^i starts from (train.sh --ctx_end_init)
    n_prefix: int = 4  # Lp and Ls when the init words are "": random N(0, 0.02^2) (--n_ctx, --n_end_ctx)
    n_suffix: int = 2
    max_images: int = 12  # rows of the context table (train.sh --figure_num)
    context_lr_scale: float = 10.0  # P and S train at 10x the learning rate (configure_optimizers)
    weight_decay: float = 0.01  # AdamW's default, on every group as in the code
    hflip: bool = True  # RandomHorizontalFlip(0.5); CD's rescale augmentation is off in ICO
    cache_latents: bool = True  # encode each image and its mirror once, sample the posterior each step (exact)
    # finetune_addtoken.yaml: base lr 1e-5 x batch 2 x 3 GPUs = 6e-5, 900 steps, seed 23 (train.py -s)
    learning_rate: float = 1e-5
    scale_lr: bool = True
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 3  # stands in for the 3 GPUs
    max_train_steps: int = 900
    seed: int = 23
    checkpointing_steps: int = 100
    validation_steps: int = 100
    minima = {"n_prefix": 0, "n_suffix": 0, "max_images": 1, "context_lr_scale": 0, "weight_decay": 0}  # sdm.parse_args
    aliases = {"tokens": ["modifier_token"], "init_tokens": ["initializer_token"], "weight_decay": ["adam_weight_decay"]}  # diffusers' CD


@dataclass
class DCIArgs(sdm.SampleArgs):
    concept: str = ""  # a folder written by `train` (or one of its checkpoint-N folders)
    prompt_file: str = ""  # more prompts, one a line; each is a batch of --batch-size from --seed
    aux_noun: str = ""  # "" = the preset noun nearest the class word
    tau: float = 0.3  # the window: t/1000 > 1 - tau (--agg_time)
    gamma: float = 0.0  # integration strength, typically -2..2 (--agg_lambda); 0 still injects, -inf never
    share_guidance: bool = True  # one unconditional row for both branches (3 rows a sample, not 4)
    share_noise: bool = False  # the auxiliary branch starts from x_T too (the code draws its own)
    dci: bool = True  # --no-dci: plain sampling of the fine-tuned model
    save_masks: bool = False  # PNG overlays of the auxiliary share M_a per layer
    steps: int = 200  # sample.py: DDIM 200 steps, eta 1, scale 6
    eta: float = 1.0
    guidance_scale: float = 6.0
    minima = {"tau": 0}  # tau >= 1 is the whole run


@dataclass
class ExportArgs:
    concept: str = ""  # a folder written by `train` (or one of its checkpoint-N folders)
    format: str = "diffusers"  # diffusers: Custom Diffusion's full K/V weights + one textual-inversion file a token
    output_dir: str = ""
    pretrained_model: str = ""  # the concept's base model; "" = the one it records (W_base of the full weights)
    variant: str = ""  # SD 2.x single files: sd21 (v) or sd21-base (eps)
    save_precision: str = "fp32"  # kohya's --save_precision: the dtype of the weights and token files (fp16: half the size)
    overwrite: bool = False  # also removes an earlier export's files there (is_ico_export), and nothing else
    choices = {"format": ("diffusers",), "save_precision": ("fp32", "fp16", "bf16")}  # sdm.parse_args


# ---- 2. ICO's parameters and the prompt of Eq. 2.


def sos_detached(attn, q, k, v):
    """Cross-attention with the SOS key/value cut from the graph (Custom Diffusion's new_forward, kept by
    ICO): the encoder is causal, so the SOS feature is the same in every prompt; a K/V update learnt
    through it would shift every prompt's image, not only the concept's. No effect at inference."""
    k, v = (torch.cat([z[:, :, :1].detach(), z[:, :, 1:]], dim=2) for z in (k, v))
    return F.scaled_dot_product_attention(q, k, v)


def _add_delta(delta, module, inputs, out):
    return out + F.linear(inputs[0], delta.to(out.dtype))  # (W + dW) x without touching W


class ICO(nn.Module):
    """ICO's trainables (card 2.1-2.4): V's token rows, the per-image context tables P^i and S^i of
    Eq. 2 (one row per reference image), and Custom Diffusion's attn2 K/V, here as deltas dW."""

    def __init__(self, model: sdm.StableDiffusion, tokens, class_word: str, n_images: int = 1, contexts: bool = True,
                 prefix_init: str = "A", suffix_init: str = ".", n_prefix: int = 4, n_suffix: int = 2,
                 template: str = "photo of a {}", init_tokens=tuple(RARE_TOKENS), generator=None):
        super().__init__()
        if model.text_encoder_2 is not None:
            raise ValueError("ICO/DCI work on models with one text encoder (SD 1.x, 2.x, the toy model), not SDXL.")
        tok, te = model.tokenizer, model.text_encoder
        self.tokens, self.class_word = list(tokens), class_word.replace("_", " ").strip()
        self.noun_ids = tok.tokenize(self.class_word)
        if not self.noun_ids:
            raise ValueError("the class word is empty; pass --class-word (e.g. cat).")
        n = te.token_embedding.num_embeddings
        try:
            self.token_ids = tok.add_tokens(self.tokens)
        except ValueError:  # already added (a second ICO on the same model), or not new at all
            self.token_ids = [tok.token_id(t) for t in self.tokens]
        if self.token_ids != list(range(n, n + len(self.tokens))):
            raise ValueError(f"the concept tokens {self.tokens} must be new words, and the first ones added to the tokenizer.")
        if not init_tokens or 1 < len(init_tokens) < len(self.tokens):
            raise ValueError(f"--init-tokens gives {len(init_tokens)} starting rows for {len(self.tokens)} tokens; give one, "
                             "or one per token (more: the last ones are used, as in Custom Diffusion).")
        init = [int(w) if w.isdigit() else tok.token_id(w) for w in init_tokens] * len(self.tokens)  # one word: every row
        if bad := [i for i in init if i >= n]:
            raise ValueError(f"--init-tokens: id {bad[0]} is not a token of this model (ids 0-{n - 1}).")
        self.rows = nn.Parameter(te.token_embedding.weight[init[-len(self.tokens):]].detach().float().clone())

        # P^i and S^i, a separate set per reference image: the init words' token rows (Lp, Ls = their
        # token counts), or N(0, 0.02^2) as in CoOp. Their slots' ids (the words, or "x") only fill the row.
        def context_table(text, k):
            if not contexts or not (text or k):
                return [], None
            if text:
                ids = tok.tokenize(text)
                return ids, nn.Parameter(te.token_embedding.weight[ids].detach().float().expand(n_images, -1, -1).clone())
            return [tok.token_id("x")] * k, nn.Parameter(0.02 * torch.randn(n_images, k, te.cfg.width, generator=generator))

        self.template = None if contexts else template
        if self.template is not None and self.phrase not in resolve_prompt(template, self):
            raise ValueError(f"--template '{template}' does not hold the concept '{self.phrase}'; write {{}} where it goes "
                             "(e.g. 'photo of a {}'), or V before the class word.")
        pre, self.prefix = context_table(prefix_init, n_prefix)  # P^i: (images, Lp, width)
        suf, self.suffix = context_table(suffix_init, n_suffix)  # S^i: (images, Ls, width)
        self.n_prefix, self.n_suffix = len(pre), len(suf)
        layout = [tok.bos_id, *pre, *self.token_ids, *self.noun_ids, *suf, tok.eos_id]
        if len(layout) > tok.length:
            raise ValueError(f"the ICO prompt is {len(layout)} tokens, over CLIP's {tok.length}; use fewer context vectors.")
        pad = [te.cfg.pad_id] * (tok.length - len(layout))
        self.register_buffer("ico_ids", torch.tensor([layout + pad]), persistent=False)

        names = [name for name, _ in model.unet.named_modules() if KV_PATTERN.search(name)]
        weights = dict(model.unet.named_parameters())
        self.kv_names = {name.replace(".", "_"): name for name in names}
        self.kv = nn.ParameterDict({k: nn.Parameter(torch.zeros(weights[f"{name}.weight"].shape)) for k, name in self.kv_names.items()})
        self._installed = False

    @property
    def phrase(self) -> str:
        return " ".join(self.tokens) + " " + self.class_word

    @contextlib.contextmanager
    def install(self, unet: sdm.UNetModel, processor=sos_detached):
        """Add the K/V deltas (forward hooks) and put `processor` on every attn2; undone on exit.
        Re-entrant: inside an open install (training, whose scope must outlive backward because
        gradient checkpointing reruns the blocks there) a nested one adds nothing, so dW is never
        added twice."""
        if self._installed:
            yield
            return
        modules = dict(unet.named_modules())
        handles = [modules[name].register_forward_hook(functools.partial(_add_delta, self.kv[key]))
                   for key, name in self.kv_names.items()]
        self._installed = True
        try:
            with sdm.hooked(unet, processor=processor):
                yield
        finally:
            self._installed = False
            for h in handles:
                h.remove()

    def encode_ids(self, model, ids):
        """The UNet context of token rows that may contain V (plain prompts: inference, reg captions)."""
        te = model.text_encoder
        return te(ids, te.embed(ids, self.rows))[0]

    def concept_context(self, model, index):
        """The training prompt of reference images `index`: Eq. 2 with P^i and S^i, or the template."""
        if self.template is not None:
            return self.encode_ids(model, model.tokenize([resolve_prompt(self.template, self)] * len(index)))
        te, ids = model.text_encoder, self.ico_ids.expand(len(index), -1)
        x = te.embed(ids, self.rows)
        a, b = 1 + self.n_prefix, 1 + self.n_prefix + len(self.token_ids) + len(self.noun_ids)
        parts = [x[:, :1]]
        if self.prefix is not None:
            parts.append(self.prefix[index].to(x.dtype))
        parts.append(x[:, a:b])
        if self.suffix is not None:
            parts.append(self.suffix[index].to(x.dtype))
        parts.append(x[:, b + self.n_suffix:])
        return te(ids, torch.cat(parts, dim=1))[0]  # positions are added by slot (module docstring)

    def save(self, folder, metadata: dict, image_names=()):
        """kv_deltas.safetensors (dW under the UNet's key names), learned_embeds.safetensors (diffusers'
        multi-vector textual inversion: {first token: (Lv, width)}, the layout its textual_inversion.py
        writes with --num_vectors and `load_textual_inversion` reads; it names the rows "<new1>", "<new1>_1",
        ... and expands "<new1>" in a prompt to all of them), a1111/concept.safetensors (A1111's emb_params,
        the Lv rows as one embedding) and, to look at, contexts.safetensors (P, S; unused at inference)."""
        folder = Path(folder)
        meta = {**metadata, "class_word": self.class_word, "tokens": self.tokens, "n_prefix": self.n_prefix,
                "n_suffix": self.n_suffix, "template": self.template or ""}
        sdm.save_safetensors({f"{name}.weight": self.kv[k] for k, name in self.kv_names.items()},
                             folder / "kv_deltas.safetensors", {**meta, "kv": "delta: W = W_base + this"})
        sdm.save_embeddings(folder / "learned_embeds.safetensors", {self.tokens[0]: self.rows}, "diffusers", meta)
        # A1111 reads one embedding of Lv vectors, typed as its file name (rename it to the word you want)
        sdm.save_embeddings(folder / "a1111" / "concept.safetensors", {"V": self.rows}, "a1111", meta)
        if self.prefix is not None or self.suffix is not None:
            ctx = {k: p for k, p in (("prefix", self.prefix), ("suffix", self.suffix)) if p is not None}
            sdm.save_safetensors(ctx, folder / "contexts.safetensors", {**meta, "images": list(image_names)})

    @classmethod
    def load(cls, folder, model) -> ICO:
        """A trained concept, onto `model`; refuses one trained on another base model."""
        from safetensors import safe_open

        meta = read_metadata(folder)  # one sentence for a file that is not a readable concept
        ico = cls(model, meta["tokens"], meta["class_word"], contexts=False).to(model.device)
        with safe_open(str(Path(folder) / "kv_deltas.safetensors"), "pt") as f:
            shapes_ok = set(f.keys()) == {f"{n}.weight" for n in ico.kv_names.values()} and all(
                f.get_slice(f"{n}.weight").get_shape() == list(ico.kv[k].shape) for k, n in ico.kv_names.items())
            probe = torch.tensor(meta["base_probe"])
            if not shapes_ok or not torch.allclose(base_probe(model).cpu(), probe, rtol=1e-2, atol=1e-3):
                raise ValueError(f"'{folder}' was trained on another base model ({meta['base_model'] or 'the toy model'}); "
                                 "load it with that model (--pretrained-model).")
            with torch.no_grad():
                for k, n in ico.kv_names.items():
                    ico.kv[k].copy_(f.get_tensor(f"{n}.weight"))
        try:  # {first token: (Lv, d)}; folders written before that layout hold one key per token
            rows = sdm.load_embeddings(Path(folder) / "learned_embeds.safetensors")
            rows = torch.cat([rows[t] for t in ico.tokens]) if set(rows) == set(ico.tokens) and len(rows) > 1 else rows[ico.tokens[0]]
        except Exception as e:  # truncated, or rows under other names
            raise ValueError(f"'{folder}' learned_embeds.safetensors is not this concept's ({type(e).__name__}: {e}).") from None
        if rows.shape != ico.rows.shape:
            raise ValueError(f"'{folder}' learned_embeds.safetensors holds {tuple(rows.shape)} rows; the concept needs {tuple(ico.rows.shape)}.")
        with torch.no_grad():
            ico.rows.copy_(rows)
        return ico.requires_grad_(False)


def base_probe(model) -> torch.Tensor:
    """A few weights of the first attn2.to_k: enough to tell base models apart, robust to fp16."""
    w = next(p for n, p in model.unet.named_parameters() if KV_PATTERN.search(n.removesuffix(".weight")))
    return w.detach().flatten()[:16].float()


def read_metadata(folder) -> dict:
    from safetensors import safe_open

    folder = Path(folder)
    path = folder / "kv_deltas.safetensors"
    if not folder.exists():
        raise FileNotFoundError(f"--concept '{folder}' does not exist.")
    if folder.is_file():  # e.g. its kv_deltas.safetensors
        raise ValueError(f"--concept '{folder}' is a file; pass its folder: --concept {folder.parent}")
    if not path.exists():  # say what the folder is instead, where we can tell
        done = [p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit()
                and all((p / f).is_file() for f in ("kv_deltas.safetensors", "learned_embeds.safetensors"))]
        if done:  # a run stopped before its final save
            last = max(done, key=lambda p: int(p.name[11:]))
            raise FileNotFoundError(f"'{folder}' is an unfinished run (no final kv_deltas.safetensors); use its latest "
                                    f"checkpoint, --concept '{last}', or finish it with `train ... --resume latest`.")
        if (folder / CUSTOM_DIFFUSION_WEIGHTS).exists():
            raise ValueError(f"'{folder}' is a diffusers export (full K/V weights, for diffusers only); pass the training "
                             "folder it was exported from.")
        raise FileNotFoundError(f"'{folder}' holds no ICO concept (kv_deltas.safetensors is missing); "
                                "pass the output folder of `dci_ico.py train` or one of its checkpoint-N folders.")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata()
        meta = {k: json.loads(v) if k in ("tokens", "base_probe", "n_prefix", "n_suffix", "steps", "seed", "resolution",
                                          "max_train_steps", "batch", "learning_rates", "clip_skip") else v for k, v in raw.items()}
        if not meta["tokens"] or not meta["class_word"]:
            raise KeyError("tokens")
        if not (Path(folder) / "learned_embeds.safetensors").is_file():
            raise FileNotFoundError("learned_embeds.safetensors is missing")
        return meta
    except Exception as e:  # truncated (SafetensorError), not ours (no metadata: AttributeError; a key missing: KeyError)
        raise ValueError(f"'{path}' is not a readable ICO concept ({type(e).__name__}: {e}); write it again with "
                         "`dci_ico.py train`.") from None


# ---- 2b. Export to diffusers' Custom Diffusion layout (examples/custom_diffusion/train_custom_diffusion.py).

CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"  # the name its save_attn_procs gives


def diffusers_attention_names(cfg: sdm.UNetConfig, names) -> dict[str, str]:
    """Our attention paths ("input_blocks.1.1.transformer_blocks.0.attn2") -> diffusers' ("down_blocks.0.attentions.0.
    transformer_blocks.0.attn2"): every path diffusers could have is run through weights_convert's own diffusers -> LDM
    mapping and the table is read backwards, so the two directions cannot drift apart."""
    import weights_convert as wc

    n, depth = cfg.num_res_blocks, max(*cfg.transformer_depth, cfg.transformer_depth_middle)
    where = [("down_blocks", i, j) for i in range(len(cfg.channel_mult)) for j in range(n)]
    where += [("up_blocks", i, j) for i in range(len(cfg.channel_mult)) for j in range(n + 1)]
    paths = [f"{b}.{i}.attentions.{j}.transformer_blocks.{k}" for b, i, j in where for k in range(depth)]
    paths += [f"mid_block.attentions.0.transformer_blocks.{k}" for k in range(cfg.transformer_depth_middle)]
    probe = {f"{p}.{a}.to_k.weight": f"{p}.{a}" for p in paths for a in ("attn1", "attn2")}
    back = {k.removesuffix(".to_k.weight"): v for k, v in wc.diffusers_unet_to_ldm(probe, cfg).items()}
    if missing := [name for name in names if name not in back]:
        raise ValueError(f"no diffusers name for the attention layer '{missing[0]}' of this UNet.")
    return {name: back[name] for name in names}


def is_ico_export(path) -> bool:
    """Whether a file is one `export_diffusers` wrote, by its own header: the weights file or a token file named after a
    token its metadata lists, with the class word and format "pt" of an export (training's files say "diffusers" or
    "a1111"). Only such files are removed when an export replaces another: a user's own files there stay."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        names = [CUSTOM_DIFFUSION_WEIGHTS, *(f"{t}.safetensors" for t in json.loads(meta.get("tokens", "[]")))]
    except Exception:  # not safetensors, or a header that is not ours
        return False
    return meta.get("format") == "pt" and "class_word" in meta and Path(path).name in names


def export_diffusers(ico: ICO, model: sdm.StableDiffusion, out, metadata: dict, dtype=torch.float32) -> list[Path]:
    """The concept as diffusers' train_custom_diffusion.py saves one: the full fine-tuned K/V weights, W_base + dW in
    fp32 (or `dtype`, rounded once from the fp32 sum), as `<attn processor name>.to_k_custom_diffusion.weight` / `.to_v_...`, and one textual-inversion file a token,
    `<new1>.safetensors` = {"<new1>": (width,)}. Our Lv tokens are Lv words of the vocabulary, as its --modifier_token
    "<new1>+<new2>" makes them, so a diffusers prompt names them as ours does ("a <new1> <new2> <new3> cat");
    learned_embeds.safetensors holds the same rows as one multi-vector word instead. Each attn1 processor gets an empty
    tensor: diffusers' .bin files hold {} there, its safetensors writer drops them, and its loader then finds one
    processor where the UNet has two and refuses the file."""
    out = Path(out)
    forbidden = '/\\\x00' + ('<>:"|?*' if sys.platform == "win32" else "")  # Windows refuses "<new1>.safetensors"
    if bad := [t for t in ico.tokens if any(c in forbidden for c in t) or t in (".", "..")]:
        raise ValueError(f"the token '{bad[0]}' cannot name a file here, and the diffusers export writes <token>.safetensors "
                         "for each token; train with --tokens free of / and \\ (on Windows also of <>:\"|?*).")
    attn2 = {name.rsplit(".", 1)[0] for name in ico.kv_names.values()}
    attn1 = [n for n, m in model.unet.named_modules() if n.endswith(".attn1") and isinstance(m, sdm.Attention)]
    names = diffusers_attention_names(model.cfg.unet, sorted(attn2) + attn1)
    weights = dict(model.unet.named_parameters())
    tensors = {f"{names[n]}.processor": torch.zeros(0, dtype=dtype) for n in attn1}
    for key, name in ico.kv_names.items():  # name: ...attn2.to_k
        path, proj = name.rsplit(".", 1)
        w = weights[f"{name}.weight"].float() + ico.kv[key].float()
        tensors[f"{names[path]}.processor.{proj}_custom_diffusion.weight"] = w.to(dtype)
    meta = {**metadata, "format": "pt", "class_word": ico.class_word, "tokens": ico.tokens, "kv": "full: W_base + dW"}
    files = [out / CUSTOM_DIFFUSION_WEIGHTS, *(out / f"{t}.safetensors" for t in ico.tokens)]
    # an earlier export there (export --overwrite): its files this one does not replace, e.g. other tokens' files
    stale = [f for f in out.glob("*.safetensors") if f not in files and is_ico_export(f)] if out.is_dir() else []
    sdm.save_safetensors(tensors, files[0], meta)
    for token, row, f in zip(ico.tokens, ico.rows, files[1:]):
        sdm.save_safetensors({token: row.float().to(dtype)}, f, {k: v for k, v in meta.items() if k != "kv"})
    for f in stale:  # after the new files are in place: a failed export leaves the earlier one whole
        f.unlink()
    return files


# ---- 3. DCI: the dual-branch integration module (Eqs. 3-5) and the auxiliary prompt.


class Branches(NamedTuple):
    """Token rows of both branches and the token sets the masks sum over, as (b, 77) booleans:
    real_c / real_a = the prompt's tokens without SOS/EOS, span_c = S_c (V and the noun),
    noun_a = the auxiliary noun (S_a = real_a minus noun_a)."""
    ids_c: torch.Tensor
    ids_a: torch.Tensor
    real_c: torch.Tensor
    span_c: torch.Tensor
    real_a: torch.Tensor
    noun_a: torch.Tensor
    aux_prompts: list


class Masks(NamedTuple):
    tokens_c: torch.Tensor  # Â^c: attention renormalised over the real tokens of p_c
    tokens_a: torch.Tensor  # Â^a
    m_c: torch.Tensor  # Eq. 3: the mass on S_c, per pixel
    m_a: torch.Tensor  # Eq. 3: the mass on S_a = 1 - the mass on the auxiliary noun
    s_c: torch.Tensor  # Eq. 4: 500 softmax over pixels of 10 m
    s_a: torch.Tensor
    aux: torch.Tensor  # M_a = softmax([s_c, gamma s_a])[1] = sigmoid(gamma s_a - s_c); M_c = 1 - M_a


def integration_masks(p_c, p_a, br: Branches, gamma: float) -> Masks:
    """Eqs. 3-4 per sample, head and pixel, from the attention probabilities (b, h, pixels, 77) of the
    concept and the auxiliary rows. The code's constants: 10 (token and spatial temperature), 500."""
    real_c, span_c, real_a, noun_a = (m[:, None, None, :] for m in br[2:6])
    tokens_c = (10 * p_c).masked_fill(~real_c, -torch.inf).softmax(-1)  # SOS/EOS/padding left out
    tokens_a = (10 * p_a).masked_fill(~real_a, -torch.inf).softmax(-1)
    m_c = (tokens_c * span_c).sum(-1)
    m_a = (tokens_a * (real_a & ~noun_a)).sum(-1)
    s_c, s_a = 500 * (10 * m_c).softmax(-1), 500 * (10 * m_a).softmax(-1)
    return Masks(tokens_c, tokens_a, m_c, m_a, s_c, s_a, torch.sigmoid(gamma * s_a - s_c))


def dbim_processor(rows_c: slice, rows_a: slice, br: Branches, gamma: float, record: dict | None = None):
    """An attn2 processor for the DCI batch: Eq. 5, O_c <- M_c O_c + M_a O_a (before to_out), on the
    concept rows only; the unconditional and auxiliary rows pass unchanged."""
    def proc(attn, q, k, v):
        out, p = sdm.attention_with_probs(attn, q, k, v)
        m = integration_masks(p[rows_c], p[rows_a], br, gamma).aux[..., None]
        out[rows_c] = ((1 - m) * out[rows_c] + m * out[rows_a]).to(out.dtype)
        if record is not None:
            record[attn.name] = record.get(attn.name, 0) + m[..., 0].mean(1).cpu()
        return out
    return proc


def in_window(t: int, tau: float, num_train_timesteps: int = 1000) -> bool:
    return t / num_train_timesteps > 1 - tau  # strict: with tau = 0.3, t = 701 is in, 700 is out


def resolve_prompt(prompt: str, ico: ICO) -> str:
    """'{}' or a lone capital V stands for the concept phrase ("a V cat" -> "a <new1> <new2> <new3> cat")."""
    return re.sub(r"(?<!\S)V(?!\S)", " ".join(ico.tokens), prompt.replace("{}", ico.phrase))


@torch.no_grad()
def pick_aux_noun(model, class_word: str, nouns=AUX_NOUNS, prompts=()) -> str:
    """The preset noun whose pooled text embedding ("a photo of a ...") is nearest the class word's, among those
    neither in the class word nor in a prompt: "a V bag next to a bag" must not get the auxiliary prompt
    "a bag next to a bag", whose two bags the auxiliary branch could not tell apart."""
    words = {w for text in [class_word, *prompts] for w in re.findall(r"[a-z]+", text.lower())}
    cands = [n for n in nouns if n not in words]
    if not cands:
        raise ValueError(f"every preset auxiliary noun ({', '.join(nouns)}) is in the class word or the prompt; "
                         "choose one with --aux-noun.")
    pooled = model.text_encoder(model.tokenize([f"a photo of a {w}" for w in [class_word, *cands]]))[1].float()
    return cands[int(F.cosine_similarity(pooled[:1], pooled[1:]).argmax())]


def _find_all(ids: list[int], sub: list[int]) -> list[int]:
    """Every start of the run `sub` in `ids`; "V noun" runs never overlap (V's ids are new, so not in the noun)."""
    return [j for j in range(len(ids) - len(sub) + 1) if ids[j:j + len(sub)] == sub]


def _find(ids: list[int], sub: list[int]) -> int:
    """First position of the run `sub` in `ids`, or -1."""
    return next(iter(_find_all(ids, sub)), -1)


def check_prompts(model, ico: ICO, prompts: list[str], need_noun: bool) -> None:
    """One sentence for the prompts sampling cannot use: over CLIP's length (the backbone would cut
    them silently but for a warning), or without the concept: its tokens V (plain sampling), or
    "V noun" together (DCI, whose token set S_c is that span)."""
    tok = model.tokenizer
    want, text = (ico.token_ids + ico.noun_ids, ico.phrase) if need_noun else (ico.token_ids, " ".join(ico.tokens))
    for p in prompts:
        ids = tok.tokenize(p)
        if len(ids) > tok.length - 2:
            raise ValueError(f"the prompt '{p}' is {len(ids) + 2} tokens, over CLIP's {tok.length}; shorten it.")
        if _find(ids, want) < 0:
            raise ValueError(f"the prompt '{p}' does not contain the concept '{text}'; write it, or {{}} or V, "
                             "where the concept goes.")


def make_branches(model, ico: ICO, prompts: list[str], aux_noun: str) -> Branches:
    """Both branches' token rows from the tokenization: p_a is p_c with the tokens of every "V noun" replaced
    by the auxiliary noun's, so the token sets are known exactly, whatever the nouns' lengths. S_c is every
    occurrence ("a V cat and a V cat"): one left in p_a would put the concept in the auxiliary branch."""
    tok, pad = model.tokenizer, model.cfg.text.pad_id
    phrase, noun = ico.token_ids + ico.noun_ids, tok.tokenize(aux_noun)
    if not noun or aux_noun.strip().lower() == ico.class_word.lower() or noun == ico.noun_ids:
        raise ValueError(f"the auxiliary noun must be a word other than the class word '{ico.class_word}' (got '{aux_noun}').")
    if set(noun) & set(ico.token_ids):  # the auxiliary branch would draw the concept, and S_a would hold V
        raise ValueError(f"the auxiliary noun '{aux_noun}' holds the concept's tokens {ico.tokens}; give a common noun "
                         "(e.g. dog).")
    check_prompts(model, ico, prompts, need_noun=True)
    b = len(prompts)
    rows, aux_prompts, masks = [], [], torch.zeros(4, b, tok.length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids, aux, starts_a, end = tok.tokenize(p), [], [], 0
        for s in (starts := _find_all(ids, phrase)):
            aux += ids[end:s]
            starts_a.append(len(aux))
            aux += noun
            end = s + len(phrase)
        aux += ids[end:]
        if len(_find_all(aux, noun)) > len(starts):  # the noun also outside the replaced spans (not inside "teddy bear")
            warnings.warn(f"the auxiliary noun '{aux_noun}' is also in the prompt '{p}' outside the concept; the "
                          "auxiliary branch cannot tell the two apart (choose another --aux-noun).", stacklevel=2)
        if len(aux) > tok.length - 2:
            raise ValueError(f"the auxiliary prompt of '{p}' is over CLIP's {tok.length} tokens; use a shorter --aux-noun.")
        rows.append([[tok.bos_id, *r, tok.eos_id] + [pad] * (tok.length - 2 - len(r)) for r in (ids, aux)])
        aux_prompts.append(tok.decode(aux))
        masks[0, i, 1:1 + len(ids)], masks[2, i, 1:1 + len(aux)] = True, True
        for s, sa in zip(starts, starts_a):
            masks[1, i, 1 + s:1 + s + len(phrase)], masks[3, i, 1 + sa:1 + sa + len(noun)] = True, True
    ids = torch.tensor(rows, device=model.device)
    return Branches(ids[:, 0], ids[:, 1], *masks.to(model.device), aux_prompts)


def check_sampling(model, steps: int, sampler: str, tau: float, gamma: float, height: int, width: int) -> None:
    """One sentence for the sampling settings the backbone would crash on (steps = 0, a latent the UNet
    cannot halve and double back, which also breaks the mask overlays' grid) or take silently: steps over
    the training timesteps (leading spacing then repeats t = 1, so the DCI window is empty), an unknown
    sampler (found only after the output folder exists), tau or gamma NaN (no window / NaN images)."""
    try:
        model.schedule.timesteps(steps)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if sampler not in sdm.SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(sdm.SAMPLERS)}.")
    if math.isnan(tau) or math.isnan(gamma):
        raise ValueError(f"--tau and --gamma must be numbers (got {tau} and {gamma}).")
    if height % model.size_multiple or width % model.size_multiple:
        raise ValueError(f"height and width must be multiples of {model.size_multiple} for this model (got {height}x{width}).")


def aux_generator(generator: torch.Generator, device="cpu") -> torch.Generator:
    """The auxiliary branch's noise stream: its seed is a hash of the concept stream's seed. Seed + 1 would hand
    seed s's auxiliary rows seed s+1's x_T, correlating consecutive seeds' layouts in a sweep."""
    seed = np.random.SeedSequence([generator.initial_seed(), 0xDC1]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed))


@torch.no_grad()
def sample(model: sdm.StableDiffusion, ico: ICO, prompts: list[str], *, aux_noun: str = "", dci: bool = True,
           tau: float = 0.3, gamma: float = 0.0, share_guidance: bool = True, share_noise: bool = False,
           steps: int = 200, sampler: str = "ddim", eta: float = 1.0, guidance_scale: float = 6.0,
           negative_prompt: str = "", height: int | None = None, width: int | None = None, generator=None,
           latents=None, aux_latents=None, timesteps=None, branches: Branches | None = None,
           record: dict | None = None, progress: bool = True):
    """DCI sampling (card 4.3), or plain sampling of the fine-tuned model when the window is empty.

    The two latents travel as one state [x; x_a] through `sample_loop`, so every sampler works. In the
    window each UNet call holds [x; x; x_a] with contexts [uncond; c; c_a] (shared guidance) or
    [x; x; x_a; x_a] with [uncond; c; uncond; c_a]; outside it only x is evaluated and x_a is left
    behind. Returns (images, auxiliary prompts or None)."""
    prompts = [resolve_prompt(p, ico) for p in prompts]
    b, s, T = len(prompts), guidance_scale, model.schedule.cfg.num_train_timesteps
    ts = list(timesteps) if timesteps is not None else model.schedule.timesteps(steps)
    window = dci and any(in_window(t, tau, T) for t in ts)
    h, w = height or model.cfg.image_size, width or model.cfg.image_size
    f, dev = model.vae.downsample_factor, model.device
    check_sampling(model, steps if timesteps is None else 1, sampler, tau, gamma, h, w)
    shape = (b, model.cfg.unet.in_channels, h // f, w // f)
    gdev = generator.device if generator else "cpu"
    # The auxiliary rows draw from their own stream, so the concept rows get exactly plain sampling's noise, x_T and
    # every stochastic step (DDIM eta > 0, DDPM): DCI and --no-dci with one seed differ only where DCI acts.
    aux_gen = aux_generator(generator, gdev) if generator else None
    draw = lambda n=b, g=generator: torch.randn((n, *shape[1:]), generator=g, device=gdev).to(dev)
    if branches is None:
        check_prompts(model, ico, prompts, need_noun=window)
    aux_noun = aux_noun or (pick_aux_noun(model, ico.class_word, prompts=prompts) if window and branches is None else "")
    br = branches or (make_branches(model, ico, prompts, aux_noun) if window else None)
    latents = draw() if latents is None else latents.to(dev)
    c = ico.encode_ids(model, br.ids_c if br else model.tokenize(prompts))
    u = ico.encode_ids(model, model.tokenize([negative_prompt] * b)) if s != 1 else None  # "" is plain CLIP's uncond
    plain = model.cfg_model_fn(sdm.Cond(c), None if u is None else sdm.Cond(u), s)
    with ico.install(model.unet):
        if not window:  # tau = 0, --no-dci, or no step in the window: the batch never grows
            z = sdm.sample_loop(plain, latents, model.schedule, steps, sampler, eta, generator, ts, progress)
            return model.decode_latents(z), None
        a = ico.encode_ids(model, br.ids_a)
        x_a = latents.clone() if share_noise else (draw(g=aux_gen) if aux_latents is None else aux_latents.to(dev))
        noise = lambda x: torch.cat([draw(len(x) // 2), draw(len(x) // 2, aux_gen)])

        def fn(x, t, i):
            xc, xa = x.float().chunk(2)
            if not in_window(t, tau, T):
                out = plain(xc, t, i)
                return torch.cat([out, out])  # x_a is no longer used; the copy keeps it finite and cheap
            groups = [(xc, c), (xa, a)] if u is None else [(xc, u), (xc, c), (xa, a)] if share_guidance else \
                [(xc, u), (xc, c), (xa, u), (xa, a)]
            ic, ia = (0, 1) if u is None else (1, 2 if share_guidance else 3)
            proc = dbim_processor(slice(ic * b, ic * b + b), slice(ia * b, ia * b + b), br, gamma, record)
            with sdm.hooked(model.unet, processor=proc):
                outs = model.unet(torch.cat([g[0] for g in groups]), t, torch.cat([g[1] for g in groups])).chunk(len(groups))
            if u is None:
                return torch.cat(outs)
            e_u, e_c, e_a = outs[0], outs[1], outs[-1]
            e_ua = e_u if share_guidance else outs[2]  # shared mode: uncond evaluated on x, not x_a (card 4.3)
            return torch.cat([e_u + s * (e_c - e_u), e_ua + s * (e_a - e_ua)])

        if record is not None:
            record["_window_steps"] = sum(in_window(t, tau, T) for t in ts)
        z = sdm.sample_loop(fn, torch.cat([latents, x_a]), model.schedule, steps, sampler, eta, noise, ts, progress)
    return model.decode_latents(z[:b]), br.aux_prompts


def mask_overlays(image, record: dict, index: int, latent_hw):
    """A row of tiles: the image, then per cross-attention layer (forward order) the mean auxiliary
    share M_a over the window's steps and the heads, in red over the image."""
    from PIL import Image

    arr, tiles = np.asarray(image).astype(np.float32), [image]
    for name, acc in record.items():
        if name.startswith("_"):
            continue
        m = acc[index] / record["_window_steps"]
        ds = round((latent_hw[0] * latent_hw[1] / m.numel()) ** 0.5)
        m = m.reshape(1, 1, latent_hw[0] // ds, latent_hw[1] // ds)
        m = F.interpolate(m, size=arr.shape[:2], mode="nearest")[0, 0].clamp(0, 1).numpy()[..., None] * 0.7
        tiles.append(Image.fromarray((arr * (1 - m) + np.array([255.0, 0, 0]) * m).round().astype(np.uint8)))
    return sdm.image_grid(tiles, cols=len(tiles))


# ---- 4. Training.


def square_crop(img):
    w, h = img.size
    s = min(w, h)
    return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def load_retrieved(folder: Path) -> tuple[list, list[str]]:
    """Custom Diffusion's retrieve.py layout, which the official code and diffusers' --real_prior read:
    images.txt (one path a line, as written at retrieval: FOLDER/images/N.jpg) and caption.txt, line by line."""
    paths, caps = ((folder / f).read_text().splitlines() for f in ("images.txt", "caption.txt"))
    paths = [p.strip() for p in paths if p.strip()]
    if len(caps) < len(paths):
        raise ValueError(f"'{folder / 'caption.txt'}' has {len(caps)} lines for the {len(paths)} images of images.txt; "
                         "write one caption a line, in the order of images.txt.")
    images = []
    for p in paths:  # as written (from the folder retrieval ran in), else within this folder (moved since)
        found = next((c for c in (Path(p), folder / p, folder / "images" / Path(p).name) if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"'{folder / 'images.txt'}' lists '{p}', which is neither there nor in '{folder / 'images'}'.")
        images.append(sdm.load_image(found))
    return images, [c.strip() for c in caps[:len(paths)]]


def load_captioned_folder(folder) -> tuple[list, list[str]]:
    """Regularization images and their captions: captions.jsonl ({"file", "caption"} a line, as
    `toy_world.py make-data` writes), a NAME.txt beside each image, or retrieve.py's images.txt + caption.txt."""
    folder = Path(folder)
    if folder.is_file() and folder.name == "images.txt":  # the official --reg_datapath names the file itself
        folder = folder.parent
    if (folder / "images.txt").is_file():
        if not (folder / "caption.txt").is_file():
            raise FileNotFoundError(f"'{folder}' has images.txt but no caption.txt beside it (one caption a line, as retrieve.py writes).")
        return load_retrieved(folder)
    with warnings.catch_warnings():  # the caption files themselves are not images; say nothing about them
        warnings.filterwarnings("ignore", r"skipping '.*\.(jsonl|txt)'")
        images = sdm.load_image_folder(folder)
    index = folder / "captions.jsonl"
    if index.exists():
        caps = {r["file"]: r["caption"] for r in (json.loads(line) for line in index.read_text().splitlines() if line.strip())}
    else:
        caps = {p.with_suffix("").name: p.read_text().strip() for p in folder.glob("*.txt")}
        caps = {name: caps[Path(name).stem] for name, _ in images if Path(name).stem in caps}
    missing = [name for name, _ in images if name not in caps]
    if missing:
        raise ValueError(f"no caption for {len(missing)} regularization image(s) in '{folder}' (e.g. {missing[0]}); "
                         "add captions.jsonl with {\"file\", \"caption\"} lines or a .txt file beside each image.")
    return [img for _, img in images], [caps[name] for name, _ in images]


def views(images, size: int):
    """Each image and its mirror image, (n, 2, 3, size, size). Preprocessing as the code: centre square crop,
    bicubic resize, [-1, 1]."""
    x = torch.stack([sdm.image_to_tensor(square_crop(im), size) for im in images])
    return torch.stack([x, x.flip(-1)], 1)


@torch.no_grad()
def posterior(model, images, size: int):
    """VAE posterior mean and std of `views`, (n, 2, c, h, w): encoding is deterministic, so sampling these
    with the generator equals encoding every step (LDM trains on posterior samples)."""
    x = rearrange(views(images, size), "n f c h w -> (n f) c h w")
    d = model.vae.encode(x.to(model.device, model.vae.quant_conv.weight.dtype), chunk=8)
    return tuple(rearrange(t.float(), "(n f) c h w -> n f c h w", f=2) for t in (d.mean, d.std))


def make_optimizer(ico: ICO, args: ICOArgs):
    """AdamW, one group for K/V + V rows at lr, P and S at context_lr_scale x lr (configure_optimizers);
    --scale-lr multiplies by batch x accumulation as train.py does with batch x GPUs x accumulation."""
    lr = args.learning_rate * (args.train_batch_size * args.gradient_accumulation_steps if args.scale_lr else 1)
    groups = [{"params": [*ico.kv.values(), ico.rows], "lr": lr}]
    groups += [{"params": [p], "lr": lr * args.context_lr_scale} for p in (ico.prefix, ico.suffix) if p is not None]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay)


def train(args: ICOArgs, model: sdm.StableDiffusion | None = None):
    if not args.images or not args.class_word:
        raise ValueError("pass --images DIR and --class-word WORD (the concept's category, e.g. cat).")
    device = sdm.pick_device(args.device)
    if model is None:
        model = sdm.load_model(args.pretrained_model, args.mixed_precision, "fp32" if args.mixed_precision == "fp16" else "",
                               device, args.variant, args.compile, args.channels_last, args.vae, args.clip_skip)
    model.requires_grad_(False)
    model.unet.gradient_checkpointing = args.gradient_checkpointing
    for part in ("prefix", "suffix") if args.contexts else ():  # the code's rule: init words set the length (card 2.2)
        n, words = getattr(args, f"n_{part}"), getattr(args, f"{part}_init")
        if words and n not in (getattr(ICOArgs, f"n_{part}"), len(model.tokenizer.tokenize(words))):
            raise ValueError(f"--n-{part} {n} is used only with --{part}-init '' (random contexts); with --{part}-init "
                             f"'{words}' the {part} has as many vectors as its words have tokens.")
    refs = sdm.load_image_folder(args.images)
    if args.contexts and len(refs) > args.max_images:  # --no-contexts has no table to fill
        raise ValueError(f"{len(refs)} reference images but the context table holds {args.max_images} (--max-images); "
                         "raise --max-images or use fewer images.")
    # "<new1>+<new2>+<new3>" is how the official code and diffusers' Custom Diffusion spell several tokens
    plus = lambda words: [w for word in words for w in word.split("+") if w]
    ico = ICO(model, plus(args.tokens), args.class_word, len(refs), args.contexts, args.prefix_init, args.suffix_init,
              args.n_prefix, args.n_suffix, args.template, plus(args.init_tokens), torch.Generator().manual_seed(args.seed)).to(device)
    size = args.resolution or model.cfg.image_size
    if size % model.size_multiple:
        raise ValueError(f"--resolution must be a multiple of {model.size_multiple} for this model (got {size}).")
    if args.validation_prompt:  # fail now, not at the first validation
        check_prompts(model, ico, [resolve_prompt(args.validation_prompt, ico)], need_noun=False)
    # cached: the posterior (mean, std) of every view; --no-cache-latents: the views' pixels, encoded each step
    store = (lambda ims: posterior(model, ims, size)) if args.cache_latents else (lambda ims: (views(ims, size), None))
    data, std = store([im for _, im in refs])
    reg_data = reg_std = reg_caps = None
    if args.reg_images:
        reg, reg_caps = load_captioned_folder(args.reg_images)
        reg_data, reg_std = store(reg)
    scale, schedule = model.vae.scale_factor, model.schedule

    def loss_fn(g):
        """LDM's eps-loss (LDM Eq. 2) on the ICO prompts, reg images with their captions in half the batch."""
        bs = args.train_batch_size
        n_reg = bs // 2 + int(bs % 2 == 1 and bool(torch.rand((), generator=g) < 0.5)) if reg_caps else 0
        idx = torch.randint(len(refs), (bs - n_reg,), generator=g)
        ridx = torch.randint(len(reg_caps), (n_reg,), generator=g) if n_reg else idx[:0]
        flip = (torch.rand(bs, generator=g) < 0.5).long() if args.hflip else torch.zeros(bs, dtype=torch.long)
        m = torch.cat([data[idx, flip[:len(idx)]], *([reg_data[ridx, flip[len(idx):]]] if n_reg else [])])
        if args.cache_latents:
            sd = torch.cat([std[idx, flip[:len(idx)]], *([reg_std[ridx, flip[len(idx):]]] if n_reg else [])])
        else:
            with torch.no_grad():
                d = model.vae.encode(m.to(device, model.vae.quant_conv.weight.dtype))
            m, sd = d.mean.float(), d.std.float()
        z0 = (m + sd * torch.randn(m.shape, generator=g).to(device)) * scale
        t = torch.randint(0, schedule.cfg.num_train_timesteps, (bs,), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        ctx = [ico.concept_context(model, idx.to(device))]
        if n_reg:
            with torch.no_grad():
                ctx.append(ico.encode_ids(model, model.tokenize([reg_caps[i] for i in ridx.tolist()])))
        pred = model.unet(schedule.q_sample(z0, t, noise), t, torch.cat(ctx))  # inside ico.install (below)
        return F.mse_loss(pred.float(), schedule.target(z0, noise, t)), {"reg_rows": n_reg}

    opt = make_optimizer(ico, args)
    base = args.pretrained_model  # absolute when it is a local path: `sample` may run from another folder
    meta = {"method": "ico" if args.contexts else "cd-template", "base_model": str(Path(base).resolve()) if base and Path(base).exists() else base,
            "variant": args.variant, "base_probe": base_probe(model).tolist(), "seed": args.seed, "resolution": size, "clip_skip": args.clip_skip,
            "max_train_steps": args.max_train_steps, "batch": [args.train_batch_size, args.gradient_accumulation_steps],
            # the effective rates, after --scale-lr: V rows and K/V, then the contexts (10x by default)
            "learning_rates": dict(zip(("kv_and_tokens", "contexts"), [g["lr"] for g in opt.param_groups]))}
    # train_loop saves checkpoint-N folders and, at the end, the output folder itself, whatever its name
    save = lambda folder: ico.save(folder, {**meta, "steps": args.max_train_steps if folder == Path(args.output_dir)
                                            else int(folder.name.split("-")[1])}, [n for n, _ in refs])

    def validate():
        g = torch.Generator(device).manual_seed(args.seed)
        images, _ = sample(model, ico, [args.validation_prompt] * args.num_validation_images, dci=False, steps=25, eta=0.0,
                           generator=g, progress=False)
        return sdm.tensor_to_images(images)

    tensors = {"rows": ico.rows, **{f"kv.{k}": v for k, v in ico.kv.items()},
               **{k: p for k, p in (("prefix", ico.prefix), ("suffix", ico.suffix)) if p is not None}}
    # One install for the whole run: with --gradient-checkpointing the blocks run again during
    # backward, after loss_fn has returned, and must see the same K/V deltas and SOS detach.
    with ico.install(model.unet):
        return sdm.train_loop(args, opt, tensors, loss_fn, save, torch.Generator().manual_seed(args.seed),
                              validate, device=device, metadata={"method": meta["method"]})


# ---- 5. Command line.


def read_prompt_file(path: str) -> list[str]:
    if not path:
        return []
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prompt-file '{path}' does not exist (one prompt a line).")
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file '{path}' is not a UTF-8 text file (one prompt a line).") from None


def earlier_samples(out: Path) -> set[Path]:
    """The images (and mask overlays) an earlier `sample` wrote to `out`, as its samples.jsonl lists them: what
    --overwrite removes when this run does not rewrite them. Anything else there stays."""
    try:
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
        names = [r["file"] for r in rows]
    except Exception:  # none, or not ours
        return set()
    ours = [n for n in names if isinstance(n, str) and re.fullmatch(r"\d+_\d+\.png", n)]  # our names, no paths
    return {out / m for n in ours for m in (n, n.replace(".png", "_masks.png")) if (out / m).is_file()}


def recorded_base(a, meta: dict) -> tuple[str, str]:
    """--pretrained-model and --variant, else the base model the concept records and its variant (an SD 2.x single
    file needs one): a recorded variant belongs to the recorded base only."""
    return (a.pretrained_model, a.variant) if a.pretrained_model else (meta["base_model"], a.variant or meta.get("variant", ""))


def run_sample(a: DCIArgs):
    if not a.concept:
        raise ValueError("pass --concept DIR, the output folder of `dci_ico.py train`.")
    meta = read_metadata(a.concept)
    lines = read_prompt_file(a.prompt_file)  # bad input fails before the model loads
    sdm.prepare_output_dir(a.output_dir, a.overwrite, create=False)
    device = sdm.pick_device(a.device)
    base, variant = recorded_base(a, meta)
    model = sdm.load_model(base, a.precision, a.vae_precision, device, variant,
                           a.compile, a.channels_last, a.vae, a.clip_skip)
    ico = ICO.load(a.concept, model)
    if (trained := meta.get("clip_skip", 1)) != a.clip_skip:  # V and dW were learned on that layer's output
        warnings.warn(f"this concept was trained with --clip-skip {trained}; sampling with --clip-skip {a.clip_skip}.")
    prompts = [p for p in [a.prompt, *lines] if p.strip()]
    if not prompts:
        raise ValueError("pass --prompt (with V, {} or the concept tokens) or --prompt-file.")
    prompts = [resolve_prompt(p, ico) for p in prompts]
    check_sampling(model, a.steps, a.sampler, a.tau, a.gamma, a.height or model.cfg.image_size, a.width or model.cfg.image_size)
    window = a.dci and any(in_window(t, a.tau, model.schedule.cfg.num_train_timesteps) for t in model.schedule.timesteps(a.steps))
    check_prompts(model, ico, prompts, need_noun=window)  # bad prompts fail before anything is written
    # every prompt's auxiliary prompt, before anything is written: a longer prompt may push it over 77 tokens, and the
    # automatic noun may find every preset noun in a prompt
    nouns = {p: a.aux_noun or pick_aux_noun(model, ico.class_word, prompts=[p]) for p in prompts} if window else {}
    for p, noun in nouns.items():
        make_branches(model, ico, [p], noun)
    if a.save_masks and not window:
        warnings.warn("--save-masks: no step is in the DCI window (--no-dci, --tau 0, or steps that all have "
                      "t/1000 <= 1 - tau), so there are no masks to save.")
    out = sdm.prepare_output_dir(a.output_dir, a.overwrite)
    earlier = earlier_samples(out) if a.overwrite else set()
    rows, written, f = [], set(), model.vae.downsample_factor
    # One batch of --batch-size a prompt, each from --seed (sample.py's --from-file loop): a prompt's images are the same
    # alone or in a file, and the UNet batch does not grow with the file (it held every prompt's images at once).
    for p in prompts:
        record = {} if a.save_masks else None
        images, aux = sample(model, ico, [p] * a.batch_size, aux_noun=nouns.get(p, ""), dci=a.dci, tau=a.tau, gamma=a.gamma,
                             share_guidance=a.share_guidance, share_noise=a.share_noise, steps=a.steps, sampler=a.sampler,
                             eta=a.eta, guidance_scale=a.guidance_scale, negative_prompt=a.negative_prompt,
                             height=a.height or None, width=a.width or None,
                             generator=torch.Generator(device).manual_seed(a.seed), record=record)
        for j, img in enumerate(sdm.tensor_to_images(images)):
            name = f"{a.seed:04d}_{len(rows):02d}"
            sdm.save_image(img, out / f"{name}.png")
            written.add(out / f"{name}.png")
            if record:
                sdm.save_image(mask_overlays(img, record, j, (images.shape[-2] // f, images.shape[-1] // f)), out / f"{name}_masks.png")
                written.add(out / f"{name}_masks.png")
            rows.append({"file": f"{name}.png", "prompt": p, "aux_prompt": aux[j] if aux else None, "seed": a.seed})
    sdm.atomic_write(out / "samples.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    sdm.atomic_write(out / "args.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(a), indent=1)))
    for stale in earlier - written:  # after the new files are in place: the earlier run's files this one did not rewrite
        stale.unlink()
    aux = rows[0]["aux_prompt"]
    print(f"wrote {len(rows)} image(s) to {out}" + (f"; auxiliary prompt: '{aux}'" if aux else ""))


def run_export(a: ExportArgs):
    if not a.concept or not a.output_dir:
        raise ValueError("pass --concept DIR (the output folder of `dci_ico.py train`) and --output-dir DIR.")
    meta = read_metadata(a.concept)
    out = sdm.prepare_output_dir(a.output_dir, a.overwrite, create=False)  # the writers make it: a refusal leaves none
    base, variant = recorded_base(a, meta)
    model = sdm.load_model(base, device="cpu", variant=variant)
    ico = ICO.load(a.concept, model)  # refuses another base model: W_base + dW needs the W_base dW was trained on
    files = export_diffusers(ico, model, out, {k: meta[k] for k in ("method", "base_model", "steps", "seed") if k in meta},
                             sdm.DTYPES[a.save_precision])
    print(f"wrote {', '.join(f.name for f in files)} to {out}; in diffusers, prompt '{resolve_prompt('a {}', ico)}' "
          "after the loading recipe of README.md (ICO in diffusers)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"train": (ICOArgs, "ICO fine-tuning (or --no-contexts: the manual template)"),
                "sample": (DCIArgs, "DCI sampling of a trained concept (or --no-dci: plain sampling)"),
                "export": (ExportArgs, "a trained concept in diffusers' Custom Diffusion layout")}
    if not argv or argv[0] not in commands:
        sys.exit("usage: python dci_ico.py {train,sample,export} [options]; see python dci_ico.py train --help")
    cls, desc = commands[argv[0]]
    # argparse takes "-inf" and "-1e9" for options (it knows only "-2"-style negatives): glue them to --gamma
    for i in range(len(argv) - 2, 0, -1):
        if argv[i] == "--gamma" and re.fullmatch(r"-(inf(inity)?|nan|[\d.]+(e[+-]?\d+)?)", argv[i + 1], re.I):
            argv[i:i + 2] = [f"--gamma={argv[i + 1]}"]
    args = sdm.parse_args(cls, argv[1:], argparse.ArgumentParser(prog=f"dci_ico.py {argv[0]}", description=desc))
    try:
        if argv[0] == "train":
            print(f"wrote {train(args)}")
        else:
            (run_sample if argv[0] == "sample" else run_export)(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
