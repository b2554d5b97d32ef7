"""DCO: Direct Consistency Optimization (Lee, Kwak, Sohn, Shin 2024, arXiv:2402.12004), with consistency
("reward") guidance and LoRA merging, on SD 1.x, SDXL and the toy model.

A LoRA (Hu et al. 2021, arXiv:2106.09685) on the UNet's attention projections is fine-tuned on a few
reference images with a DPO-style loss whose implicit reward is the fine-tuned model's denoising error
*relative to the frozen pretrained model* at the same (z_t, t, eps) (methods/dco.md Sec. 2):

    l_theta = ||eps_theta(z_t; c, t) - eps||^2,   l_ref = ||eps_pre(z_t; c_base, t) - eps||^2   (per-element means)
    L_DCO   = -log sigmoid(-beta (l_theta - l_ref)) = softplus(beta (l_theta - l_ref))

eps_pre is the same UNet with the LoRA switched off (`disabled`), under no_grad; both passes share z_t, t
and eps. With learned tokens (pivotal tuning) c holds the new token ("a <dog> on a ledge") and c_base the
class word ("a dog on a ledge"). dL/dl_theta = beta sigmoid(beta Delta): DreamBooth's MSE gradient times a
weight that is beta/2 at the start and vanishes once the model beats the prior by ~1/beta (card Sec. 2.4).
beta <= 0 is plain DreamBooth-LoRA, so the baseline is this same code. Sampling adds consistency guidance
(card Sec. 4, reward_guidance.py l.506-510), 3 UNet evaluations a step:

    eps_hat = eps_pre(0) + w_text [eps_pre(c_base) - eps_pre(0)] + w_cons [eps_ft(c) - eps_pre(c_base)]

Where we differ from the official code (kyungmnlee/dco @451910b), each deliberately (card Sec. 6):
- Reduction: the official code averages the MSE over the whole batch *before* the log-sigmoid,
  -log sigma(-beta mean_b Delta_b); we apply softplus per sample, then average, mean_b softplus(beta Delta_b).
  The two are equal at batch size 1 (the official default). Min-SNR weighting (`--snr-gamma`, Hang et al.
  2023) multiplies both per-sample MSEs before the softplus, as the official code does.
- Learned tokens really train in fp16/bf16 (card 6.1: the official code trains a detached copy, so
  "<dog>" stays "dog"). The new rows are fp32 parameters outside the frozen tables (`CLIPTextModel.embed`),
  so every pretrained row stays bit-identical; after each step each new row is rescaled to its
  initializer's norm (retract_embeddings, customize.py l.223-235). A "" initializer draws randn * std
  and keeps *that row's* norm (the official code rescales it to the scalar std, card Sec. 3 quirk).
- SDXL pooled text: our CLIP pools at the first <|endoftext|>, so a new token (id 49408) does not move
  the pooled position as transformers' legacy argmax(ids) pooling does (card 6.2). Consequence: at
  init the TI prompt and the base prompt give identical conditions and the loss is exactly ln 2.
- The reference pass and guidance switch the LoRA off (the rebuttal's disable_adapters) instead of the
  scale-0 kwarg (card 6.8); the reference conditions are repeated per sample (card 6.4: B must be 1
  there); guidance works at any batch size and resolution and keeps the guidance term when w_text <= 1
  (card 6.6). Prior preservation and text-encoder LoRA, broken in the official code, are left out.
- TIES-SVD merging applies each LoRA's alpha/r once (peft's add_weighted_adapter applies it twice in its
  SVD path; the same at DCO's alpha = r).

    python dco.py train --images refs/ --captions captions.json --output-dir out/dog   # + standard flags
    python dco.py sample --lora out/dog --prompt "a <dog> on the beach" --w-cons 3 --output-dir samples
    python dco.py merge --lora out/dog out/style --weights 1 1 --output merged.safetensors
    python dco.py merge --lora out/dog out/cat --token "<dog>" "<cat>" --output pets.safetensors  # both learned <sks>
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import sd_model as sdm
import weights_convert as wc

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # peft target_modules of customize.py l.506: every UNet Attention


# ---- 1. Config: official defaults (customize.py parse_args l.69-142, README, card Sec. 3 and 7).


@dataclass
class DCOArgs(sdm.TrainArgs):
    images: str = ""  # folder of reference images, or of kohya's N_prompt subfolders (N repeats an epoch)
    captions: str = ""  # JSON (official layout, or one config) or JSONL captions; "" = NAME.caption files / --instance-prompt
    config_name: str = ""  # which entry of an official config.json ("full_ti", "style", ...)
    caption_extension: str = ".caption"  # kohya's layout and default: each image's caption in NAME.caption beside it
    instance_prompt: str = ""  # the caption of every image without a caption file (kohya's class tokens)
    base_prompt: str = ""  # its class-word version; "" = each learned token replaced by its initializer word
    inserting_tokens: list[str] = field(default_factory=list)  # new tokens, e.g. <dog>; overrides the file's
    initializer_tokens: list[str] = field(default_factory=list)  # one-token words they start from, e.g. dog
    rank: int = 32  # README: 32 for a subject, 64 for a style
    lora_alpha: float = 0.0  # 0 = rank (LoraConfig(lora_alpha=rank): scale alpha/r = 1)
    dco_beta: float = 1000.0  # --dcoloss_beta; <= 0 = plain DreamBooth-LoRA loss
    snr_gamma: float = 0.0  # Min-SNR gamma for both MSEs (off by default, as officially); 0 = off
    offset_noise: float = 0.0  # 0.1 for style in the README
    text_encoder_lr: float = 5e-6  # learned-token rows (README)
    adam_weight_decay: float = 1e-4
    center_crop: bool = False  # the official dataset random-crops after resizing the short side
    cache_latents: bool = True  # images already at the resolution: encode once, sample the posterior each step (exact)
    cache_text_embeddings: bool = True  # frozen prompts (no learned tokens) encoded once, as --pre_compute_text_embeddings
    learning_rate: float = 5e-5
    max_grad_norm: float = 1.0  # clipped before AdamW (card Sec. 2.4: early steps are all clipped at beta/2)
    max_train_steps: int = 2000  # subject; 1000 for a style
    checkpointing_steps: int = 1000
    w_cons: float = 3.0  # validation images use consistency guidance with w_text = 7.5 (README)
    minima = {"rank": 1, "lora_alpha": 0, "snr_gamma": 0, "offset_noise": 0, "text_encoder_lr": 0, "adam_weight_decay": 0}
    aliases = {"rank": ["network_dim"], "lora_alpha": ["network_alpha"], "offset_noise": ["noise_offset"]}  # kohya's spellings


# ---- 2. LoRA as forward hooks: out = W x + s (alpha/r) B A x on the target Linears.


class LoRALayer(nn.Module):
    """One low-rank update delta-W = (alpha/r) B A (Hu et al. 2021, Eq. 3); `down` = A, `up` = B."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, device=None):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(rank, d_in, device=device))
        self.up = nn.Parameter(torch.zeros(d_out, rank, device=device))  # B = 0: the model starts at W0
        self.alpha, self.rank = float(alpha), rank

    def delta_weight(self):
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())

    def forward(self, x):  # cast to the activations' dtype: half-precision sampling without autocast
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) * (self.alpha / self.rank)


class LoRA(nn.Module):
    """A named adapter: LoRA layers keyed by module path ('.' -> '_'), a user `scale` and an on/off switch.
    Several adapters can be installed on one UNet at once (`install(unet, subject, style)`)."""

    def __init__(self, layers: dict[str, LoRALayer], name: str = "default"):
        super().__init__()
        self.name, self.scale, self.enabled, self.tokens = name, 1.0, True, []  # tokens: learned with it (file metadata)
        self.layers = nn.ModuleDict({p.replace(".", "_"): layer for p, layer in layers.items()})
        self.paths = {p.replace(".", "_"): p for p in layers}

    @classmethod
    def create(cls, unet: nn.Module, rank: int = 32, alpha: float | None = None, name: str = "default", generator=None):
        """peft's LoraConfig(r, lora_alpha, init_lora_weights="gaussian") on every target (customize.py
        l.502-508): A ~ N(0, std 1/r), B = 0, so delta-W = 0 at step 0."""
        layers = {}
        for path, m in target_linears(unet).items():
            layers[path] = layer = LoRALayer(m.in_features, m.out_features, rank, alpha or rank, m.weight.device)
            A = torch.randn(rank, m.in_features, generator=generator) / rank
            if m.weight.device.type != "meta":
                layer.down.data.copy_(A)
        return cls(layers, name)

    @classmethod
    def from_tensors(cls, layers: dict[str, tuple], name: str = "default"):
        """From {module path: (A, B, alpha)}, e.g. read from a file or merged."""
        out = {}
        for path, (A, B, alpha) in layers.items():
            out[path] = layer = LoRALayer(A.shape[1], B.shape[0], A.shape[0], alpha, A.device)
            layer.down.data.copy_(A), layer.up.data.copy_(B)
        return cls(out, name)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        return {self.paths[k]: self.scale * layer.delta_weight() for k, layer in self.layers.items()}


