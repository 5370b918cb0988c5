"""The pre-training engine end to end on phantoms (tiny model, CPU)."""

import json

import pytest
import torch
from conftest import TINY_PRETRAIN

from swinssl.config import load_config
from swinssl.engine import loop
from swinssl.engine import pretrain as engine
from swinssl.checkpoint import read_checkpoint
from swinssl.runs import read_metrics
from swinssl.errors import ConfigError, TrainingError
from swinssl.nn import SwinUNETR, load_pretrained

TINY = [*TINY_PRETRAIN, "train.batch_size=2", "train.val_every=2", "train.preview_every=2", "train.checkpoint_every=2"]


def tiny_config(data, out, name, *extra):
    return load_config("pretrain/swin_unetr_tiny", [f"data={data}", f"train.out={out}", f"train.name={name}", *TINY, *extra])


def test_run_directory_contents_and_encoder_loads_into_swinunetr(phantoms, tmp_path):
    run = engine.pretrain(tiny_config(phantoms, tmp_path, "a", "train.steps=2"), progress=False)
    for name in ("config.yaml", "manifest.json", "environment.json", "metrics.csv", "checkpoints/last.pt",
                 "previews/step_0000002.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    files = [f for split in manifest.values() for case in split for f in case["files"]]
    assert len(files) == 3 and all(len(f["sha256"]) == 64 for f in files)  # 3 CT volumes (dataset.json training)
    assert len(manifest["validation"]) == 1  # val_fraction 0.2 of 3 volumes -> 1 held out
    rows = read_metrics(run)
    names = {(r["split"], r["name"]) for r in rows}
    for task in ("loss", "inpaint", "rotate", "contrast"):
        assert ("train", task) in names and ("val", task) in names
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["plan"]["network"]["feature_size"] == 12
    assert ckpt["plan"]["manifest_sha256"]
    assert ckpt["plan"]["modality"] == "CT"  # fine-tuning on another modality is refused unless allowed
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    report = load_pretrained(net, run / "checkpoints" / "last.pt")
    encoder = {k for k in ckpt["model"] if k.startswith("swinViT.")}
    assert set(report.loaded) == encoder
    assert all(k.startswith(("rotation_head", "contrastive_head", "reconstruction_head")) for k in report.unexpected)


def test_resume_after_interruption_matches_uninterrupted_run(phantoms, tmp_path, monkeypatch):
    full = engine.pretrain(tiny_config(phantoms, tmp_path, "full", "train.steps=4"), progress=False)

    calls = {"n": 0}
    real = engine.get_method("swin_unetr").compute_losses

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # third training step: after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine.get_method("swin_unetr"), "compute_losses", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.pretrain(tiny_config(phantoms, tmp_path, "cut", "train.steps=4", "train.val_every=100"), progress=False)
    cut = tmp_path / "cut"
    assert read_checkpoint(cut / "checkpoints" / "last.pt")["step"] == 2
    engine.pretrain(resume=cut, overrides=["train.val_every=2"], progress=False)

    a = read_checkpoint(full / "checkpoints" / "last.pt")
    b = read_checkpoint(cut / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    losses = lambda run: {r["step"]: r["value"] for r in read_metrics(run) if r["split"] == "train" and r["name"] == "loss"}
    assert losses(cut)[3] == pytest.approx(losses(full)[3], abs=1e-6)
    assert losses(cut)[4] == pytest.approx(losses(full)[4], abs=1e-6)


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(phantoms, tmp_path, monkeypatch):
    real = engine.get_method("swin_unetr").compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        total, parts, previews = real(*args, **kwargs)
        if calls["n"] == 3:
            parts["inpaint"] = parts["inpaint"] * float("nan")
            total = total * float("nan")
        return total, parts, previews

    monkeypatch.setattr(engine.get_method("swin_unetr"), "compute_losses", poisoned)
    with pytest.raises(TrainingError, match=r"step 2: loss is not finite \(inpaint=nan"):
        engine.pretrain(tiny_config(phantoms, tmp_path, "nan", "train.steps=4", "train.val_every=100"), progress=False)
    assert read_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")["step"] == 2


def test_bad_method_configs_are_refused(phantoms, tmp_path):
    with pytest.raises(ConfigError, match="multiples of 32"):
        engine.pretrain(tiny_config(phantoms, tmp_path, "x", "preprocess.roi_size=48"), progress=False)
    with pytest.raises(ConfigError, match="needs a second bottleneck token"):
        engine.pretrain(tiny_config(phantoms, tmp_path, "x", "preprocess.roi_size=32"), progress=False)
    with pytest.raises(ConfigError, match=r"unknown task 'nope'"):
        engine.pretrain(tiny_config(phantoms, tmp_path, "x", "method.weights={nope: 1.0}"), progress=False)
    # A registered task whose views cannot feed it: one line naming the task, what it needs and the fix.
    with pytest.raises(ConfigError, match=r"task 'mutual' needs view fields \['mask', 'orders'\].*method.views=masked"):
        engine.pretrain(tiny_config(phantoms, tmp_path, "x", "method.weights={mutual: 1.0}"), progress=False)
    with pytest.raises(ConfigError, match=r"task 'density' .* model.encoder=domain_invariant_swin"):
        engine.pretrain(tiny_config(phantoms, tmp_path, "x", "method.weights={density: 1.0}"), progress=False)
    with pytest.raises(ConfigError, match="run directory exists"):
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "file").write_text("x")
        engine.pretrain(tiny_config(phantoms, tmp_path, "taken", "train.steps=1"), progress=False)


def test_warmup_cosine_schedule():
    f = loop.warmup_cosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5)
    assert f(12) == pytest.approx(0.0, abs=1e-12)


