"""The shared training loop: exact resume, non-finite loss, flags from the config dataclass."""

import json
import re
from dataclasses import dataclass, field

import pytest
import torch

import sd_model as sdm


@dataclass
class ToyArgs(sdm.TrainArgs):
    width: int = 8
    words: list[str] = field(default_factory=lambda: ["a", "b"])
    data: list[str] = field(default_factory=list)  # folders, as ViCo's --images and Subject-Diffusion's --data


def run(args, interrupt_at=None, nan_at=None):
    """A small model trained by `train_loop` with every source of randomness drawn from the generator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, args.width), torch.nn.Tanh(), torch.nn.Linear(args.width, 1))
    row = torch.nn.Parameter(torch.randn(3))
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": args.learning_rate},
                             {"params": [row], "lr": 10 * args.learning_rate, "weight_decay": 0.0}])
    gen = torch.Generator().manual_seed(args.seed)
    calls = [0]

    def loss_fn(g):
        calls[0] += 1
        if calls[0] == interrupt_at:
            raise KeyboardInterrupt
        idx = torch.randint(0, 32, (args.train_batch_size,), generator=g)
        x = data[idx] + 0.1 * torch.randn(args.train_batch_size, 4, generator=g)
        loss = (model(x).squeeze(-1) - x.sum(-1) * row.sum()).square().mean()
        return (loss * float("nan") if calls[0] == nan_at else loss), {"row_norm": row.norm().item()}

    def renorm():
        with torch.no_grad():
            row.mul_(1.0 / row.norm())

    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, "row": row}
    save = lambda folder: sdm.save_safetensors({"row": row}, folder / "row.safetensors", {"method": "toy"})
    sdm.train_loop(args, opt, tensors, loss_fn, save, gen, after_step=renorm)
    return tensors


def test_resume_equals_an_uninterrupted_run(tmp_path):
    base = dict(max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, train_batch_size=4,
                learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2, max_grad_norm=1.0)
    full = run(ToyArgs(output_dir=str(tmp_path / "a"), **base))
    with pytest.raises(KeyboardInterrupt):
        run(ToyArgs(output_dir=str(tmp_path / "b"), **base), interrupt_at=9)  # 2 calls a step: dies in step 5
    (tmp_path / "b" / "checkpoint-5").mkdir()  # a save killed before its training state: latest skips it
    (tmp_path / "b" / "checkpoint-5" / "row.safetensors").touch()
    resumed = run(ToyArgs(output_dir=str(tmp_path / "b"), resume="latest", **base))
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    logs = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]
    a, b = logs("a"), logs("b")
    assert [r["step"] for r in a] == list(range(1, 7)) and a == b  # steps 4-5 logged before the stop are not repeated
    assert (tmp_path / "b" / "checkpoint-6" / "row.safetensors").exists() and (tmp_path / "b" / "row.safetensors").exists()
    assert abs(full["row"].norm().item() - 1) < 1e-6  # after_step ran


def test_checkpoint_limit_and_refusing_a_used_output_dir(tmp_path):
    run(ToyArgs(output_dir=str(tmp_path), max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(ToyArgs(output_dir=str(tmp_path), max_train_steps=4))


def test_resuming_past_max_train_steps_or_with_other_settings_is_one_sentence_and_writes_nothing(tmp_path):
    """A checkpoint beyond --max-train-steps would run no step and label its weights as the last step's; one of
    other shapes would be broadcast by copy_ (or fail inside Adam); one of other settings of the same shapes would
    go on with the checkpoint's learning rate (the optimizer state holds it) or on other data, silently."""
    run(ToyArgs(output_dir=str(tmp_path), max_train_steps=4, checkpointing_steps=2))
    files = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before = files()
    with pytest.raises(ValueError, match="checkpoint-4' is at step 4, past --max-train-steps 2; raise it"):
        run(ToyArgs(output_dir=str(tmp_path), max_train_steps=2, checkpointing_steps=2, resume="latest"))
    assert files() == before
    run(ToyArgs(output_dir=str(tmp_path), max_train_steps=4, checkpointing_steps=2, resume="latest"))  # at the end: a no-op
    before = files()
    for kw, what in (({"width": 16}, "--width: 8 there, 16 here"), ({"learning_rate": 1e-3}, "--learning-rate: 0.0001 there, 0.001 here"),
                     ({"words": ["a", "c"]}, "--words: ['a', 'b'] there, ['a', 'c'] here"), ({"mixed_precision": "bf16"}, "--mixed-precision: ")):
        with pytest.raises(ValueError, match=r"checkpoint-4' was trained with other settings \(" + re.escape(what)):
            run(ToyArgs(output_dir=str(tmp_path), max_train_steps=6, checkpointing_steps=2, resume="latest", **kw))
        assert files() == before, kw  # nothing loaded, args.json as it was
    # without the settings (an older checkpoint, or a caller that passes none) the shapes are still compared
    model = {"model.0.weight": torch.zeros(16, 4), "model.0.bias": torch.zeros(16)}
    with pytest.raises(ValueError, match=r"other settings \(model.0.bias: \(8,\) there, \(16,\) here\)"):
        sdm.load_checkpoint(tmp_path / "checkpoint-4", model, torch.optim.AdamW(model.values()))
    # what a resume may change: how long, where, what it logs and saves; and paths (a moved folder is the same run)
    (tmp_path.parent / "m1").mkdir(exist_ok=True), (tmp_path.parent / "m2").mkdir(exist_ok=True)
    run(ToyArgs(output_dir=str(tmp_path / "p"), max_train_steps=2, checkpointing_steps=2, pretrained_model=str(tmp_path.parent / "m1"),
                data=[str(tmp_path.parent / "m1")]))
    run(ToyArgs(output_dir=str(tmp_path / "p"), max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=1, device="cpu",
                validation_prompt="x", resume="latest", pretrained_model=str(tmp_path.parent / "m2"),
                data=[str(tmp_path.parent / "m2")]))
    assert sorted(p.name for p in (tmp_path / "p").glob("checkpoint-*")) == ["checkpoint-3"]