def target_linears(unet: nn.Module) -> dict[str, nn.Linear]:
    """The Linears LoRA wraps: q/k/v/out of every attention (SD1.5: 128, SDXL: 560)."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, nn.Linear)
            and name.endswith(tuple("." + t for t in TARGETS)) and ".transformer_blocks." in name}


@contextlib.contextmanager
def install(unet: nn.Module, *loras: LoRA):
    """Forward hooks adding every enabled adapter's s B A x to its Linear's output; removed on exit.
    Hooks are stateless, so the second forward under gradient checkpointing is the same."""
    handles, modules = [], dict(unet.named_modules())
    for path in sorted({p for lora in loras for p in lora.paths.values()}):
        key = path.replace(".", "_")
        mine = [lora for lora in loras if key in lora.layers]

        def hook(mod, inputs, out, mine=mine, key=key):
            for lora in mine:
                if lora.enabled and lora.scale != 0:
                    out = out + (lora.scale * lora.layers[key](inputs[0])).to(out.dtype)
            return out

        handles.append(modules[path].register_forward_hook(hook))
    try:
        yield unet
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def disabled(*loras: LoRA):
    """The pretrained model W0: the same UNet with these adapters off (the rebuttal's disable_adapters)."""
    before = [lora.enabled for lora in loras]
    for lora in loras:
        lora.enabled = False
    try:
        yield
    finally:
        for lora, was in zip(loras, before):
            lora.enabled = was


# ---- 3. LoRA files: PEFT/diffusers keys and kohya keys, both in the names other tools use.


def diffusers_names(unet) -> dict[str, str]:
    """LDM module path -> diffusers module path for every LoRA target: weights_convert's
    diffusers -> LDM block arithmetic applied to every transformer-holding block, then inverted."""
    cfg, n, levels = unet.cfg, unet.cfg.num_res_blocks, len(unet.cfg.channel_mult)
    blocks = ([f"down_blocks.{i}.attentions.{j}" for i in range(levels) for j in range(n)]
              + [f"up_blocks.{i}.attentions.{j}" for i in range(levels) for j in range(n + 1)] + ["mid_block.attentions.0"])
    ldm = [k[:-2] for k in wc.diffusers_unet_to_ldm({b + ".x": None for b in blocks}, cfg)]
    prefix = dict(zip(ldm, blocks))
    out = {}
    for path in target_linears(unet):
        head, rest = re.match(r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.(.*)", path).groups()
        out[path] = f"{prefix[head]}.{rest}"
    return out


def kohya_name(unet, path: str, dnames: dict) -> str:
    """kohya's sd-scripts name: SD1/SD2 train on the diffusers UNet, SDXL on the sgm (LDM) one."""
    return "lora_unet_" + (path if unet.cfg.adm_in_channels else dnames[path]).replace(".", "_")


def lora_state_dict(unet, loras: list[LoRA], fmt: str = "peft") -> dict[str, torch.Tensor]:
    """One adapter (several are summed exactly by concatenating ranks, see `merge`) as file tensors.
    peft: `unet.<diffusers path>.lora_A/lora_B.weight` (diffusers' load_lora_weights, alpha in metadata);
    kohya: `lora_unet_<path>.lora_down/lora_up.weight` + `.alpha` (A1111, ComfyUI, diffusers)."""
    lora = loras[0] if len(loras) == 1 else merge(loras, [1.0] * len(loras))
    dnames, out = diffusers_names(unet), {}
    for key, layer in lora.layers.items():
        path = lora.paths[key]
        B = layer.up.detach().float() * lora.scale
        if fmt == "peft":
            base = f"unet.{dnames[path]}"
            out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = layer.down.detach().float(), B
        else:
            base = kohya_name(unet, path, dnames)
            out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"] = layer.down.detach().float(), B
            out[f"{base}.alpha"] = torch.tensor(layer.alpha)
    return out


def save_lora(path, unet, loras: list[LoRA], fmt: str = "peft", metadata: dict | None = None) -> None:
    lora = loras[0] if len(loras) == 1 else merge(loras, [1.0] * len(loras))
    sd = lora_state_dict(unet, [lora], fmt)
    meta = {"method": "dco", "format": fmt, **(metadata or {})}
    if fmt == "peft":  # what diffusers' save_lora_weights(unet_lora_adapter_metadata=...) writes
        # peft's config holds one r / lora_alpha; layers that differ (a sum over different layer sets, TIES-SVD
        # capped at min(out, in)) go in rank_pattern / alpha_pattern under their full module names
        dnames = diffusers_names(unet)
        ra = {dnames[lora.paths[k]]: (layer.rank, layer.alpha) for k, layer in lora.layers.items()}
        r0, a0 = max(set(ra.values()), key=list(ra.values()).count)
        meta["lora_adapter_metadata"] = {"unet.r": r0, "unet.lora_alpha": a0, "unet.target_modules": list(TARGETS),
                                         "unet.init_lora_weights": "gaussian",
                                         "unet.rank_pattern": {d: r for d, (r, _) in ra.items() if r != r0},
                                         "unet.alpha_pattern": {d: a for d, (_, a) in ra.items() if a != a0}}
    else:
        # sd-scripts' resize_lora writes "Dynamic" where the layers' ranks (alphas) differ; each .alpha is in the file
        ranks, alphas = {layer.rank for layer in lora.layers.values()}, {layer.alpha for layer in lora.layers.values()}
        meta.update(ss_network_module="networks.lora", ss_network_dim=ranks.pop() if len(ranks) == 1 else "Dynamic",
                    ss_network_alpha=alphas.pop() if len(alphas) == 1 else "Dynamic")
        # A1111 reads the base version off these two (network.py detect_version) and hides a LoRA of another version;
        # a file with metadata but neither counts as SD 1.x, so an SDXL or SD 2.x LoRA was hidden under its own model
        xl, v2 = bool(unet.cfg.adm_in_channels), unet.cfg.use_linear_in_transformer and not unet.cfg.adm_in_channels
        meta.update(ss_base_model_version="sdxl_base_v1-0" if xl else "sd_v2" if v2 else "sd_v1", ss_v2=str(v2))
    sdm.save_safetensors(sd, path, meta)


def load_lora(path, unet, name: str = "default") -> LoRA:
    """A LoRA file in either convention (PEFT/diffusers `lora_A`/`lora.down`, kohya `lora_down` +
    `.alpha`; LDM or diffusers module names) as an adapter on this UNet."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():  # diffusers' save_lora_weights / save_lora_adapter, or peft's save_pretrained
        path = path / "adapter_model.safetensors" if (path / "adapter_model.safetensors").is_file() \
            else path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at '{path}'.")
    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:  # a .pt/.bin or truncated file: safetensors' own error is a traceback
        raise ValueError(f"'{path}' is not a readable safetensors LoRA file ({e}); convert it to .safetensors.") from None
    peft_meta = json.loads(meta.get("lora_adapter_metadata", "{}"))
    config = path.parent / "adapter_config.json"  # peft's save_pretrained keeps its LoraConfig beside the weights
    if not peft_meta and config.is_file():
        peft_meta = json.loads(config.read_text())
    if not any(k.startswith("unet.") for k in peft_meta):  # a model's save_lora_adapter writes peft's config bare;
        peft_meta = {f"unet.{k}": v for k, v in peft_meta.items()}  # a pipeline's save_lora_weights prefixes "unet."
    if peft_meta.get("unet.use_dora") or any("lora_magnitude_vector" in k for k in sd):
        raise ValueError(f"'{path}' is a DoRA adapter (use_dora: a learned magnitude per output row); "
                         "this loader reads plain LoRA only.")
    dnames = diffusers_names(unet)
    known = {}  # every spelling of a target -> its LDM path: LDM or diffusers names, dotted or kohya's
    for p, d in dnames.items():
        known.update({p: p, d: p, "lora_unet_" + p.replace(".", "_"): p, "lora_unet_" + d.replace(".", "_"): p})
    parts: dict[str, dict] = {}
    te = [k for k in sd if k.startswith(("lora_te", "text_encoder.", "te_"))]
    if te:
        raise ValueError(f"'{path}' also trains the text encoder ('{te[0]}', ...); this loader reads UNet LoRAs only "
                         "(DCO's LoRA is UNet-only): save the UNet part alone, or drop the text-encoder keys.")
    if not any(re.search(r"\.(lora_[AB]|lora[._](down|up))\.weight$", k) for k in sd):  # no LoRA at all: say what it is
        kind = ("learned token embeddings; give it with --embeddings" if meta.get("format") in ("diffusers", "a1111") else
                "a training state; give its checkpoint folder" if any(k.startswith("param.") for k in sd) else
                f"another method's weights (its metadata says method={meta['method']})" if meta.get("method", "dco") != "dco" else "")
        if kind:
            raise ValueError(f"'{path}' holds no LoRA but {kind}.")
    keys = {}
    for k in sd:
        m = re.match(r"(?:unet\.|base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$|(.+)\.alpha$", k)
        if m is None:
            raise ValueError(f"'{path}' is not a UNet LoRA file: unexpected key '{k}'.")
        keys[k] = (m[1], m[2]) if m[1] else (m[3], "alpha")
    if other := sorted({mod for mod, _ in keys.values() if mod not in known}):
        if not any(re.search(r"[._](to_q|to_k|to_v|to_out[._]0)$", mod) for mod in other):  # fits, but adapts more layers
            raise ValueError(f"LoRA '{path}' also adapts layers this loader does not ('{other[0]}', {len(other)} in all): "
                             f"it reads LoRAs on the attention projections {', '.join(TARGETS)} only, as DCO trains them.")
        raise ValueError(f"LoRA '{path}' does not fit this base model: it has no layer '{other[0]}'; "
                         "use the model it was trained on.")
    for k, v in sd.items():
        mod, kind = keys[k]
        parts.setdefault(known[mod], {})["alpha" if kind == "alpha" else "A" if kind in ("lora_A", "lora.down", "lora_down") else "B"] = v
    lin = target_linears(unet)
    layers = {}
    for p, d in parts.items():
        if not {"A", "B"} <= d.keys():
            raise ValueError(f"LoRA '{path}' is incomplete: layer {p} lacks its down (A) or up (B) matrix.")
        A, B = d["A"].float(), d["B"].float()
        if "alpha" in d and d["alpha"].numel() != 1:
            raise ValueError(f"LoRA '{path}' is malformed: layer {p}'s alpha holds {d['alpha'].numel()} values, not one.")
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:  # kohya's conv LoRAs (4-d) target no attention Linear
            raise ValueError(f"LoRA '{path}' is malformed: layer {p} has down {tuple(A.shape)} and up {tuple(B.shape)}, "
                             "not (rank, in) and (out, rank).")
        if A.shape[1] != lin[p].in_features or B.shape[0] != lin[p].out_features:
            raise ValueError(f"LoRA '{path}' does not fit this base model: layer {p} is {B.shape[0]}x{A.shape[1]} "
                             f"there and {lin[p].out_features}x{lin[p].in_features} here; use the model it was trained on.")
        layers[p] = (A, B, float(d["alpha"]) if "alpha" in d else peft_alpha(peft_meta, dnames[p], A.shape[0]))
    device = next(iter(lin.values())).weight.device
    lora = LoRA.from_tensors(layers, name).to("cpu" if device.type == "meta" else device)  # meta: a skeleton UNet (merge)
    with contextlib.suppress(ValueError, TypeError):  # the learned tokens `train` or `merge` wrote it with
        lora.tokens = [t for t in json.loads(meta.get("tokens", "[]")) if isinstance(t, str)]
    with contextlib.suppress(ValueError, TypeError):  # merge --token: the names they had before, one per token
        lora.renamed_from = [t for t in json.loads(meta.get("renamed_from", "[]")) if isinstance(t, str)]
    with contextlib.suppress(ValueError, TypeError):  # ours, or kohya's ("None" when it trained without)
        lora.clip_skip = int(meta.get("clip_skip") or meta.get("ss_clip_skip"))
    return lora


def peft_alpha(meta: dict, module: str, rank: int) -> float:
    """A layer's alpha in our alpha/r convention, from peft's config (diffusers' adapter metadata or peft's
    adapter_config.json): the alpha_pattern key matching the module name as peft matches it (a suffix at a '.'
    boundary), else lora_alpha, else the rank (alpha/r = 1). rsLoRA (Kalajdzievski 2023) scales by
    alpha/sqrt(r), which is alpha*sqrt(r) over r."""
    alpha = float(meta.get("unet.lora_alpha", rank))
    for key, a in (meta.get("unet.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", module):
            alpha = float(a)
            break
    return alpha * math.sqrt(rank) if meta.get("unet.use_rslora") else alpha


def merge(loras: list[LoRA], weights: list[float], method: str = "sum", density: float = 1.0, rank: int = 0) -> LoRA:
    """Several adapters as one. "sum": W0 + sum_i w_i dW_i exactly (ranks concatenated; the README's
    set_adapters([subject, style], [1, 1]), card Sec. 5). "ties_svd": TIES (Yadav et al. 2023,
    arXiv:2306.01708: trim to `density`, elect signs, disjoint mean) of the w_i dW_i, then the best
    rank-`rank` factorisation (truncated SVD), as peft's add_weighted_adapter(combination_type="ties_svd")."""
    if method == "ties_svd" and not (0 < density <= 1 and rank >= 0):
        raise ValueError(f"ties_svd needs 0 < --density <= 1 and --rank >= 0 (got density {density}, rank {rank}).")
    paths = {k: lora.paths[k] for lora in loras for k in lora.layers}
    merged = {}
    for key, path in paths.items():
        have = [(lora, w) for lora, w in zip(loras, weights) if key in lora.layers]
        if method == "sum":
            A = torch.cat([lora.layers[key].down.detach().float() for lora, _ in have])
            B = torch.cat([w * lora.scale * (lora.layers[key].alpha / lora.layers[key].rank) * lora.layers[key].up.detach().float()
                           for lora, w in have], dim=1)
            merged[path] = (A, B, float(A.shape[0]))
        elif method == "ties_svd":
            deltas = torch.stack([lora.scale * lora.layers[key].delta_weight().detach() for lora, _ in have])
            if density < 1:  # trim: keep exactly the top `density` fraction of each delta by magnitude (ties
                k = max(1, int(density * deltas[0].numel()))  # broken by index, as peft's magnitude prune does)
                flat = deltas.flatten(1)
                keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(k, dim=1).indices, True)
                deltas = deltas * keep.view_as(deltas)
            agree = deltas.sign() == torch.where(deltas.sum(0) >= 0, 1.0, -1.0)  # elected sign ("total")
            w = torch.tensor([w for _, w in have]).view(-1, 1, 1)
            dW = (deltas * w * agree).sum(0) / agree.sum(0).clamp(min=1)
            r = rank or max(lora.layers[key].rank for lora, _ in have)
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            A, B = Vh[:r].contiguous(), (U[:, :r] * S[:r]).contiguous()
            merged[path] = (A, B, float(len(A)))  # alpha = the rank kept: only min(out, in) factors exist when r exceeds it
        else:
            raise ValueError(f"unknown merge method '{method}'; use sum or ties_svd.")
    return LoRA.from_tensors(merged, name="merged")


# ---- 4. Learned tokens (pivotal tuning): fp32 rows outside the frozen embedding tables.


class LearnedTokens(nn.Module):
    """New tokens' embedding rows, one trainable fp32 table per text encoder (SDXL: clip_l, clip_g),
    passed to `encode_prompt(..., extra=self.extra)`; the pretrained tables are never touched."""

    def __init__(self, model: sdm.StableDiffusion, tokens: list[str], rows: list[torch.Tensor], initializers: list[str]):
        super().__init__()
        table = model.text_encoder.token_embedding.num_embeddings
        ids = model.tokenizer.add_tokens(tokens)  # refuses a token that already exists
        if ids != list(range(table, table + len(tokens))):
            raise ValueError(f"the tokenizer already has added tokens; new tokens {tokens} must follow the "
                             f"{table}-row embedding table directly.")
        self.tokens, self.initializers = list(tokens), list(initializers)
        self.rows = nn.ParameterList([nn.Parameter(r.float().clone()) for r in rows])
        for i, r in enumerate(rows):  # target norms of customize.py's retract_embeddings
            self.register_buffer(f"norm{i}", r.float().norm(dim=-1))

    @classmethod
    def from_initializers(cls, model, tokens, initializers, generator=None):
        rows = []
        for enc in (model.text_encoder, model.text_encoder_2):
            if enc is None:
                continue
            w = enc.token_embedding.weight.detach().float()
            rows.append(torch.stack([w[model.tokenizer.token_id(word)] if word else
                                     torch.randn(w.shape[1], generator=generator).to(w.device) * w.std() for word in initializers]))
        return cls(model, tokens, rows, initializers)

    @property
    def extra(self):
        return (self.rows[0], self.rows[1] if len(self.rows) > 1 else None)

    @torch.no_grad()
    def renormalize(self):
        """After every optimizer step: each new row back to its initializer's norm (customize.py l.223-235)."""
        for i, r in enumerate(self.rows):
            r.mul_((getattr(self, f"norm{i}") / r.norm(dim=-1))[:, None])

    def base_prompt(self, prompt: str) -> str:
        """The prompt with every new token replaced by its initializer word (the reference model's prompt)."""
        for tok, word in zip(self.tokens, self.initializers):
            if word is None and tok in learned_in(prompt, self.tokens):
                raise ValueError(f"the embeddings do not say which word '{tok}' started from (a plain textual-inversion "
                                 "file); pass --base-prompt with the class word in its place, or --guidance cfg.")
        return in_words(prompt, self.tokens, self.initializers)

    def save(self, path, metadata: dict | None = None) -> None:
        write_embeddings(path, self.tokens, [r.detach() for r in self.rows], self.initializers, metadata)

    def save_per_token(self, folder, metadata: dict | None = None) -> list[Path]:
        """Each token alone, for tools that read one token a file. A1111 names an embedding after its file, so
        a1111/<name>.safetensors (SD 1.x `emb_params`; SDXL `clip_l` + `clip_g`, as A1111 and ComfyUI read it);
        with several tokens also <name>.learned_embeds.safetensors for diffusers' load_textual_inversion.
        Returns the files written."""
        written, names = [], []
        for i, t in enumerate(self.tokens):
            name, rows = re.sub(r"[^\w-]", "_", t).strip("_") or f"token{i}", [r[i : i + 1].detach() for r in self.rows]
            name = name if name not in names else f"{name}_{i}"  # <dog> and [dog] are both "dog": one file overwrote the other
            names.append(name)
            a1111 = Path(folder) / "a1111" / f"{name}.safetensors"
            if len(rows) > 1:
                write_embeddings(a1111, [t], rows, self.initializers[i : i + 1], metadata)
            else:
                sdm.save_embeddings(a1111, {t: rows[0]}, "a1111",
                                    {**(metadata or {}), "token": t, "initializer_tokens": self.initializers[i : i + 1]})
            written.append(a1111)
            if len(self.tokens) > 1:
                written.append(Path(folder) / f"{name}.learned_embeds.safetensors")
                write_embeddings(written[-1], [t], rows, self.initializers[i : i + 1], metadata)
        return written

    @classmethod
    def load(cls, path, model, names: list[str] | None = None) -> "LearnedTokens":
        """An embeddings file's tokens; `names`: one per token, what the prompt calls them instead of the file's names
        (diffusers' load_textual_inversion(token=...); e.g. A1111's dog.pt, named after a word)."""
        tokens, rows, inits = read_embeddings(path)
        if names:
            if len(names) != len(tokens) or len(set(names)) < len(names) or any(not n or n != "".join(n.split()) for n in names):
                raise ValueError(f"--token {' '.join(names)}: give '{path}' one distinct name per token, without spaces "
                                 f"(it holds {len(tokens)}: {', '.join(tokens)}).")
            tokens = list(names)
        encoders = [e for e in (model.text_encoder, model.text_encoder_2) if e is not None]
        if len(rows) != len(encoders) or any(r.shape[1] != e.cfg.width for r, e in zip(rows, encoders)):
            raise ValueError(f"embeddings '{path}' do not fit this base model (widths {[r.shape[1] for r in rows]}, "
                             f"model {[e.cfg.width for e in encoders]}); use the model they were trained on.")
        try:
            return cls(model, tokens, [r.to(model.device) for r in rows], inits)
        except ValueError as e:  # e.g. an A1111 file named after a word of the vocabulary ("dog.pt")
            raise ValueError(f"embeddings '{path}': {str(e).rstrip('.')}; at sampling, name it with --token.") from None


def token_spans(text: str, tokens) -> list[tuple[int, int, str]]:
    """(start, end, token) of each learned token where CLIP's tokenizer reads one in `text` (HTML-unescaped as it does):
    new tokens match verbatim, case included, anywhere, even inside a word ("<sks>foo" is <sks> + foo), leftmost
    first and the longest there ("sks2" is one token when both sks and sks2 are), as the tokenizers library matches
    its added tokens (a substring test would also find sks in sks2)."""
    spans, i, longest = [], 0, sorted({t for t in tokens if t}, key=len, reverse=True)
    while i < len(text):
        if t := next((t for t in longest if text.startswith(t, i)), None):
            spans.append((i, i + len(t), t))
        i += len(t) if t else 1
    return spans


def clip_text(text: str) -> str:
    return html.unescape(html.unescape(text))  # what CLIPTokenizer.tokenize reads


def learned_in(text: str, tokens) -> list[str]:
    """The learned tokens the tokenizer reads in `text`, each once, in order."""
    return list(dict.fromkeys(t for _, _, t in token_spans(clip_text(text), tokens)))


def replace_tokens(text: str, new: dict) -> str:
    """`text` as the tokenizer reads it, with each learned token (the keys) where it reads one replaced by new[token]."""
    text, out, last = clip_text(text), [], 0
    for start, end, tok in token_spans(text, new):
        out += [text[last:start], new[tok]]
        last = end
    return "".join(out) + text[last:]


def in_words(prompt: str, tokens, words) -> str:
    """The base prompt: each learned token replaced by the word it started from (none: dropped)."""
    return replace_tokens(prompt, {t: w or "" for t, w in zip(tokens, words)})


def write_embeddings(path, tokens: list[str], rows: list[torch.Tensor], initializers: list, metadata: dict | None = None) -> None:
    """diffusers format: {token: (1, d)} (SD1); SDXL {"clip_l": (n, 768), "clip_g": (n, 1280)} as DCO writes."""
    embeds = {"clip_l": rows[0], "clip_g": rows[1]} if len(rows) > 1 else {t: rows[0][i : i + 1] for i, t in enumerate(tokens)}
    sdm.save_embeddings(path, embeds, "diffusers", {"tokens": tokens, "initializer_tokens": initializers, **(metadata or {})})


def read_embeddings(path) -> tuple[list[str], list[torch.Tensor], list]:
    """(tokens, one (n, d) table per text encoder, initializer words) of a learned_embeds file, ours or a textual-
    inversion one (which does not say which word each token started from: None, and consistency guidance then
    needs --base-prompt, as the pretrained model cannot read the new tokens)."""
    from safetensors import safe_open

    try:
        embeds, meta = sdm.load_embeddings(path), {}
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                # only the lists are JSON: a token "[V]" (A1111 file's "token") or a base-model path is text
                meta = {k: json.loads(v) if k in ("tokens", "initializer_tokens") else v for k, v in (f.metadata() or {}).items()}
    except FileNotFoundError:
        raise FileNotFoundError(f"no embeddings file at '{path}'.") from None
    except Exception as e:  # safetensors, pickle and json each fail their own way on a file that is not one
        raise ValueError(f"'{path}' is not a readable embeddings file ({type(e).__name__}: {e}).") from None
    if not embeds or any(v.ndim != 2 for v in embeds.values()):
        raise ValueError(f"'{path}' holds no token embeddings (a (vectors, width) tensor per token).")
    if {"clip_l", "clip_g"} & set(embeds):  # the SDXL layout; one key alone fits only a model with that one encoder
        rows = [embeds[k] for k in ("clip_l", "clip_g") if k in embeds]
        tokens = meta.get("tokens") or [f"<s{i}>" for i in range(len(rows[0]))]
    else:
        if any(len(v) != 1 for v in embeds.values()):  # one id per token: extra rows would shift every later token's
            raise ValueError(f"embeddings '{path}' hold multi-vector tokens "
                             f"({', '.join(f'{k}: {len(v)}' for k, v in embeds.items() if len(v) != 1)} rows); "
                             "this loader reads one vector per token.")
        # safetensors gives the keys sorted: the order written, which the initializer words follow, is the metadata's
        tokens, written = list(embeds), meta.get("tokens")
        tokens = written if isinstance(written, list) and sorted(map(str, written)) == sorted(tokens) else tokens
        rows = [torch.cat([embeds[t] for t in tokens])]
        if tokens in (["emb_params"], ["*"]):  # A1111's layouts (.pt string_to_param {"*": ...}): A1111 types the file's name
            tokens = [meta.get("token") or Path(path).stem]  # ours: the token it was trained as, in its metadata
    if any(len(r) != len(tokens) for r in rows):
        raise ValueError(f"embeddings '{path}' have {[len(r) for r in rows]} rows for the {len(tokens)} tokens {tokens}; "
                         "each encoder needs one row per token.")
    return tokens, rows, meta.get("initializer_tokens") or [None] * len(tokens)


def combine_embeddings(files, names: list[str] | None = None) -> tuple[list[str], list[torch.Tensor], list, list[str]]:
    """Several learned_embeds files as one token set (`merge`): their tokens side by side, a token in two files once
    when its rows agree; sample reads one file, since new-token ids are given out in order. `names` (merge --token):
    one per token of the files in order, what the merged set calls it, as sample's --token renames one file's.
    Returns (tokens, rows, initializers, the name each token had in its file)."""
    read = [(f, *read_embeddings(f)) for f in files]
    given = [tok for _, t, _, _ in read for tok in t]
    if names and (len(names) != len(given) or any(not n or n != "".join(n.split()) for n in names)):
        raise ValueError(f"--token {' '.join(names)}: give one name without spaces per learned token of the inputs, "
                         f"in their order ({len(given)}: {' '.join(given)}).")
    new = iter(names or given)
    tokens, rows, inits, before, source = [], None, [], [], []
    for f, t, r, i in read:
        if rows is not None and [x.shape[1] for x in r] != [x.shape[1] for x in rows]:
            raise ValueError(f"embeddings '{f}' are for another base model than '{files[0]}' (widths differ).")
        for k, old in enumerate(t):
            if (tok := next(new)) in tokens:
                if not all(torch.equal(x[k], y[tokens.index(tok)]) for x, y in zip(r, rows)):
                    # a suggestion to copy: each later use of a name gets a number, "<sks>" -> "<sks2>"
                    seen, fix = {}, []
                    for n in names or given:
                        seen[n] = seen.get(n, 0) + 1
                        fix.append(n if seen[n] == 1 else re.sub(r"(>?)$", rf"{seen[n]}\1", n, count=1))
                    raise ValueError(f"'{source[tokens.index(tok)]}' and '{f}' both learned a token '{tok}', with different "
                                     f"embeddings; name each input's tokens apart with --token, one per learned token in "
                                     f"the inputs' order, e.g. --token {' '.join(fix)} (then prompt with those names).")
                continue
            rows = [x[k : k + 1] for x in r] if rows is None else [torch.cat([y, x[k : k + 1]]) for x, y in zip(r, rows)]
            tokens.append(tok), inits.append(i[k]), before.append(old), source.append(f)
    return tokens, rows, inits, before


# ---- 5. The DCO loss and one training step.


def dco_loss(eps_theta, eps_ref, target, beta: float, weight=None):
    """mean_b softplus(beta (l_theta,b - l_ref,b)), l = per-sample MSE (times the Min-SNR `weight`), card Sec. 2.3.

    The official code (customize.py l.935-941) reduces the MSEs over the whole batch first and takes one
    softplus(beta (mean_b l_theta,b - mean_b l_ref,b)); the two agree at batch size 1 (its default) and
    differ above it (there one sample's margin can switch off another's gradient). beta <= 0: the
    DreamBooth MSE mean_b w_b l_theta,b (l.942-943). Returns (loss, logs)."""
    l_theta = (eps_theta.float() - target.float()).square().mean(dim=(1, 2, 3))
    w = torch.ones_like(l_theta) if weight is None else weight
    if beta <= 0:
        return (w * l_theta).mean(), {"l_theta": l_theta.mean().item()}
    l_ref = (eps_ref.float() - target.float()).square().mean(dim=(1, 2, 3))
    delta = w * l_theta - w * l_ref
    logs = {"l_theta": l_theta.mean().item(), "l_ref": l_ref.mean().item(), "delta": delta.mean().item(),
            "dco_weight": (beta * w * torch.sigmoid(beta * delta)).mean().item()}  # dL/dl_theta, card Sec. 2.4
    return F.softplus(beta * delta).mean(), logs


def min_snr_weight(schedule: sdm.NoiseSchedule, t, gamma: float):
    """min(SNR_t, gamma) / SNR_t (Hang et al. 2023, arXiv:2303.09556); / (SNR_t + 1) for v-prediction."""
    a = schedule.alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / (snr + 1 if schedule.cfg.prediction == "v" else snr)


def dco_step(model: sdm.StableDiffusion, lora: LoRA, z0, cond: sdm.Cond, ref_cond: sdm.Cond, generator,
             beta: float = 1000.0, snr_gamma: float = 0.0, offset_noise: float = 0.0):
    """One DCO loss (card Sec. 2.1-2.3): draw t, eps (+ offset noise) from `generator`, noise z0 once, run
    the fine-tuned UNet on `cond` and, LoRA off and no_grad, the pretrained one on `ref_cond`."""
    b, dev = len(z0), z0.device
    noise = torch.randn(z0.shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(b, z0.shape[1], 1, 1, generator=generator)
    t = torch.randint(0, model.schedule.cfg.num_train_timesteps, (b,), generator=generator).to(dev)
    noise = noise.to(dev)
    z_t, target = model.schedule.q_sample(z0, t, noise), model.schedule.target(z0, noise, t)
    eps_theta = model.unet(z_t, t, cond.context, cond.y)
    eps_ref = None
    if beta > 0:
        with torch.no_grad(), disabled(lora):
            eps_ref = model.unet(z_t, t, ref_cond.context, ref_cond.y)
    weight = min_snr_weight(model.schedule, t, snr_gamma) if snr_gamma > 0 else None
    return dco_loss(eps_theta, eps_ref, target, beta, weight)


# ---- 6. Data: images + captions (official config.json layout, one config, JSONL, or kohya NAME.caption files), bad input refused.


def read_captions(path, config_name: str = "") -> dict:
    """{"images", "prompts"[, "base_prompts", tokens]} from the official config.json (one config, or --config-name of
    several), or a JSONL of rows {"image"|"file"|"file_name", "prompt"|"caption"|"text"[, "base_prompt"]} (the last
    two: Hugging Face imagefolder's metadata.jsonl)."""
    pick = lambda r, keys: next((r[k] for k in keys if k in r), None)
    try:
        text = Path(path).read_text()
        if str(path).endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError("a line is not a JSON object")
            d = {"images": [pick(r, ("image", "file", "file_name")) for r in rows],
                 "prompts": [pick(r, ("prompt", "caption", "text")) for r in rows]}
            if any("base_prompt" in r for r in rows):
                d["base_prompts"] = [r.get("base_prompt") for r in rows]
        else:
            d = json.loads(text)
            if not isinstance(d, dict) or not all(isinstance(v, dict) for v in ([d] if "images" in d else d.values())):
                raise ValueError("it is not an object of configs, or of images and prompts")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"captions file '{path}' is not readable as the official config.json or a JSONL of "
                         f"{{\"image\", \"prompt\"}} rows ({e}).") from None
    if "images" not in d:
        if not config_name and len(d) != 1:
            raise ValueError(f"captions file '{path}' holds several configs ({', '.join(d)}); pick one with --config-name.")
        if (config_name or next(iter(d))) not in d:
            raise ValueError(f"captions file '{path}' has no config '{config_name}'; it has {', '.join(d)}.")
        d = d[config_name or next(iter(d))]
    # strings, or a clear sentence instead of a TypeError later; a row may lack its base prompt (only learned tokens
    # need them, and load_data says so)
    for key in ("images", "prompts", "base_prompts", "inserting_tokens", "initializer_tokens"):
        optional = key == "base_prompts"
        if key in d and not (isinstance(d[key], list) and all(isinstance(x, str) or optional and x is None for x in d[key])):
            each = "one per learned token (e.g. [\"<dog>\"])" if key.endswith("tokens") else "one per image"
            raise ValueError(f"captions file '{path}': {key} must be a list of strings, {each}.")
    return d


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KOHYA_FOLDER = re.compile(r"(\d+)(?:_(.*))?", re.S)  # sd-scripts' "10_sks dog": split at the first "_", int() before it


def kohya_subsets(folder: Path) -> list[tuple[Path, int, str]] | None:
    """kohya's DreamBooth layout (sd-scripts' generate_dreambooth_subsets_config_by_subdirs): every subfolder named
    N_prompt, its images repeated N times an epoch, "prompt" the caption of those without a caption file (kohya's
    class tokens). [(subfolder, N, prompt)], or None for a flat folder (no subfolder starts with a count). kohya skips
    what does not fit (loose images, other names, N = 0) with at most a warning; here each is one sentence."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    parsed = {p: KOHYA_FOLDER.fullmatch(p.name) for p in subs}
    if not any(parsed.values()):
        return None
    if loose := sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        raise ValueError(f"'{folder}' mixes kohya's N_prompt subfolders with loose images ('{loose[0]}', {len(loose)} in "
                         "all); move those images into an N_prompt subfolder, or out of the folder.")
    if bad := [p.name for p, m in parsed.items() if m is None]:
        raise ValueError(f"'{folder}' mixes kohya's N_prompt subfolders with '{bad[0]}', whose name is not a repeat count, "
                         "'_' and the prompt (e.g. '10_sks dog'); rename it so, or move it out.")
    if zero := [p.name for p, m in parsed.items() if int(m[1]) < 1]:
        raise ValueError(f"'{folder / zero[0]}' repeats its images 0 times; give it a count of at least 1, or move it out.")
    return [(p, int(m[1]), m[2] or "") for p, m in parsed.items()]


def captioned_folder(folder: Path, ext: str, fallback: str, base: str, said: str, fix: str) -> tuple[list, list[str], list]:
    """A folder's images with their NAME<ext> captions (first line, as kohya reads it); an image without one takes
    `fallback` (--instance-prompt, or its kohya folder's prompt; `said` names it, `fix` says how to give one when it
    is empty) and `base` (None: made later)."""
    with warnings.catch_warnings():  # the caption files are not images; say nothing about them
        warnings.filterwarnings("ignore", rf"skipping '.*({re.escape(ext)}|\.txt|\.caption)'")
        named = sdm.load_image_folder(folder)
    images, prompts, bases, missing = [], [], [], []
    for name, img in named:
        cap = folder / (Path(name).stem + ext)
        if not cap.is_file():
            missing.append(name)
            images.append(img), prompts.append(fallback), bases.append(base or None)
            continue
        try:
            text = (cap.read_text(encoding="utf-8-sig").splitlines() or [""])[0].strip()  # -sig: Notepad's BOM
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"caption file '{cap}' is not readable UTF-8 text ({type(e).__name__}); save it as UTF-8.") from None
        if not text:
            raise ValueError(f"caption file '{cap}' has no caption on its first line; write one there, or delete the "
                             f"file so that the image takes {said}.")
        images.append(img), prompts.append(text), bases.append(None)
    stems = {Path(n).stem for n in missing}  # captions under the other common extension: the flag was forgotten
    near = sorted({p.suffix for p in folder.iterdir() if p.suffix in (".txt", ".caption") and p.suffix != ext and p.stem in stems})
    hint = f"; the folder has {near[0]} files: pass --caption-extension {near[0]}" if near else ""
    gap = (f"{len(missing)} of the {len(named)} images in '{folder}' have no caption file (e.g. no "
           f"{Path(missing[0]).stem}{ext} beside {missing[0]}{hint})") if missing else ""
    if missing and not fallback:
        raise ValueError(f"{gap}; write one beside each image, {fix}.")
    if missing and (len(missing) < len(named) or near):  # kohya warns too: a forgotten file is easy to miss
        warnings.warn(f"{gap}; they take {said}.", stacklevel=4)
    return images, prompts, bases


def load_caption_files(a: DCOArgs) -> tuple[list, list[str], list[str | None], list[int]]:
    """kohya's layouts: each image's caption on the first line of NAME<--caption-extension> beside it (kohya reads
    that line too); an image without one takes --instance-prompt, as kohya falls back to the class tokens, and
    --base-prompt. Or kohya's N_prompt subfolders (`kohya_subsets`): the folder's prompt instead, and N repeats.
    A base prompt left None is made from the caption once the learned tokens are known. Returns (images, prompts,
    base prompts, repeats)."""
    folder, ext = Path(a.images), a.caption_extension
    subsets = kohya_subsets(folder) if folder.is_dir() else None
    if subsets is None:
        images, prompts, bases = captioned_folder(folder, ext, a.instance_prompt, a.base_prompt, "--instance-prompt",
                                                  "give --instance-prompt TEXT for those without, or --captions FILE")
        if a.base_prompt and all(b is None for b in bases):
            raise ValueError(f"--base-prompt would be ignored: it is the base of --instance-prompt, and every image in "
                             f"'{folder}' has its own {ext} caption (whose base prompt puts each learned token's initializer "
                             "word in its place); drop --base-prompt.")
        return images, prompts, bases, [1] * len(images)
    if given := [f for f, v in (("--instance-prompt", a.instance_prompt), ("--base-prompt", a.base_prompt)) if v]:
        raise ValueError(f"{' and '.join(given)} would be ignored: in kohya's N_prompt subfolders of '{folder}' each "
                         "folder's name gives the prompt of its images without a caption file; drop the flag.")
    images, prompts, bases, repeats = [], [], [], []
    for sub, n, prompt in subsets:
        got = captioned_folder(sub, ext, prompt, "", f"their folder's prompt '{prompt}'",
                               "or name the folder N_prompt (e.g. 10_sks dog)")
        for have, more in zip((images, prompts, bases), got):
            have.extend(more)
        repeats.extend([n] * len(got[0]))
    return images, prompts, bases, repeats


def load_data(a: DCOArgs):
    """(images, prompts, base_prompts, tokens, initializers, repeats: how often each image comes in an epoch), checked
    against each other. A base prompt neither file nor flag gives is the caption with each learned token replaced by
    its initializer word, as `sample` makes consistency guidance's."""
    if a.captions:
        ignored = (("--instance-prompt", a.instance_prompt), ("--base-prompt", a.base_prompt),
                   ("--caption-extension", a.caption_extension != DCOArgs.caption_extension))
        if given := [f for f, v in ignored if v]:
            raise ValueError(f"{' and '.join(given)} would be ignored with --captions (the file gives each image its "
                             "prompt and base prompt); put them in the file, or drop --captions.")
        inside = list(Path(a.images).iterdir()) if a.images and Path(a.images).is_dir() else []
        if any(p.is_dir() and KOHYA_FOLDER.fullmatch(p.name) for p in inside) \
                and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in inside):
            raise ValueError(f"'{a.images}' holds kohya's N_prompt subfolders, whose repeats and prompts --captions would "
                             "ignore; drop --captions (caption files beside the images still win), or give a flat folder.")
        d = read_captions(a.captions, a.config_name)
        names, prompts = d.get("images") or [], d.get("prompts") or []
        if len(names) != len(prompts) or not names or None in names or None in prompts:
            raise ValueError(f"captions file '{a.captions}' must give one prompt per image "
                             f"({len(names)} images, {len(prompts)} prompts).")
        roots = [Path(a.images)] if a.images else []
        roots.append(Path(a.captions).parent)
        images = []
        for n in names:
            found = next((r / n for r in roots if (r / n).is_file()), Path(n) if Path(n).is_file() else None)
            if found is None:
                raise ValueError(f"captions file '{a.captions}' names '{n}', which is not in {a.images or roots[-1]}.")
            images.append(sdm.load_image(found))
        if a.images:
            listed = {Path(n).name for n in names}
            with warnings.catch_warnings():  # the captions file beside the images (the README's layout) is not an image
                if Path(a.captions).resolve().parent == Path(a.images).resolve():
                    warnings.filterwarnings("ignore", f"skipping '{re.escape(Path(a.captions).name)}'")
                extra = [n for n, _ in sdm.load_image_folder(a.images) if n not in listed]
            if extra:
                raise ValueError(f"'{a.images}' has images with no caption in '{a.captions}': {', '.join(extra)}; "
                                 "caption them or move them out.")
        bases = d.get("base_prompts") or [None] * len(prompts)
        if len(bases) != len(prompts):
            raise ValueError(f"captions file '{a.captions}' gives {len(bases)} base prompts for {len(prompts)} prompts; "
                             "give one per image, or none (each is then the prompt with the initializer words).")
        tokens, inits = a.inserting_tokens or d.get("inserting_tokens", []), a.initializer_tokens or d.get("initializer_tokens", [])
        repeats = [1] * len(images)
    else:
        if not a.images:
            raise ValueError("give --images DIR (captions in NAME.caption files beside the images, or --instance-prompt "
                             "TEXT), or --captions FILE.")
        images, prompts, bases, repeats = load_caption_files(a)
        tokens, inits = a.inserting_tokens, a.initializer_tokens
    if len(tokens) != len(inits):
        raise ValueError(f"{len(tokens)} inserting tokens but {len(inits)} initializer tokens; give one initializer per token.")
    if any(not str(t).strip() for t in tokens) or len(set(tokens)) < len(tokens):  # were a "contains none of ['']" or a
        said = "an empty one" if any(not str(t).strip() for t in tokens) else \
            f"'{next(t for t in tokens if tokens.count(t) > 1)}' twice"  # message about the tokenizer's added tokens
        raise ValueError(f"the inserting tokens {tokens} hold {said}; give each learned token once, as a non-empty string.")
    # the tokenizer takes "my dog" as one token, but reads it only where a prompt has exactly that text (also inside
    # "amy doggy"), and sample's and merge's --token refuse such names: refused here too, before anything is written
    if spaced := next((t for t in tokens if t != "".join(t.split())), None):
        raise ValueError(f"the inserting token '{spaced}' holds a space, which sample --token and merge --token refuse "
                         f"and CLIP reads as that token only where a prompt has exactly this text; give it without "
                         f"spaces (e.g. '<{'_'.join(spaced.strip('<>').split())}>').")
    bases = [in_words(p, tokens, inits) if b is None else b for p, b in zip(prompts, bases)]
    if tokens:
        for p in prompts:
            if not learned_in(p, tokens):
                raise ValueError(f"the prompt '{p}' contains none of the learned tokens {tokens}; put the token in every caption.")
        for p in bases:
            if learned_in(p, tokens):
                raise ValueError(f"the base prompt '{p}' contains a learned token; base prompts use the class word.")
    return images, prompts, bases if tokens else prompts, tokens, inits, repeats


