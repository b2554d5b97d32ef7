"""The toy Stable Diffusion: every pretraining stage runs end to end on a few images and the
result loads with `from_pretrained`; the committed model reproduces a stored sample."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a script (below)
import sd_model as sdm  # noqa: E402
import toy_world as tw  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "toy_sample.png"


def test_pretraining_stages_run_end_to_end_and_load(tmp_path):
    data, work = tmp_path / "data", tmp_path
    tw.pretrain_data(str(data), 48, workers=1)
    common = dict(data=str(data), stage_dir=str(work), max_train_steps=2, checkpointing_steps=2, threads=1)
    tw.train_clip(tw.ClipArgs(output_dir=str(work / "clip"), train_batch_size=8, **common))
    tw.train_vae(tw.VaeArgs(output_dir=str(work / "vae"), train_batch_size=4, **common))
    tw.train_unet(tw.UnetArgs(output_dir=str(work / "unet"), train_batch_size=4, validation_prompt="", export=str(work / "sd"), **common))
    model = sdm.StableDiffusion.from_pretrained(work / "sd")
    assert model.cfg.unet == tw.TOY_SD.unet and model.vae.scale_factor != tw.TOY_SD.vae.scale_factor  # measured scale
    assert len([m for m in model.unet.modules() if isinstance(m, sdm.BasicTransformerBlock)]) == 16
    assert model.unet.output_blocks[10][1].transformer_blocks[0].attn2.name == "output_blocks.10.1.transformer_blocks.0.attn2"
    x = model.sample("a red star on the grass", steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.shape == (1, 3, 64, 64) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match=f"multiples of {model.size_multiple} for this model"):  # the skips cannot concatenate
        model.sample("a red star", steps=1, height=model.size_multiple // 2, progress=False)
    # the EMA, not the raw weights, ships; the checkpoint keeps both for an exact resume
    from safetensors import safe_open

    with safe_open(str(work / "unet" / "checkpoint-2" / "training_state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("param.ema.") for k in keys) and any(k.startswith("param.unet.") for k in keys)
    # the toy CLIP as a metric: CLIP-I of a concept's own reference is higher than another concept's
    clip = tw.ToyCLIP(work / "sd")
    c0, c1 = tw.CONCEPTS[:2]
    ref = tw.concept_references(c0)[0][1]
    sims = clip.image_similarity([ref, ref], [c0, c1])
    assert all(-1 <= s <= 1 for s in sims) and len(clip.text_similarity([ref], ["a star"])) == 1


def toy_sample():
    """Two seeded 20-step samples of the committed toy model, side by side (uint8)."""
    model = sdm.StableDiffusion.from_pretrained()  # no path: the toy model
    x = model.sample(["a large red star on the grass", "a small blue heart in the snow, in the top left"], steps=20,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(0), progress=False)
    return np.concatenate([np.asarray(im) for im in sdm.tensor_to_images(x)], axis=1)


def test_pretrain_runs_each_stage_once_and_the_unet_in_the_shipped_two_phases(tmp_path, monkeypatch):
    """`pretrain` = the shipped recipe: CLIP, VAE, UNet to 2400, the same run resumed to 7600; a rerun
    skips what is finished (stages stubbed: this pins the order and the skipping, not the training)."""
    calls = []

    def stage(name, done):
        def run(a):
            calls.append((name, a.max_train_steps, a.resume, getattr(a, "export", None), a.device))
            path = Path(a.output_dir) / done.format(steps=a.max_train_steps)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        return run

    monkeypatch.setattr(tw, "pretrain_data", lambda out, n: (Path(out).mkdir(parents=True), (Path(out) / "images.npy").touch()))
    monkeypatch.setattr(tw, "train_clip", stage("clip", "text_encoder.safetensors"))
    monkeypatch.setattr(tw, "train_vae", stage("vae", "vae.safetensors"))
    monkeypatch.setattr(tw, "train_unet", stage("unet", "checkpoint-{steps}/x"))
    tw.pretrain(str(tmp_path), n=8, export=str(tmp_path / "sd"), threads=1, device="cpu")
    assert calls == [("clip", 600, "latest", None, "cpu"), ("vae", 6000, "latest", None, "cpu"),
                     ("unet", 2400, "latest", str(tmp_path / "sd"), "cpu"), ("unet", 7600, "latest", str(tmp_path / "sd"), "cpu")]
    tw.pretrain(str(tmp_path), n=8, export=str(tmp_path / "sd"), threads=1)
    assert len(calls) == 4


@pytest.mark.skipif(not (Path(tw.TOY_DIR) / "config.json").exists(), reason="the toy model is not trained yet")
def test_committed_toy_model_loads_strictly_and_reproduces_a_stored_sample():
    if not REFERENCE.exists():
        pytest.skip("no stored sample yet; write it with `python tests/test_toy_model.py`")
    got, want = toy_sample(), np.asarray(Image.open(REFERENCE))
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0  # in uint8 levels; CPU float noise is far below


if __name__ == "__main__":  # stores the reference sample after the toy model is (re)trained
    REFERENCE.parent.mkdir(exist_ok=True)
    Image.fromarray(toy_sample()).save(REFERENCE)
    print(f"wrote {REFERENCE}")
