"""What the side-by-side bench scripts share: each implementation runs in its own process (so its
peak memory is its own), every timing waits for the GPU before reading the clock, and with
--rounds R the implementations take turns R times, so that a machine whose speed drifts over
minutes (a shared CPU VM, a GPU warming up) slows both alike and the paired ratio stays honest."""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SD15 = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            in_channels=4, out_channels=4, sample_size=64)
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
             clip_sample=False, set_alpha_to_one=False)


def add_work_arg(p) -> None:
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_sd15_random"),
                   help="the random SD1.5 diffusers folder every script loads (built on first use, about 4 GB)")


def ensure_random_sd15(folder) -> None:
    """SD1.5's architecture with diffusers' random initialisation, saved once as a diffusers folder.

    Every side-by-side script loads its weights from here, each implementation the way its users do, so
    no process carries the other implementation's model (bench_unet once built diffusers' UNet inside our
    process to copy its weights: our peak memory counted both, and our allocator held the other's pages)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return
    print(f"building the random SD1.5 pipeline in {folder} (once)", file=sys.stderr)
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import write_hf_tokenizer_files

    torch.manual_seed(0)
    tok_dir = write_hf_tokenizer_files(Path(tempfile.mkdtemp()))
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  sample_size=512)
    unet = diffusers.UNet2DConditionModel(**SD15)
    pipe = diffusers.StableDiffusionPipeline(vae, text, tok, unet, diffusers.DDIMScheduler(**SCHED), None, None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)


def dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def sync_for(device):
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def peak_gib(device) -> float:
    """GPU: max allocated since the last reset; CPU: the process's peak resident set size."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, runs: int, device, warmup: int = 1, warmup_fn=None) -> dict:
    """`warmup` untimed calls (of `warmup_fn`, default `fn`), then the median of `runs` timed calls."""
    import torch

    sync = sync_for(device)
    for _ in range(warmup):
        (warmup_fn or fn)()
    sync()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times": times, "peak_gib": peak_gib(device),
            "threads": torch.get_num_threads()}


def clock_train_steps(sync) -> list:
    """Wrap sd_model.train_loop so that each optimizer step appends a time stamp (after `sync`) to the list
    returned, leaving the methods' code untouched; step times are the differences of the stamps."""
    import inspect

    import sd_model as sdm

    stamps, loop = [], sdm.train_loop

    def timed_loop(*args, **kw):
        bound = inspect.signature(loop).bind(*args, **kw)
        user = bound.arguments.get("after_step")

        def after():
            if user is not None:
                user()
            sync()
            stamps.append(time.perf_counter())
        bound.arguments["after_step"] = after
        return loop(*bound.args, **bound.kwargs)

    sdm.train_loop = timed_loop
    return stamps


def run_impl(script: str, *extra: str, fatal: bool = True) -> dict:
    """Run `script` again with this command line plus `extra` in a fresh process; its last stdout line is JSON.
    A failed process ends this one, or with fatal=False becomes {"error": why} (a sweep's out-of-memory point)."""
    out = subprocess.run([sys.executable, script, *sys.argv[1:], *extra], capture_output=True, text=True, check=False)
    if out.returncode and fatal:
        sys.exit(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    if out.returncode:
        last = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return {"error": "killed (out of memory?)" if out.returncode < 0 else last[:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_ours(folder, part: str):
    """Our UNet or VAE from a diffusers folder's `unet/` or `vae/`, built on the meta device and given the converted
    tensors themselves (as StableDiffusion.from_pretrained does), so its memory is one copy of the weights."""
    import torch

    import sd_model as sdm
    import weights_convert as wc

    folder = Path(folder) / part
    c = json.loads((folder / "config.json").read_text())
    cfg, cls, convert = ((wc.diffusers_unet_config(c), sdm.UNetModel, wc.diffusers_unet_to_ldm) if part == "unet" else
                         (wc.diffusers_vae_config(c), sdm.AutoencoderKL, wc.diffusers_vae_to_ldm))
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(convert(wc.folder_weights(folder, "diffusion_pytorch_model"), cfg), assign=True)
    return model


def compare(script: str, variants: dict, rounds: int = 1) -> tuple[dict, list[float]]:
    """Run each variant's process (`variants`: name -> extra arguments for run_impl) in turn, `rounds` times.

    Returns the pooled result per variant (median over every timed call of every round, the largest peak
    memory, the median load time) and, when there are exactly two variants, the ratio first / second of
    each round's medians: consecutive processes see the same machine, so these paired ratios are what a
    drifting machine cannot fake; report their median and spread.
    """
    per = {name: [] for name in variants}
    for _ in range(rounds):
        for name, extra in variants.items():
            per[name].append(run_impl(script, *extra))
    pooled = {}
    for name, results in per.items():
        times = [t for r in results for t in r["times"]]
        pooled[name] = {**results[-1], "median_s": statistics.median(times), "times": times,
                        "peak_gib": max(r["peak_gib"] for r in results)}
        if "load_s" in results[-1]:
            pooled[name]["load_s"] = statistics.median(r["load_s"] for r in results)
    names = list(variants)
    ratios = ([a["median_s"] / b["median_s"] for a, b in zip(per[names[0]], per[names[1]])] if len(names) == 2 else [])
    return pooled, ratios


def ratio_text(ratios: list[float]) -> str:
    """"1.012" for one round; "1.012 (median of 5 paired rounds, 0.981..1.043)" for several."""
    if len(ratios) == 1:
        return f"{ratios[0]:.3f}"
    return f"{statistics.median(ratios):.3f} (median of {len(ratios)} paired rounds, {min(ratios):.3f}..{max(ratios):.3f})"


def add_side_by_side_args(p) -> None:
    """The options every ours-against-diffusers script shares (see side_by_side)."""
    add_work_arg(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate the two processes this many times (paired ratios)")
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--output-to", help=argparse.SUPPRESS)


def save_output(a, out) -> None:
    """An --impl process keeps its last timed result, for side_by_side to show that both computed the same thing."""
    import torch

    if a.output_to:
        torch.save(out.detach().float().cpu(), a.output_to)


def side_by_side(script: str, a, title: str) -> None:
    """The ours-against-diffusers run of a script whose `--impl NAME` process prints run_one's JSON (and calls
    save_output): both processes `a.rounds` times, then a small table (time, peak memory), the paired ratio and
    the largest difference between the two outputs."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        dst = {impl: Path(tmp) / f"{impl}.pt" for impl in ("ours", "diffusers")}
        res, ratios = compare(script, {impl: ["--impl", impl, "--output-to", str(f)] for impl, f in dst.items()}, a.rounds)
        diff = (torch.load(dst["ours"]) - torch.load(dst["diffusers"])).abs().max().item()
    mem = "GPU max allocated" if a.device.startswith("cuda") else "peak RSS"
    print(f"{title}, {res['ours']['threads']} threads, median of {a.runs} x {a.rounds} round(s)")
    print(f"| impl | time (s) | {mem} (GiB) |\n|---|---|---|")
    for impl in ("ours", "diffusers"):
        print(f"| {impl} | {res[impl]['median_s']:.3f} | {res[impl]['peak_gib']:.2f} |")
    print(f"ratio ours / diffusers: {ratio_text(ratios)}; max |output difference| {diff:.2e}")