class EpochOrder:
    """Which images each micro-batch takes, as the official DataLoader(shuffle=True) over the N images
    (card Sec. 3: one epoch = N samples): every image once per epoch, in a fresh permutation drawn from the
    training generator. Batches run on across an epoch's end instead of ending short. The permutation
    and the position are tensors in the checkpoint, so `--resume` continues mid-epoch. `repeats`: image i comes
    repeats[i] times an epoch (kohya's N_prompt folders; kohya's epoch, too, is every image N times, shuffled)."""

    def __init__(self, n: int, repeats: list[int] | None = None):
        self.slots = torch.arange(n) if repeats is None else torch.arange(n).repeat_interleave(torch.tensor(repeats))
        self.order, self.pos = self.slots.clone(), torch.tensor(len(self.slots))  # at an epoch's end: the first draw shuffles

    def draw(self, k: int, generator) -> list[int]:
        out = []
        for _ in range(k):
            if self.pos.item() == len(self.order):
                self.order.copy_(self.slots[torch.randperm(len(self.order), generator=generator)])
                self.pos.zero_()
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {"data.order": self.order, "data.pos": self.pos}


def check_resume(a: DCOArgs, slots: torch.Tensor) -> None:
    """`--resume` continues the checkpoint's image order, so it must have one, over these images and repeats (`slots`,
    EpochOrder's): checked before the model loads (otherwise a KeyError, a size mismatch inside
    sd_model.load_checkpoint, or an index past the images)."""
    from safetensors import safe_open

    ckpt = sdm.find_checkpoint(Path(a.output_dir), a.resume)
    if ckpt is None or not (ckpt / "training_state.safetensors").is_file():
        return  # a fresh start, or load_checkpoint's own sentence
    saved = None
    with safe_open(str(ckpt / "training_state.safetensors"), "pt") as f:
        order = f.get_tensor("param.data.order") if "param.data.order" in f.keys() else None
        with contextlib.suppress(ValueError, TypeError):
            saved = json.loads((f.metadata() or {}).get("args") or "null")
    # tokens as flags in one run and from the captions file in the other: load_checkpoint compares the flags, and said
    # "--initializer-tokens: [] there, ['dog'] here" even where both runs learn the same tokens; say which flags to give
    if isinstance(saved, dict) and "inserting_tokens" in saved and bool(saved["inserting_tokens"]) != bool(a.inserting_tokens):
        raise ValueError(f"checkpoint '{ckpt}' ran " + (
            f"with --inserting-tokens {' '.join(saved['inserting_tokens'])} --initializer-tokens "
            f"{' '.join(saved.get('initializer_tokens') or [])}, and this run without them; give them as that run did"
            if saved["inserting_tokens"] else "without --inserting-tokens (its tokens, if any, from the captions file), and "
            "this run with them; drop --inserting-tokens and --initializer-tokens as that run did") + ", or start a new run.")
    if order is None:  # written when images were drawn with replacement: that stream cannot be continued exactly
        raise ValueError(f"checkpoint '{ckpt}' has no image order (it was written before dco.py drew each epoch's "
                         "images in a fresh order), so it cannot continue exactly; finish it with the dco.py that "
                         "wrote it, or start a new run.")
    before, n = int(order.max()) + 1 if len(order) else 0, int(slots.max()) + 1  # every image is in every epoch
    if before != n:
        raise ValueError(f"checkpoint '{ckpt}' was trained on {before} images and this run has {n}; "
                         "resume with the same images, or start a new run.")
    if not torch.equal(order.sort().values, slots.sort().values):
        raise ValueError(f"checkpoint '{ckpt}' repeated its images other numbers of times an epoch (kohya's N_prompt "
                         "folder names); resume with the same folder names, or start a new run.")