def test_a_resume_knows_the_base_model_and_vae_by_their_weights_not_their_paths(tmp_path):
    """Paths are free on resume (folders move), so another base model or --vae of the same shapes went on silently,
    training the rest of the run against other weights; their content is what a checkpoint now records."""
    base, vae = tmp_path / "base", tmp_path / "vae.safetensors"
    sdm.save_safetensors({"w": torch.arange(50000.0)}, base / "unet" / "diffusion_pytorch_model.safetensors")
    sdm.save_safetensors({"v": torch.ones(10)}, vae)
    (base / "model_index.json").write_text("{}")  # not weights: free to change
    kw = dict(max_train_steps=4, checkpointing_steps=2)
    run(ToyArgs(output_dir=str(tmp_path / "r"), pretrained_model=str(base), vae=str(vae), max_train_steps=2, checkpointing_steps=2))
    moved = tmp_path / "moved"
    base.rename(moved), (moved / "model_index.json").write_text('{"a": 1}')
    torch.manual_seed(0)
    run(ToyArgs(output_dir=str(tmp_path / "r"), pretrained_model=str(moved), vae=str(vae), resume="latest", max_train_steps=3,
                checkpointing_steps=1))  # the same weights elsewhere: resumes
    other = torch.arange(50000.0)
    other[25000] = -1.0  # one value deep inside: same size, same header
    sdm.save_safetensors({"w": other}, moved / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-3' was trained with other settings \(--pretrained-model: weights [0-9a-f]{16} "
                                         r"there, weights [0-9a-f]{16} here\)"):
        run(ToyArgs(output_dir=str(tmp_path / "r"), pretrained_model=str(moved), vae=str(vae), resume="latest", **kw))
    sdm.save_safetensors({"w": torch.arange(50000.0)}, moved / "unet" / "diffusion_pytorch_model.safetensors")  # back again
    sdm.save_safetensors({"v": torch.zeros(10)}, vae)
    with pytest.raises(ValueError, match=r"\(--vae: weights [0-9a-f]{16} there, weights [0-9a-f]{16} here\)"):
        run(ToyArgs(output_dir=str(tmp_path / "r"), pretrained_model=str(moved), vae=str(vae), resume="latest", **kw))
    with pytest.raises(ValueError, match=r"\(--vae: weights [0-9a-f]{16} there,  here\)"):  # the model's own VAE instead
        run(ToyArgs(output_dir=str(tmp_path / "r"), pretrained_model=str(moved), resume="latest", **kw))
    # a checkpoint that recorded no weights (the toy default "", or an older checkpoint) resumes with a path given
    run(ToyArgs(output_dir=str(tmp_path / "t"), max_train_steps=2, checkpointing_steps=2))
    run(ToyArgs(output_dir=str(tmp_path / "t"), pretrained_model=str(moved), resume="latest", **kw))


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"at step 3; the last good checkpoint is .*checkpoint-2"):
        run(ToyArgs(output_dir=str(tmp_path), max_train_steps=6, checkpointing_steps=2), nan_at=4)
    assert (tmp_path / "checkpoint-2" / "training_state.safetensors").exists()


