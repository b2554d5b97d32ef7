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
    # the final checkpoint holds the model train-unet exports, byte for byte (what `pretrain` exports)
    assert all((work / "unet" / "checkpoint-2" / f).read_bytes() == (work / "sd" / f).read_bytes() for f in tw.MODEL_FILES)
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


def stub_stages(monkeypatch, calls):
    """pretrain's stages as stubs that record their arguments and write what marks them finished (the UNet: a complete
    checkpoint, its model files saying which step they are of)."""
    def stage(name, done):
        def run(a):
            calls.append((name, a.max_train_steps, a.resume, getattr(a, "export", None), a.device))
            if name == "unet":
                ckpt = Path(a.output_dir) / f"checkpoint-{a.max_train_steps}"
                ckpt.mkdir(parents=True, exist_ok=True)
                for f in [*tw.MODEL_FILES, "training_state.safetensors"]:
                    (ckpt / f).write_text(str(a.max_train_steps))
                return
            (Path(a.output_dir) / done).parent.mkdir(parents=True, exist_ok=True)
            (Path(a.output_dir) / done).touch()
        return run

    monkeypatch.setattr(tw, "pretrain_data", lambda out, n: (Path(out).mkdir(parents=True), (Path(out) / "images.npy").touch()))
    monkeypatch.setattr(tw, "train_clip", stage("clip", "text_encoder.safetensors"))
    monkeypatch.setattr(tw, "train_vae", stage("vae", "vae.safetensors"))
    monkeypatch.setattr(tw, "train_unet", stage("unet", ""))


def test_pretrain_runs_each_stage_once_and_the_unet_in_the_shipped_two_phases(tmp_path, monkeypatch):
    """`pretrain` = the shipped recipe: CLIP, VAE, UNet to 2400, the same run resumed to 7600; a rerun
    skips what is finished (stages stubbed: this pins the order and the skipping, not the training). The phases export
    nothing (phase 1 wrote its model over the shipped one, which a stop in phase 2 left there); the final checkpoint
    is exported at the end, on a rerun too when the first run stopped before the export."""
    calls, sd = [], tmp_path / "sd"
    stub_stages(monkeypatch, calls)
    export_model = tw.export_model

    def stopped(src, dst):
        raise KeyboardInterrupt  # a stop after the final checkpoint, before the export

    monkeypatch.setattr(tw, "export_model", stopped)
    with pytest.raises(KeyboardInterrupt):
        tw.pretrain(str(tmp_path), n=8, export=str(sd), threads=1, device="cpu")
    assert calls == [("clip", 600, "latest", None, "cpu"), ("vae", 6000, "latest", None, "cpu"),
                     ("unet", 2400, "latest", "", "cpu"), ("unet", 7600, "latest", "", "cpu")]
    assert not sd.exists()
    monkeypatch.setattr(tw, "export_model", export_model)
    tw.pretrain(str(tmp_path), n=8, export=str(sd), threads=1)
    assert len(calls) == 4  # nothing trained again, and the final checkpoint exported
    assert {f: (sd / f).read_text() for f in tw.MODEL_FILES} == dict.fromkeys(tw.MODEL_FILES, "7600")
    tw.pretrain(str(tmp_path), n=8, export="", threads=1)  # --export "": the run folder only
    assert len(calls) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["clip", "data", "sd", "unet", "vae"]


def test_pretrain_counts_a_unet_phase_done_only_at_a_complete_checkpoint(tmp_path, monkeypatch):
    """A checkpoint-N folder without its training state (written last: the write was cut off) counted as a finished
    phase, so phase 2 resumed from checkpoint-2000 (or the export copied a half-written checkpoint-7600)."""
    calls, unet = [], tmp_path / "unet"
    stub_stages(monkeypatch, calls)
    for stage, f in (("data", "images.npy"), ("clip", "text_encoder.safetensors"), ("vae", "vae.safetensors")):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / f).touch()
    for step, files in ((2000, [*tw.MODEL_FILES, "training_state.safetensors"]), (2400, tw.MODEL_FILES[:2])):
        (unet / f"checkpoint-{step}").mkdir(parents=True)
        for f in files:
            (unet / f"checkpoint-{step}" / f).write_text(str(step))
    tw.pretrain(str(tmp_path), n=8, export=str(tmp_path / "sd"), threads=1, device="cpu")
    assert [c[1] for c in calls] == [2400, 7600]
    (unet / "checkpoint-7600" / "training_state.safetensors").unlink()  # the final checkpoint, cut off
    (tmp_path / "sd" / "unet.safetensors").write_text("old")
    tw.pretrain(str(tmp_path), n=8, export=str(tmp_path / "sd"), threads=1, device="cpu")
    assert [c[1] for c in calls] == [2400, 7600, 7600] and (tmp_path / "sd" / "unet.safetensors").read_text() == "7600"


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