def remove_stale_tokens(folder: Path, kept: list[Path]) -> None:
    """Token files an earlier run wrote into this folder and this one did not (--overwrite keeps final outputs until
    they are replaced): left there, `sample --lora FOLDER` read the old run's learned_embeds with the new LoRA.
    Only the files `train` writes go (initializer_tokens in their metadata, and no `merged`: a merge's output beside
    its LoRA stays), so a user's own embeddings stay."""
    from safetensors import safe_open

    def ours(p):
        with contextlib.suppress(Exception), safe_open(str(p), "pt") as f:
            return "initializer_tokens" in (meta := f.metadata() or {}) and "merged" not in meta
        return False

    for p in [folder / "learned_embeds.safetensors", *folder.glob("*.learned_embeds.safetensors"), *folder.glob("a1111/*.safetensors")]:
        if p.is_file() and p not in kept and ours(p):
            p.unlink()
    with contextlib.suppress(OSError):
        (folder / "a1111").rmdir()  # only when empty


def to_training_tensor(img, res: int):
    """Resize the short side to `res` (bilinear, as torchvision's Resize in the official dataset), to [-1, 1]."""
    from PIL import Image

    w, h = img.size
    s = res / min(w, h)
    return sdm.image_to_tensor(img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.BILINEAR))


