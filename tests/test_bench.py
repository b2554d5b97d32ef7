"""bench/common.compare: the implementations take turns, results pool, and paired ratios come per round;
bench_scaling.py, bench_vae.py and bench_unet.py end to end on a tiny diffusers folder in place of the 4 GB random SD1.5
one (bench_pipeline.py and bench_train.py need SD1.5's own tokenizer and image sizes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402

# A stand-in for a bench script: appends its name to a log (to see the order of the processes) and reports
# times that drift upwards with every process, the way this VM's CPU does.
FAKE = """
import json, sys
log, name = sys.argv[-3], sys.argv[-1]
with open(log, "a") as f:
    f.write(name + "\\n")
k = len(open(log).read().split())
scale = {"ours": 1.0, "theirs": 2.0}[name]
print("noise on stdout first")
print(json.dumps({"median_s": scale * k, "times": [scale * k, scale * k + 0.5], "peak_gib": k, "load_s": k}))
"""


def test_compare_alternates_pools_and_pairs(tmp_path, monkeypatch):
    script, log = tmp_path / "fake.py", tmp_path / "order.log"
    script.write_text(FAKE)
    monkeypatch.setattr(sys, "argv", ["fake.py"])  # run_impl forwards the parent's own arguments
    res, ratios = common.compare(str(script), {"ours": [str(log), "--impl", "ours"],
                                               "theirs": [str(log), "--impl", "theirs"]}, rounds=3)
    assert log.read_text().split() == ["ours", "theirs"] * 3
    # process k (1-based) of the six reports times k*scale and k*scale + 0.5
    assert res["ours"]["times"] == [1, 1.5, 3, 3.5, 5, 5.5] and res["ours"]["median_s"] == 3.25
    assert res["theirs"]["peak_gib"] == 6 and res["theirs"]["load_s"] == 4
    assert ratios == [1 / 4, 3 / 8, 5 / 12]
    assert common.ratio_text(ratios) == "0.375 (median of 3 paired rounds, 0.250..0.417)"
    assert common.ratio_text([1.0123]) == "1.012"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, hf_tokenizer_dir):
    """A tiny SD1 pipeline saved as a diffusers folder, standing in for the 4 GB random SD1.5 one."""
    from test_pipeline import build_pipeline

    folder = tmp_path_factory.mktemp("bench") / "tiny"
    build_pipeline("sd1", hf_tokenizer_dir).save_pretrained(folder)
    return folder


def bench(script: str, *args: str) -> str:
    path = Path(__file__).resolve().parents[1] / "bench" / script
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=True).stdout


def test_scaling_table_measures_every_point_in_its_own_process(tiny_folder):
    """bench_scaling.py end to end: a row per resolution x batch, each cell a number."""
    out = bench("bench_scaling.py", "--work", str(tiny_folder), "--resolutions", "16", "32", "--batches", "2",
                "--runs", "1", "--warmup", "0")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(16, 2), (32, 2)]
    for r in rows:
        step, decode, sample_mem, train, train_mem = map(float, r[2:])
        assert min(step, decode, train) > 0 and min(sample_mem, train_mem) > 0.1


@pytest.mark.parametrize("script,args", [("bench_vae.py", ["--resolution", "32"]),  # each case ~7 s: two processes
                                         ("bench_unet.py", ["--latent", "8", "--batch", "2", "--backward"]),
                                         ("bench_unet.py", ["--latent", "8", "--sample-steps", "2"]),
                                         ("bench_unet.py", ["--latent", "8", "--no-sdpa"])])
def test_side_by_side_scripts_time_both_and_show_they_compute_the_same(tiny_folder, script, args):
    out = bench(script, "--work", str(tiny_folder), "--runs", "1", "--warmup", "0", *args)
    times = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| ")
             and line.split("|")[1].strip() in ("ours", "diffusers")}
    assert times.keys() == {"ours", "diffusers"} and min(times.values()) > 0
    ratio, diff = re.search(r"ratio ours / diffusers: ([\d.]+); max \|output difference\| ([\d.e+-]+)", out).groups()
    assert float(ratio) > 0 and float(diff) < 1e-4, out


def test_toy_caption_use_finds_the_words_the_model_uses_and_finetunes_onto_a_zero_snr_schedule(tmp_path):
    """bench/toy_caption_use.py: on the shipped toy model a swapped background costs far more than a swapped
    position (the finding in the README); `finetune` writes a loadable model on the zero-terminal-SNR schedule."""
    import json

    import numpy as np
    import torch

    import sd_model as sdm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import toy_caption_use as tcu

    rows = {r["t"]: r for r in tcu.gaps(n=16)}
    assert set(rows) == set(tcu.TS) and rows[800]["background"] > 0.05 > abs(rows[800]["position"])
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "images.npy", np.zeros((4, 64, 64, 3), np.uint8))
    (data / "captions.json").write_text(json.dumps(["a red star on the grass"] * 4))
    sdm.save_safetensors({"moments": torch.randn(4, 8, 16, 16).half()}, tmp_path / "latents.safetensors")
    tcu.finetune(str(tmp_path / "ft"), "v0snr", steps=2, data=str(data), latents=str(tmp_path / "latents.safetensors"),
                 batch=2, lr=1e-2, ema_decay=0.0)  # no EMA lag: the saved UNet is the trained one
    m = sdm.StableDiffusion.from_pretrained(tmp_path / "ft" / "step-2")
    assert m.cfg.schedule == tcu.V0SNR and m.schedule.alphas_cumprod[-1].item() == 0
    shipped = sdm.StableDiffusion.from_pretrained(None)
    assert not torch.equal(m.unet.state_dict()["out.2.weight"], shipped.unet.state_dict()["out.2.weight"])
    assert torch.equal(m.vae.state_dict()["decoder.conv_out.weight"], shipped.vae.state_dict()["decoder.conv_out.weight"])
    assert json.loads((tmp_path / "ft" / "step-2" / "finetune.json").read_text())["schedule"] == "v0snr"
    # --qk-lr-mult 0 freezes exactly the cross-attention queries and keys
    tcu.finetune(str(tmp_path / "qk0"), "eps", steps=2, data=str(data), latents=str(tmp_path / "latents.safetensors"),
                 batch=2, lr=1e-2, ema_decay=0.0, qk_lr_mult=0.0)
    new, old = sdm.StableDiffusion.from_pretrained(tmp_path / "qk0" / "step-2").unet.state_dict(), shipped.unet.state_dict()
    qk = [k for k in old if ".attn2.to_q." in k or ".attn2.to_k." in k]
    assert len(qk) == 32 and all(torch.equal(new[k], old[k]) for k in qk)
    assert not torch.equal(new["output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"],
                           old["output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"])


def test_toy_caption_use_attention_and_clip_binding():
    """`attention`: a distribution over the 77 tokens per layer, every token counted once; `clip`: on the shipped
    toy CLIP a swapped colour is told apart far better than a swapped position (the README's finding)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import toy_caption_use as tcu

    kinds, layers = tcu.attention(n=4)
    assert len(layers) == 16 and all(0 < ent <= 1 + 1e-6 and 1 / 77 <= top <= 1 for ent, top in layers.values())
    assert abs(sum(total for _, total in kinds.values()) - 1) < 1e-4
    rows = tcu.clip_binding(n=48)
    assert rows["color"]["prefers_own"] > 0.9 > rows["position"]["prefers_own"]
    assert rows["color"]["image_cosine"] < 0.7 < rows["position"]["image_cosine"]


def test_toy_retrain_gpu_script_returns_a_model_that_join_puts_back(tmp_path):
    """bench/toy_retrain_gpu.sh's plumbing at tiny sizes on the CPU, into an OUT that does not exist yet (the README's
    `OUT=/tmp/r` on a fresh machine; the pack step used to fail there), then `join`: the model loads strictly."""
    import os

    import sd_model as sdm

    script = Path(__file__).resolve().parents[1] / "bench" / "toy_retrain_gpu.sh"
    out, env = tmp_path / "out", {**os.environ, "DEVICE": "cpu", "N": "64", "CLIP_STEPS": "1", "UNET_STEPS": "1", "LATENTS": "64",
                                  "THREADS": "2", "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(script)], env={**env, "OUT": str(out)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert {"unet-1-of-2.safetensors", "unet-2-of-2.safetensors", "config.json", "report.tar"} <= set(os.listdir(out))
    subprocess.run(["bash", str(script), "join", str(out), str(tmp_path / "model")], env=env, check=True, capture_output=True)
    sdm.StableDiffusion.from_pretrained(tmp_path / "model")


def test_gpu_rows_script_writes_its_report_into_a_new_out_folder(tmp_path):
    """bench/gpu_rows.sh into an OUT that does not exist yet (the README's `OUT=/tmp/g` on a fresh machine): the report
    used to be lost to tee's error. DEADLINE=0 skips every step, so only the plumbing runs."""
    import os

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_rows.sh"
    out = tmp_path / "g"
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "DEADLINE": "0", "OUT": str(out), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(script), "sdxl"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = (out / "sdxl.txt").read_text()
    assert "skipped" in report and "== done" in report