def test_schedule_is_monais_cosine_without_its_zero_lr_first_step():
    """Why the hand-written factor stays: MONAI's WarmupCosineSchedule has the same cosine but
    warms up as step / warmup, so its first optimiser step runs at LR 0."""
    from monai.optimizers import WarmupCosineSchedule

    ours = loop.warmup_cosine(warmup=4, total=12)
    monai = WarmupCosineSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 4, 12).lr_lambda
    assert monai(0) == 0.0 and ours(0) == 0.25
    assert [monai(s + 1) for s in range(3)] == [ours(s) for s in range(3)]  # the warm-up, one step late
    for s in range(4, 13):
        assert monai(s) == pytest.approx(ours(s), abs=1e-12)


def test_embedding_spread_is_zero_when_collapsed_and_near_one_when_spread():
    from swinssl.methods.tasks import embedding_spread

    collapsed = torch.ones(8, 512) * 3 + torch.randn(512)  # every row the same vector
    assert embedding_spread(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    spread = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    assert embedding_spread(spread).item() == pytest.approx(1.0, abs=0.02)
    # Scale-free: only directions count, as in NT-Xent.
    assert embedding_spread(spread[:16] * 100).item() == pytest.approx(embedding_spread(spread[:16]).item(), rel=1e-5)


@pytest.mark.slow
def test_compiled_model_computes_the_eager_losses(phantoms, tmp_path):
    # One step: the logged losses are of the untouched initial weights, so they must agree.
    # (Weights after AdamW steps are no test: Adam turns rounding-level gradient differences
    # of near-zero gradients into lr-sized updates.)
    runs = [engine.pretrain(tiny_config(phantoms, tmp_path, name, "train.steps=1", *extra), progress=False)
            for name, extra in (("eager", ()), ("compiled", ("train.compile=true",)))]
    eager, compiled = ({(r["name"], r["split"]): r["value"] for r in read_metrics(run)} for run in runs)
    for key in ("loss", "inpaint", "rotate", "contrast"):
        assert compiled[(key, "train")] == pytest.approx(eager[(key, "train")], rel=1e-4), key
    state = read_checkpoint(runs[1] / "checkpoints" / "last.pt")["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)  # in-place compile: plain keys in checkpoints


def test_resume_with_weights_that_no_longer_fit_is_refused_in_one_line(phantoms, tmp_path):
    from swinssl.errors import CheckpointError

    run = engine.pretrain(tiny_config(phantoms, tmp_path, "w", "train.steps=1"), progress=False)
    with pytest.raises(CheckpointError, match=r"last.pt: the weights do not fit .* \(0 missing, 2 unexpected tensors, "
                                              r"e.g. rotation_head") as err:
        engine.pretrain(resume=run, overrides=["train.steps=2", "method.weights={inpaint: 1, rotate: 0, contrast: 1}"],
                        progress=False)
    assert "\n" not in str(err.value)


def test_probe_during_pretraining_logs_the_encoder_beside_random_and_leaves_the_run_alone(phantoms, tmp_path):
    from dataclasses import replace

    from swinssl.engine.probe import probe

    probing = [f"train.probe_data={phantoms}", "train.probe_every=2", "train.probe_steps=30"]
    plain = engine.pretrain(tiny_config(phantoms, tmp_path, "plain", "train.steps=4", "train.val_every=4"),
                            progress=False)
    cfg = tiny_config(phantoms, tmp_path, "probed", "train.steps=4", "train.val_every=4", *probing)
    probed = engine.pretrain(cfg, progress=False)
    val = [r for r in read_metrics(probed) if r["split"] == "val"]
    assert {r["name"] for r in val if r["step"] == 2} == {"probe_dice", "probe_dice_random", "probe_s"}
    logged = {(r["step"], r["name"]): r["value"] for r in val}
    assert logged[2, "probe_dice_random"] == logged[4, "probe_dice_random"]  # measured once per run
    assert logged[2, "probe_s"] > 0 and ("val", "loss") in {(r["split"], r["name"]) for r in val if r["step"] == 4}
    # What was logged is the probe of the run's encoder at that step, and of a random one of its plan.
    probe_cfg = replace(cfg, data=replace(cfg.data, path=str(phantoms)))
    last = probe(probed / "checkpoints" / "last.pt", probe_cfg, steps=30, seed=cfg.seed)
    assert last.dice == pytest.approx(logged[4, "probe_dice"], abs=1e-6)
    assert probe("random", probe_cfg, steps=30, seed=cfg.seed).dice == pytest.approx(logged[2, "probe_dice_random"],
                                                                                   abs=1e-6)
    # The probe trains a copy: the run's weights are those of the same run without it.
    a, b = (read_checkpoint(run / "checkpoints" / "last.pt")["model"] for run in (plain, probed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
