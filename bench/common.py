"""What the side-by-side bench scripts share: each implementation runs in its own process (so its
peak memory is its own), and every timing waits for the GPU before reading the clock."""

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