# ---- 7. Sampling: consistency guidance and plain CFG of the fine-tuned model.


def consistency_guidance(u, c, f, w_text: float, w_cons: float):
    """u + w_text (c - u) + w_cons (f - c): u, c the pretrained model on "" and c_base, f the fine-tuned one
    on c (card Sec. 4). w_cons = 0: pretrained CFG; w_cons = w_text: CFG with the fine-tuned cond."""
    return u + w_text * (c - u) + w_cons * (f - c)


def consistency_model_fn(unet, loras, cond: sdm.Cond, base: sdm.Cond, uncond: sdm.Cond, w_text: float, w_cons: float):
    """model_fn for sample_loop: two UNet calls a step, [uncond; base] with the LoRAs off, then cond with them on."""
    def fn(x, t, i):
        with disabled(*loras):
            y = None if base.y is None else torch.cat([uncond.y, base.y])
            u, c = unet(torch.cat([x, x]), t, torch.cat([uncond.context, base.context]), y).chunk(2)
        return consistency_guidance(u, c, unet(x, t, cond.context, cond.y), w_text, w_cons)
    return fn


@torch.no_grad()
def sample(model, loras, prompts, base_prompts=None, tokens: LearnedTokens | None = None, negative: str = "",
           guidance: str = "consistency", w_text: float = 7.5, w_cons: float = 3.0, steps: int = 50,
           sampler: str = "ddim", eta: float = 0.0, size=None, generator=None, latents=None, progress: bool = True):
    """Images in [-1, 1]. Call inside `install(model.unet, *loras)`. guidance "cfg" is the fine-tuned
    model's own CFG (the README's rg_scale = 0 path, the diamonds of the paper's plots)."""
    h, w = size or (model.cfg.image_size, model.cfg.image_size)
    if h % model.size_multiple or w % model.size_multiple:
        raise ValueError(f"height and width must be multiples of {model.size_multiple} for this model (got {h}x{w}).")
    extra = tokens.extra if tokens is not None else (None, None)
    cond = model.encode_prompt(prompts, (h, w), extra)
    in_negative = learned_in(negative, tokens.tokens if tokens is not None else [])
    if in_negative and guidance == "consistency":  # u is the pretrained model's, which cannot read the new rows
        raise ValueError(f"the negative prompt is for the pretrained model, which has no '{in_negative[0]}'; "
                         "write the class word there instead, or use --guidance cfg.")
    # cfg: the fine-tuned model reads its tokens in the negative prompt too (a non-empty one is encoded as any prompt)
    uncond = (model.encode_prompt([negative] * len(prompts), (h, w), extra) if in_negative
              else model.uncond([negative] * len(prompts), (h, w)))
    if guidance == "cfg":
        fn = model.cfg_model_fn(cond, uncond, w_text)
    elif guidance == "consistency":
        if base_prompts is None:
            base_prompts = [tokens.base_prompt(p) for p in prompts] if tokens is not None else prompts
        learned = [t for p in base_prompts for t in learned_in(p, tokens.tokens if tokens is not None else [])]
        if learned:
            raise ValueError(f"the base prompt is for the pretrained model, which has no '{learned[0]}'; "
                             "write the class word there instead.")
        fn = consistency_model_fn(model.unet, loras, cond, model.encode_prompt(base_prompts, (h, w)), uncond, w_text, w_cons)
    else:
        raise ValueError(f"unknown guidance '{guidance}'; use consistency or cfg.")
    if latents is None:
        f = model.vae.downsample_factor
        latents = torch.randn((len(prompts), model.cfg.unet.in_channels, h // f, w // f), generator=generator,
                              device=generator.device if generator is not None else "cpu")
    z = sdm.sample_loop(fn, latents.to(model.device), model.schedule, steps, sampler, eta, generator, progress=progress)
    return model.decode_latents(z)


# ---- 8. Training.


def train(a: DCOArgs) -> Path:
    device = sdm.pick_device(a.device)
    torch.manual_seed(a.seed)
    images, prompts, bases, tokens, inits, repeats = load_data(a)  # bad input fails before the model loads
    warn_without_tokens("the validation prompt", a.validation_prompt, tokens)
    order = EpochOrder(len(images), repeats)
    check_resume(a, order.slots)
    if set(repeats) != {1}:  # kohya prints the same count: a folder name read wrongly shows here
        print(f"{len(images)} images, repeated as their folders say: {len(order.slots)} samples an epoch")
    half = "fp32" if a.mixed_precision == "no" else a.mixed_precision
    model = sdm.load_model(a.pretrained_model, half, "fp32", device, a.variant, a.compile, a.channels_last, a.vae,
                           a.clip_skip)  # frozen parts in half, VAE fp32 (l.490)
    res = a.resolution or model.cfg.image_size
    if res % model.size_multiple:
        raise ValueError(f"--resolution must be a multiple of {model.size_multiple} for this model (got {res}).")
    gen = torch.Generator().manual_seed(a.seed)
    lora = LoRA.create(model.unet, a.rank, a.lora_alpha or a.rank, generator=gen)
    ti = LearnedTokens.from_initializers(model, tokens, inits, gen) if tokens else None
    if ti is not None:  # CLIP keeps 75 tokens: a learned token past them gets no gradient (the row stays its initializer)
        table = model.text_encoder.token_embedding.num_embeddings
        new = set(range(table, table + len(tokens)))
        for p in prompts:
            if not new & set(model.tokenizer.tokenize(p)[: model.tokenizer.length - 2]):
                raise ValueError(f"the caption '{p[:60]}...' puts its learned token past CLIP's 77-token limit, where it "
                                 "is cut off and never trains; shorten the caption or move the token forward.")
    model.unet.gradient_checkpointing = a.gradient_checkpointing
    pix = [to_training_tensor(img, res) for img in images]
    fixed = a.cache_latents and all(p.shape[1:] == (res, res) for p in pix)
    moments = None
    if fixed:  # no crop to draw: encode once, sample the posterior every step (the encoder is deterministic)
        with torch.no_grad():  # 8 images a pass: a large folder at 1024 px in one batch would peak at many GB
            moments = model.vae.encode(torch.stack(pix).to(device, model.vae.quant_conv.weight.dtype), chunk=8)
    cache: dict[str, sdm.Cond] = {}

    def encode(ps, extra=(None, None), grad=False):
        if grad or not a.cache_text_embeddings:
            with torch.set_grad_enabled(grad):
                return model.encode_prompt(ps, (res, res), extra)
        for p in set(ps) - set(cache):
            with torch.no_grad():
                cache[p] = model.encode_prompt([p], (res, res))
        return sdm.Cond(torch.cat([cache[p].context for p in ps]), None if cache[ps[0]].y is None else torch.cat([cache[p].y for p in ps]))

    def loss_fn(g):
        idx = order.draw(a.train_batch_size, g)
        if fixed:
            mean, std = moments.mean[idx], moments.std[idx]
        else:
            crops = []
            for i in idx:
                H, W = pix[i].shape[1:]
                # no draw where there is nothing to crop: --no-cache-latents then draws as the cached path does
                top = (H - res) // 2 if a.center_crop or H == res else int(torch.randint(0, H - res + 1, (1,), generator=g))
                left = (W - res) // 2 if a.center_crop or W == res else int(torch.randint(0, W - res + 1, (1,), generator=g))
                crops.append(pix[i][:, top : top + res, left : left + res])
            with torch.no_grad():
                d = model.vae.encode(torch.stack(crops).to(device, model.vae.quant_conv.weight.dtype))
            mean, std = d.mean, d.std
        z0 = ((mean + std * torch.randn(mean.shape, generator=g).to(device)) * model.vae.scale_factor).float()
        ps = [prompts[i] for i in idx]
        cond = encode(ps, ti.extra, grad=True) if ti is not None else encode(ps)
        ref = None
        if a.dco_beta > 0:  # the pretrained model sees the class-word caption when tokens are learned (l.905-919)
            ref = encode([bases[i] for i in idx]) if ti is not None else sdm.Cond(cond.context.detach(), cond.y)
        return dco_step(model, lora, z0, cond, ref, g, a.dco_beta, a.snr_gamma, a.offset_noise)

    scale = a.train_batch_size * a.gradient_accumulation_steps if a.scale_lr else 1
    groups = [{"params": list(lora.parameters()), "lr": a.learning_rate * scale}]
    if ti is not None:
        groups.append({"params": list(ti.rows), "lr": a.text_encoder_lr * scale})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.adam_weight_decay)
    tensors = {f"lora.{k}": v for k, v in lora.state_dict(keep_vars=True).items()}
    tensors.update({f"tokens.{k}": v for k, v in (ti.state_dict(keep_vars=True).items() if ti else [])}, **order.state())
    meta = {"base_model": a.pretrained_model or "toy", "rank": a.rank, "lora_alpha": a.lora_alpha or a.rank,
            "dco_beta": a.dco_beta, "seed": a.seed, "tokens": tokens, "initializer_tokens": inits, "clip_skip": a.clip_skip}

    def save(folder):
        folder = Path(folder)  # checkpoint-N/, or the run folder after the last step
        step = a.max_train_steps if folder == Path(a.output_dir) else int(folder.name.split("-")[1])
        save_lora(folder / "pytorch_lora_weights.safetensors", model.unet, [lora], "peft", {**meta, "step": step})
        save_lora(folder / "lora_kohya.safetensors", model.unet, [lora], "kohya", {**meta, "step": step, "ss_steps": step,
                                                                                    "ss_clip_skip": str(a.clip_skip)})
        kept = []
        if ti is not None:
            ti.save(kept := folder / "learned_embeds.safetensors", {"base_model": meta["base_model"]})
            kept = [kept, *ti.save_per_token(folder, {"base_model": meta["base_model"]})]
        remove_stale_tokens(folder, kept)

    def validate():
        n = a.num_validation_images
        g = torch.Generator(device).manual_seed(a.seed)
        x = sample(model, [lora], [a.validation_prompt] * n, tokens=ti, w_cons=a.w_cons, steps=25, size=(res, res),
                   generator=g, progress=False)
        return sdm.tensor_to_images(x)

    with install(model.unet, lora):
        return sdm.train_loop(a, opt, tensors, loss_fn, save, gen, validate, ti.renormalize if ti else None, device, meta)


