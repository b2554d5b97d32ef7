"""What the side-by-side bench scripts share: each implementation runs in its own process (so its
peak memory is its own), every timing waits for the GPU before reading the clock, and with
--rounds R the implementations take turns R times, so that a machine whose speed drifts over
minutes (a shared CPU VM, a GPU warming up) slows both alike and the paired ratio stays honest."""

import json
import resource
import statistics
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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


def run_impl(script: str, *extra: str) -> dict:
    """Run `script` again with this command line plus `extra` in a fresh process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, script, *sys.argv[1:], *extra], capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