def test_flags_come_from_the_dataclass():
    a = sdm.parse_args(ToyArgs, ["--max-train-steps", "7", "--gradient-checkpointing", "--words", "x", "y", "z",
                                 "--mixed-precision", "bf16", "--learning-rate", "3e-4"])
    assert (a.max_train_steps, a.gradient_checkpointing, a.words, a.mixed_precision, a.learning_rate) == (7, True, ["x", "y", "z"], "bf16", 3e-4)
    assert sdm.parse_args(ToyArgs, []) == ToyArgs()


@pytest.mark.parametrize("flags, said", [(["--train-batch-size", "0"], "--train-batch-size must be at least 1 (got 0)"),
                                         (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be at least 1"),
                                         (["--learning-rate", "-0.5"], "--learning-rate must be at least 0 (got -0.5)"),
                                         (["--validation-steps", "0"], "--validation-steps must be at least 1"),
                                         (["--width", "0"], "--width must be at least 1 (got 0)"),  # the class's own floor
                                         (["--sizes", "4", "0"], "--sizes must be at least 1 (got [4, 0])"),
                                         (["--lr-scheduler", "cosin"], "invalid choice: 'cosin'"),
                                         (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"), (["--kind", "c"], "invalid choice: 'c'")])
def test_a_flag_below_its_floor_or_outside_its_choices_is_one_sentence_at_parse_time(flags, said, capsys):
    """A scheduler name with a typo was a KeyError in step 0, after the output folder existed; 0 micro-batches (an
    empty stack), 0 accumulation steps (no loss to log), a modulo by 0: tracebacks steps into a run, and a negative
    learning rate ascends the loss; each is refused before anything runs (a class adds its own floors and choices)."""
    @dataclass
    class Floored(ToyArgs):
        sizes: list[int] = field(default_factory=lambda: [4])
        kind: str = "a"
        minima, choices = {"width": 1, "sizes": 1}, {"kind": ("a", "b")}

    with pytest.raises(SystemExit):
        sdm.parse_args(Floored, flags)
    assert said in capsys.readouterr().err
    assert sdm.parse_args(Floored, ["--checkpointing-steps", "0", "--learning-rate", "0"]).checkpointing_steps == 0  # 0 = never
    f = sdm.lr_lambda(sdm.TrainArgs(max_train_steps=10, lr_warmup_steps=2, lr_scheduler="cosine"))
    assert [round(f(s), 4) for s in (0, 1, 2, 7)] == [0.5, 1.0, 1.0, 0.3087]  # 0.5 (1 + cos(pi 5/8))


def test_each_methods_flags_also_take_the_kohya_and_diffusers_names_users_type():
    # USERS.md 2c: kohya's --network_dim, diffusers' --placeholder_token, Custom Diffusion's --modifier_token
    import dci_ico
    import dco
    import vico

    theirs = sdm.parse_args(dco.DCOArgs, ["--network_dim", "8", "--network_alpha", "4", "--noise_offset", "0.1",
                                          "--save_every_n_steps", "7"])
    assert theirs == sdm.parse_args(dco.DCOArgs, ["--rank", "8", "--lora-alpha", "4", "--offset-noise", "0.1",
                                                  "--checkpointing-steps", "7"]) != dco.DCOArgs()
    theirs = sdm.parse_args(vico.ViCoArgs, ["--placeholder_token", "S*", "--initializer_token", "dog", "--adam_weight_decay", "0.1"])
    assert (theirs.placeholder, theirs.init_word, theirs.weight_decay) == (["S*"], ["dog"], 0.1)
    assert sdm.parse_args(vico.ViCoArgs, ["--token_string", "S*"]).placeholder == ["S*"]
    theirs = sdm.parse_args(dci_ico.ICOArgs, ["--modifier_token", "<a>+<b>", "--initializer_token", "ktn+pll"])
    assert (theirs.tokens, theirs.init_tokens) == (["<a>+<b>"], ["ktn+pll"])  # split at "+" as the CD script does


def test_diffusers_spellings_and_a_config_file(tmp_path, capsys):
    dashed = sdm.parse_args(ToyArgs, ["--pretrained-model", "m", "--max-train-steps", "7", "--resume", "latest",
                                      "--gradient-checkpointing", "--words", "x"])
    theirs = sdm.parse_args(ToyArgs, ["--pretrained_model_name_or_path", "m", "--max_train_steps", "7",
                                      "--resume_from_checkpoint", "latest", "--gradient_checkpointing", "--words", "x"])
    assert theirs == dashed != ToyArgs()
    with pytest.raises(SystemExit):
        sdm.parse_args(ToyArgs, ["--help"])
    shown = capsys.readouterr().out
    assert "--max-train-steps" in shown and "--config" in shown and "max_train_steps" not in shown  # one spelling in --help

    # a run's args.json is a config file: the same flags back (the method's metadata skipped, and said so); the command line wins
    trained = ToyArgs(output_dir=str(tmp_path / "a"), max_train_steps=2, width=5, words=["p", "q"], learning_rate=3e-3)
    run(trained)
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    (tmp_path / "a" / "args.json").write_text(json.dumps({**saved, "method": "toy"}))
    assert sdm.parse_args(ToyArgs, ["--config", str(tmp_path / "a" / "args.json")]) == trained
    assert "skipped keys that are no flag of this command: method" in capsys.readouterr().err
    again = sdm.parse_args(ToyArgs, ["--config", str(tmp_path / "a" / "args.json"), "--max-train-steps", "9", "--no-overwrite"])
    assert (again.max_train_steps, again.width, again.words, again.learning_rate) == (9, 5, ["p", "q"], 3e-3)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        sdm.parse_args(ToyArgs, ["--config", str(tmp_path / "bad.json")])
    assert "is not a readable JSON object of flags" in capsys.readouterr().err


def test_a_fresh_start_over_an_earlier_run_is_refused_or_clears_only_that_runs_files(tmp_path, capsys):
    out, two = tmp_path / "run", dict(max_train_steps=2, checkpointing_steps=1)
    steps = lambda d: [json.loads(line)["step"] for line in (d / "log.jsonl").read_text().splitlines()]
    run(ToyArgs(output_dir=str(out), max_train_steps=4, checkpointing_steps=1))
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-500-best").mkdir()  # a user's folders, not the run's checkpoints
    (out / "500").mkdir()
    run(ToyArgs(output_dir=str(out), overwrite=True, **two))  # kept, checkpoint-4 would be what --resume latest takes
    assert sorted(p.name for p in out.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()) == ["checkpoint-1", "checkpoint-2"] and steps(out) == [1, 2]
    assert (out / "notes.txt").read_text() == "mine" and "starting over; removed 6" in capsys.readouterr().err
    assert (out / "checkpoint-500-best").is_dir() and (out / "500").is_dir()
    stopped = tmp_path / "stopped"  # a run stopped before its first checkpoint: --resume latest starts it over
    with pytest.raises(KeyboardInterrupt):
        run(ToyArgs(output_dir=str(stopped), max_train_steps=4, checkpointing_steps=3), interrupt_at=3)
    assert steps(stopped) == [1, 2] and not list(stopped.glob("checkpoint-*"))
    run(ToyArgs(output_dir=str(stopped), resume="latest", max_train_steps=4, checkpointing_steps=3))
    assert steps(stopped) == [1, 2, 3, 4] and "starting over" in capsys.readouterr().err
    done = tmp_path / "done"  # a finished run that kept no checkpoint: its outputs are not a run to start over
    run(ToyArgs(output_dir=str(done), max_train_steps=2, checkpointing_steps=0))
    with pytest.raises(FileExistsError, match=r"--resume latest: '.*done' holds no checkpoint but other files; pass --overwrite"):
        run(ToyArgs(output_dir=str(done), resume="latest", max_train_steps=2, checkpointing_steps=0))
    assert steps(done) == [1, 2] and (done / "row.safetensors").exists()


def test_a_steps_logs_are_the_means_over_its_micro_batches(tmp_path):
    """The step optimises the mean of its accumulated losses; the log said the last micro-batch's."""
    p, losses = torch.nn.Parameter(torch.zeros(1)), iter([1.0, 3.0, 5.0, 11.0])
    def loss_fn(g):
        c = next(losses)
        return p.sum() + c, {"part": c / 2, "note": "kept"}
    args = ToyArgs(output_dir=str(tmp_path), max_train_steps=2, gradient_accumulation_steps=2, checkpointing_steps=0)
    sdm.train_loop(args, torch.optim.SGD([p], lr=0.0), {"p": p}, loss_fn, lambda folder: None, torch.Generator())
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["part"], r["note"]) for r in logs] == [(2.0, 1.0, "kept"), (8.0, 4.0, "kept")]


@pytest.mark.parametrize("method", ["vico", "dco", "dci_ico", "subject_diffusion"])
def test_every_train_command_passes_variant_to_the_model_loader(method, tmp_path, monkeypatch):
    """An SD 2.x single file cannot say whether it predicts v or eps, and the loader's refusal says to pass the
    variant: --variant is a shared training flag (DCO, ICO and Subject-Diffusion refused it, ViCo too before)."""
    import importlib

    from PIL import Image

    import toy_world as tw

    class Loaded(Exception):
        pass

    def load_model(path="", *a, variant="", **kw):
        raise Loaded(a[3] if len(a) > 3 else variant)

    monkeypatch.setattr(sdm, "load_model", load_model)
    (imgs := tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (100 * i, 0, 0)).save(imgs / f"{i}.png")
    data = {"vico": ["--images", str(imgs), "--init-word", "dog"], "dco": ["--images", str(imgs), "--instance-prompt", "a <dog> dog"],
            "dci_ico": ["--images", str(imgs), "--class-word", "dog"], "subject_diffusion": ["--data", str(tmp_path / "recs")]}[method]
    tw.make_records(str(tmp_path / "recs"), 4) if method == "subject_diffusion" else None
    with pytest.raises(Loaded, match="^sd21$"):
        importlib.import_module(method).main(["train", "--pretrained-model", "v2-1_768-ema-pruned.safetensors", "--variant", "sd21",
                                              *data, "--output-dir", str(tmp_path / "run")])


def test_eta_for_a_sampler_that_ignores_it_is_refused_unless_it_is_the_commands_default(capsys):
    """--eta is DDIM's noise level; euler, dpmpp_2m and ddpm never read it, so a given --eta used to change nothing, silently
    (diffusers' pipelines drop it too). A command whose default eta is not 0 (DCI's DDIM eta 1) still takes another sampler."""
    with pytest.raises(SystemExit):
        sdm.parse_args(sdm.SampleArgs, ["--sampler", "euler", "--eta", "1"])
    assert "--eta applies to the DDIM sampler only, not euler" in capsys.readouterr().err
    assert sdm.parse_args(sdm.SampleArgs, ["--sampler", "ddim", "--eta", "1"]).eta == 1.0

    @dataclass
    class EtaOne(sdm.SampleArgs):
        eta: float = 1.0

    assert sdm.parse_args(EtaOne, ["--sampler", "euler"]).sampler == "euler"