# ---- 9. Command line: train / sample / merge.


@dataclass
class DCOSampleArgs(sdm.SampleArgs):
    lora: list[str] = field(default_factory=list)  # LoRA files or training output folders (either format)
    lora_scale: list[float] = field(default_factory=list)  # one weight per LoRA (default 1 each)
    embeddings: list[str] = field(default_factory=list)  # learned_embeds files; none: those found beside the LoRAs
    base_prompt: str = ""  # "" = --prompt with each learned token replaced by its initializer word
    token: list[str] = field(default_factory=list)  # the embeddings' tokens under these names in the prompt, one per token
    guidance: str = "consistency"  # consistency (3 UNet evaluations a step) | cfg (the fine-tuned model's CFG)
    w_cons: float = 3.0  # README example; the paper sweeps 2-5 (w_text = --guidance-scale = --w-text, 7.5)
    choices = {"guidance": ("consistency", "cfg")}


@dataclass
class MergeArgs:
    lora: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # default 1 each
    method: str = "sum"  # sum (exact) | ties_svd
    density: float = 1.0  # ties_svd: fraction of each delta kept (the TIES paper uses 0.2)
    rank: int = 0  # ties_svd: 0 = the largest input rank
    token: list[str] = field(default_factory=list)  # new names of the inputs' learned tokens, one per token in input order
    output: str = "merged_lora.safetensors"
    format: str = "peft"  # peft | kohya
    pretrained_model: str = ""  # the base model the LoRAs belong to ("" = the toy model)
    overwrite: bool = False
    choices = {"method": ("sum", "ties_svd"), "format": ("peft", "kohya")}
    minima = {"rank": 0}


def unet_skeleton(path: str):
    """The base UNet's modules on the meta device, for merging: layer names and shapes are all it needs,
    so a converted or diffusers folder gives them from its config without reading the weights (SDXL's
    3.47 B parameters are 6.9 GB in fp16). A single file says its architecture only through its weights: loaded."""
    folder = Path(path) if path else sdm.TOY_MODEL_PATH
    cfg = None
    if (folder / "config.json").is_file() and "sd" in (meta := json.loads((folder / "config.json").read_text())):
        cfg = sdm.config_from_dict(meta["sd"]).unet
    elif (folder / "unet" / "config.json").is_file():
        cfg = wc.diffusers_unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    if cfg is None:
        return sdm.load_model(path, "fp16", "fp16", "cpu").unet
    with torch.device("meta"):
        return sdm.UNetModel(cfg)


def embeddings_beside(path, lora: LoRA) -> Path | None:
    """The learned_embeds file a LoRA came with: in its training folder (given, or the folder of a LoRA file whose
    metadata lists learned tokens), or `<stem>.learned_embeds.safetensors` beside a file `merge` wrote."""
    p = Path(path)
    near = [p / "learned_embeds.safetensors"] if p.is_dir() else \
        [p.with_name(p.stem + ".learned_embeds.safetensors"), *([p.parent / "learned_embeds.safetensors"] if lora.tokens else [])]
    return next((q for q in near if q.is_file()), None)


def load_adapters(model, paths, scales):
    """(LoRAs, the learned_embeds files found beside them)."""
    loras, found = [], []
    for i, p in enumerate(paths):
        lora = load_lora(p, model.unet, name=f"lora{i}")
        lora.scale = scales[i] if i < len(scales) else 1.0
        loras.append(lora)
        found += [q] if (q := embeddings_beside(p, lora)) is not None else []
    return loras, found


def old_names(model, loras, embeddings, names: list[str]) -> dict[str, tuple[list[str], str]]:
    """Names learned tokens had before a rename -> (what the prompt calls them now, who renamed them): merge --token
    (the `renamed_from` of a merged LoRA and of its learned_embeds) and sample's --token (`names`, one per token of
    `embeddings`). Old names that are one word of CLIP's vocabulary (A1111's dog.pt, loaded as --token <dog>) are
    left out: in a prompt they are that word."""
    from safetensors import safe_open

    pairs = []  # (old name, the name in the embeddings file or LoRA, who renamed it)
    now = {}  # the embeddings file's token -> its name in the prompt
    if embeddings is not None:
        tokens = read_embeddings(embeddings)[0]
        now = dict(zip(tokens, names or tokens))
        pairs += [(t, t, "--token") for t in tokens]
        if str(embeddings).endswith(".safetensors"):
            with safe_open(str(embeddings), "pt") as f, contextlib.suppress(ValueError, TypeError):
                pairs += [(o, t, "merge --token") for o, t in zip(json.loads((f.metadata() or {}).get("renamed_from", "[]")), tokens)]
    for lora in loras:
        pairs += [(o, t, "merge --token") for o, t in zip(getattr(lora, "renamed_from", []), lora.tokens)]
    current, out = set(now.values()), {}
    for old, tok, how in pairs:
        if not isinstance(old, str) or old in current or (ids := model.tokenizer.tokenize(old)) and len(ids) == 1 \
                and ids[0] < model.tokenizer.bos_id:  # bos_id: the first id past CLIP's words
            continue
        new, hows = out.setdefault(old, ([], []))
        new += [now.get(tok, tok)] if now.get(tok, tok) not in new else []
        hows += [how] if how not in hows else []
    return {old: (new, " and ".join(hows)) for old, (new, hows) in out.items()}


def warn_without_tokens(what: str, prompt: str, tokens: list[str]) -> None:
    """A prompt with none of the learned tokens (a typo such as "<Dog>") is sampled as plain text: said, not refused."""
    if tokens and prompt and not learned_in(prompt, tokens):
        warnings.warn(f"{what} holds none of the learned tokens {tokens} (they match verbatim, case included); it is "
                      "sampled as plain text.")


def check_tokens(paths, loras, tokens: "LearnedTokens | None", text: str, renamed: dict | None = None) -> None:
    """A LoRA's learned token in the prompt with no embeddings loaded would be read as plain text, silently; so would a
    token's old name after a rename (`renamed`: old_names)."""
    loaded, renamed = (tokens.tokens if tokens is not None else []), renamed or {}

    def unread(names):  # what a tokenizer that also knew `names` reads as one of them: with <s> loaded and <s>2 not,
        return [t for t in learned_in(text, [*loaded, *names]) if t not in loaded]  # "<s>2" is not <s> + "2" then

    if old := unread(renamed):  # as the tokenizer that still had the old names would have read them
        new, how = renamed[old[0]]
        raise ValueError(f"'{old[0]}' is a learned token's old name ({how} renamed it), which the prompt would not read "
                         f"as that token; write {' or '.join(repr(n) for n in new)} instead.")
    for p, lora in zip(paths, loras):
        if missing := unread(lora.tokens):
            raise ValueError(f"'{p}' was trained with the learned token(s) {missing}, whose embeddings are not loaded "
                             f"(the prompt would not read '{missing[0]}' as that token); give its learned_embeds.safetensors "
                             "with --embeddings.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if cmd == "train":
            a = sdm.parse_args(DCOArgs, rest, argparse.ArgumentParser(prog="dco.py train", description="DCO LoRA fine-tuning"))
            print(f"wrote {train(a)}")
        elif cmd == "sample":
            p = argparse.ArgumentParser(prog="dco.py sample", description="consistency guidance or CFG with DCO LoRAs")
            p.add_argument("--w-text", dest="guidance_scale", type=float, default=7.5, help="alias of --guidance-scale")
            a = sdm.parse_args(DCOSampleArgs, rest, p)
            if a.lora_scale and len(a.lora_scale) != len(a.lora):
                raise ValueError(f"{len(a.lora)} LoRAs but {len(a.lora_scale)} --lora-scale values; give one per LoRA (or none: 1 each).")
            out = sdm.prepare_output_dir(a.output_dir, a.overwrite, create=False)  # save_image makes it: a refusal leaves none
            model = sdm.load_model(a.pretrained_model, a.precision, a.vae_precision, a.device, a.variant,
                                   a.compile, a.channels_last, a.vae, a.clip_skip)
            loras, found = load_adapters(model, a.lora, a.lora_scale)
            for p, lora in zip(a.lora, loras):  # its text conditioning was that layer's (kohya's files say ss_clip_skip)
                if (trained := getattr(lora, "clip_skip", None)) not in (None, a.clip_skip):
                    warnings.warn(f"'{p}' was trained with --clip-skip {trained}; sampling with --clip-skip {a.clip_skip}.")
            files = list({Path(f).resolve(): f for f in a.embeddings or found}.values())  # given ones over those found
            if len(files) > 1:  # several token sets cannot share the new-token ids
                raise ValueError(f"{len(files)} embeddings files ({', '.join(map(str, files))}) and sampling reads one; "
                                 + ("give one." if a.embeddings else "merge the LoRAs first (dco.py merge puts their "
                                    "tokens in one file), or pick one with --embeddings."))
            if a.token and not files:
                raise ValueError("--token names the tokens of an embeddings file, and none is loaded; give --embeddings.")
            tokens = LearnedTokens.load(files[0], model, a.token) if files else None
            renamed = old_names(model, loras, files[0] if files else None, a.token)
            check_tokens(a.lora, loras, tokens, " ".join((a.prompt, a.base_prompt, a.negative_prompt)), renamed)
            warn_without_tokens("the prompt", a.prompt, tokens.tokens if tokens is not None else [])
            h, w = a.height or model.cfg.image_size, a.width or model.cfg.image_size
            g = torch.Generator(model.device).manual_seed(a.seed)
            with install(model.unet, *loras):
                x = sample(model, loras, [a.prompt] * a.batch_size, [a.base_prompt] * a.batch_size if a.base_prompt else None,
                           tokens, a.negative_prompt, a.guidance, a.guidance_scale, a.w_cons, a.steps, a.sampler, a.eta, (h, w), g)
            for i, img in enumerate(sdm.tensor_to_images(x)):
                sdm.save_image(img, out / f"{a.seed:04d}_{i:02d}.png")
            print(f"wrote {len(x)} image(s) to {out}")
        elif cmd == "merge":
            a = sdm.parse_args(MergeArgs, rest, argparse.ArgumentParser(prog="dco.py merge", description=merge.__doc__.split("\n")[0]))
            if len(a.lora) < 2:
                raise ValueError("give two or more LoRAs to merge with --lora A B ...")
            if a.method == "sum" and (given := [f for f, v in (("--density", a.density != 1), ("--rank", a.rank)) if v]):
                raise ValueError(f"{' and '.join(given)} would be ignored: they shape a ties_svd merge, and the default "
                                 "--method sum adds the LoRAs exactly; add --method ties_svd, or drop them.")
            if Path(a.output).is_dir() or not a.output.endswith(".safetensors"):
                raise ValueError(f"--output '{a.output}' must be a .safetensors file path, e.g. merged_lora.safetensors.")
            if Path(a.output).exists() and not a.overwrite:
                raise FileExistsError(f"--output '{a.output}' exists; pass --overwrite or choose another.")
            if a.token:  # as train and sample refuse them (a word of the vocabulary cannot be a new token): before any work
                try:
                    sdm.CLIPTokenizer().add_tokens(list(dict.fromkeys(a.token)))
                except ValueError as e:
                    raise ValueError(f"--token {e}") from None
            model = SimpleNamespace(unet=unet_skeleton(a.pretrained_model))
            loras, found = load_adapters(model, a.lora, [])
            weights = a.weights or [1.0] * len(loras)
            if len(weights) != len(loras):
                raise ValueError(f"{len(loras)} LoRAs but {len(weights)} weights.")
            for p, lora in zip(a.lora, loras):
                if lora.tokens and embeddings_beside(p, lora) is None:
                    print(f"warning: '{p}' lists learned tokens {lora.tokens} but no learned_embeds.safetensors is beside "
                          "it; the merged LoRA will not carry them.", file=sys.stderr)
            if a.token and not found:
                raise ValueError("--token renames the inputs' learned tokens, and no input has a learned_embeds file beside it.")
            files = list({Path(f).resolve(): f for f in found}.values())  # one LoRA given twice: its tokens once
            tokens, rows, inits, before = combine_embeddings(files, a.token) if files else ([], None, [], [])
            merged = merge(loras, weights, a.method, a.density, a.rank)
            out = Path(a.output)
            renamed = {"renamed_from": before} if before != tokens else {}
            save_lora(out, model.unet, [merged], a.format, {"merged": a.lora, "weights": weights, "merge_method": a.method,
                                                            "tokens": tokens, "initializer_tokens": inits, **renamed})
            beside = out.with_name(out.stem + ".learned_embeds.safetensors")  # beside the LoRA, where sample finds it
            if tokens:
                write_embeddings(beside, tokens, rows, inits, {"merged": a.lora, **renamed})
            else:
                beside.unlink(missing_ok=True)
            print(f"wrote {out}" + (f" and its learned tokens {tokens} in {out.stem}.learned_embeds.safetensors" if tokens else ""))
        else:
            sys.exit("usage: python dco.py {train,sample,merge} [options]; see --help of each")
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:  # FloatingPointError: a non-finite loss
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
