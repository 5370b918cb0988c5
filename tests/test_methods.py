"""A method is data: registered tasks and view makers, heads only for weighted tasks, tasks
combined across methods by config alone (refused in one line where they cannot work), the
DIM always fed two streams, and a new task added by one function plus one preset line."""

import io
import math
import tokenize
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, TINY_PRETRAIN

import swinssl
from swinssl.config import Config, MethodConfig, ModelConfig, PreprocessConfig, load_config
from swinssl.runs import read_metrics
from swinssl.engine.pretrain import pretrain
from swinssl.errors import ConfigError
from swinssl.methods import TASKS, TaskInput, finetune_method, get_method, register_task, view_choices, window_predictor

TINY_MODEL = ModelConfig(feature_size=12, depths=(1, 1, 1, 1))
ROI64 = PreprocessConfig(roi_size=(64, 64, 64))


def config(model=TINY_MODEL, **method) -> Config:
    return Config(preprocess=ROI64, model=model, method=MethodConfig(**method))


# --- heads and the registry ----------------------------------------------------------------------


def test_heads_are_built_only_for_weighted_tasks_and_all_get_gradients():
    cfg = config(weights={"inpaint": 1.0, "rotate": 0.0, "contrast": 1.0})
    method = get_method("swin_unetr")
    model = method.build_model(cfg)
    assert not hasattr(model, "rotation_head")
    # Built in the registry's order (initialised in it: a seed gives the weights earlier versions gave).
    everything = method.build_model(config(weights={"inpaint": 1.0, "rotate": 1.0, "contrast": 1.0}))
    assert list(dict.fromkeys(k.split(".")[0] for k in everything.state_dict())) == [
        "swinViT", "rotation_head", "contrastive_head", "reconstruction_head"]
    assert hasattr(model, "reconstruction_head") and hasattr(model, "contrastive_head")
    total, parts, _ = method.compute_losses(model, torch.rand(2, 1, 64, 64, 64), torch.Generator().manual_seed(0),
                                            cfg.method)
    assert set(parts) == {"inpaint", "contrast", "embed_spread"}  # the task weighted 0 is not computed
    total.backward()
    # DDP refuses parameters without gradient: every built parameter takes part in the loss.
    assert all(p.grad is not None for p in model.parameters())


def test_total_is_the_weighted_sum_of_the_tasks():
    cfg = config(weights={"inpaint": 2.0, "rotate": 0.5, "contrast": 1.0})
    method = get_method("swin_unetr")
    torch.manual_seed(0)
    model = method.build_model(cfg)
    total, parts, _ = method.compute_losses(model, torch.rand(2, 1, 64, 64, 64), torch.Generator().manual_seed(0),
                                            cfg.method)
    torch.testing.assert_close(total, 2 * parts["inpaint"] + 0.5 * parts["rotate"] + parts["contrast"])


def test_every_registered_task_names_an_existing_head_and_view_fields_some_maker_gives():
    from swinssl.methods import VIEW_MAKERS

    assert set(TASKS) >= {"inpaint", "rotate", "contrast", "mutual", "density"}
    for task in TASKS.values():
        assert any(task.needs <= maker.provides for maker in VIEW_MAKERS.values()), task.name
    with pytest.raises(ValueError, match="registered twice"):
        register_task("inpaint")(lambda s: s.x.sum())


@pytest.mark.parametrize("overrides, message", [
    (["method.weights={mutual: 1.0}"], r"task 'mutual' needs view fields \['mask', 'orders'\].*method.views=masked"),
    (["method.weights={density: 1.0}"], r"task 'density' .*model.encoder=domain_invariant_swin"),
    (["method.weights={inpaint: 0.0}"], "no task has a non-zero weight"),
    (["method.weights={inpaint: 1.0, nope: 0.0}"], "unknown task 'nope'; registered tasks: inpaint, rotate"),
    (["method.views=sideways"], "method.views 'sideways': unknown view maker"),
    (["method.name=nope"], "method.name 'nope': unknown method"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(overrides, message):
    cfg = load_config("pretrain/swin_unetr_tiny", overrides)
    with pytest.raises(ConfigError, match=message) as err:
        get_method(cfg.method.name).check(cfg)
    assert "\n" not in str(err.value)


def test_swin_unetr_with_masked_views_takes_the_mutual_task():
    cfg = load_config("pretrain/swin_unetr_tiny", ["method.views=masked", "method.weights={inpaint: 1, mutual: 1}",
                                                   "model.depths=[1,1,1,1]"])
    method = get_method(cfg.method.name)
    method.check(cfg)
    _, parts, _ = method.compute_losses(method.build_model(cfg), torch.rand(2, 1, 64, 64, 64),
                                        torch.Generator().manual_seed(0), cfg.method)
    assert set(parts) == {"inpaint", "mutual"} and all(torch.isfinite(v) for v in parts.values())


# --- the domain-invariance module always gets two streams ---------------------------------------


@pytest.mark.parametrize("preset", ["pretrain/swinmm_tiny", "pretrain/swin_unetr_tiny", "pretrain/swinfuse_tiny"])
def test_dim_output_of_a_sample_changes_when_only_its_partner_view_changes(preset):
    cfg = load_config(preset, ["model.encoder=domain_invariant_swin", "model.invariance_heads=3", "model.depths=[1,1,1,1]"])
    torch.manual_seed(0)
    model = get_method(cfg.method.name).build_model(cfg).eval()
    views, partner = torch.rand(2, 1, 64, 64, 64), torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        before = model(views)
        after = model(torch.cat([views[:1], partner]))  # sample 0's first view kept, its partner replaced
    assert (before["streams"][0] - after["streams"][0]).abs().max() > 1e-4
    assert (before["reconstruction"][0] - after["reconstruction"][0]).abs().max() > 1e-6
    # Without the module, a view's output is its own alone.
    plain = get_method(cfg.method.name).build_model(replace(cfg, model=replace(cfg.model, encoder="swin")))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(views)["reconstruction"][0],
                                   plain(torch.cat([views[:1], partner]))["reconstruction"][0])


# --- a new task: one function and one preset line -------------------------------------------------


@pytest.fixture
def toy_task():
    @register_task("toy", head="reconstruction", needs=("targets",))
    def toy(s: TaskInput) -> torch.Tensor:
        """The reconstruction's mean intensity matches the target's."""
        return (s.out["reconstruction"].mean() - torch.cat(s.views["targets"]).mean()).abs()

    yield toy
    del TASKS["toy"]


def test_a_new_task_is_one_function_and_one_preset_line(toy_task, phantoms, tmp_path):
    preset = tmp_path / "toy.yaml"
    preset.write_text((Path(swinssl.__file__).parent / "configs/pretrain/swin_unetr_tiny.yaml").read_text()
                      .replace("  weights: {inpaint: 1.0, rotate: 1.0, contrast: 1.0}",
                               "  weights: {inpaint: 1.0, rotate: 1.0, contrast: 1.0, toy: 0.5}"))
    cfg = load_config(preset, [f"data={phantoms}", f"train.out={tmp_path}", "train.name=toy", *TINY_PRETRAIN,
                               "train.steps=2", "train.batch_size=2", "train.val_every=2", "train.preview_every=0"])
    assert cfg.method.weights["toy"] == 0.5
    run = pretrain(cfg, progress=False)
    logged = {(r["split"], r["name"]): r["value"] for r in read_metrics(run)}
    assert math.isfinite(logged[("train", "toy")]) and math.isfinite(logged[("val", "toy")])
    method = get_method(cfg.method.name)
    total, parts, _ = method.compute_losses(method.build_model(cfg), torch.rand(2, 1, 64, 64, 64),
                                            torch.Generator().manual_seed(0), cfg.method)
    torch.testing.assert_close(total, parts["inpaint"] + parts["rotate"] + parts["contrast"] + 0.5 * parts["toy"])


# --- the combined preset ------------------------------------------------------------------------


def test_combined_preset_trains_every_term_of_both_methods(phantoms, tmp_path):
    cfg = load_config("pretrain/swinmm_fuse_tiny", [f"data={phantoms}", f"train.out={tmp_path}", "train.name=mix",
                                                    *TINY_PRETRAIN, "train.steps=2", "train.batch_size=2",
                                                    "train.val_every=2", "train.preview_every=2"])
    assert cfg.model.encoder == "domain_invariant_swin" and cfg.method.views == "masked"
    run = pretrain(cfg, progress=False)
    logged = {(r["split"], r["name"]): r["value"] for r in read_metrics(run)}
    for term in ("inpaint", "rotate", "contrast", "mutual", "density", "jsd", "loss"):
        assert math.isfinite(logged[("train", term)]), term
        assert math.isfinite(logged[("val", term)]), term
    assert logged[("train", "density")] == pytest.approx(-logged[("train", "jsd")], abs=1e-5)
    assert (run / "previews" / "step_0000002.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "ct").is_dir(), reason="real volumes (../shared/data) are not here")
def test_combined_preset_on_real_ct_and_mri_for_a_few_dozen_steps(tmp_path):
    data = tmp_path / "volumes"
    data.mkdir()
    for name in ("ct/lung1_image.nrrd", "ct/head_ct_template_1mm.nii.gz", "mri/itk_t1.nii.gz",
                 "mri/brain1_t1c_image.nrrd", "mri/mni152_t1.nii.gz"):
        (data / name.replace("/", "_")).symlink_to(SHARED_DATA / name)
    cfg = load_config("pretrain/swinmm_fuse_tiny", [f"data={data}", f"train.out={tmp_path}", "train.name=real",
                                                    "train.steps=30", "train.num_workers=0", "train.log_every=5",
                                                    "train.val_every=30", "train.checkpoint_every=30"])
    run = pretrain(cfg, progress=False)
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    for term in ("inpaint", "rotate", "contrast", "mutual", "density", "jsd"):
        values = [r["value"] for r in rows if r["name"] == term]
        assert len(values) == 6 and all(math.isfinite(v) for v in values), term


# --- the engine, inference and the CLI know no method by name -----------------------------------


def test_fine_tuning_and_inference_hooks_are_looked_up_by_name():
    plain, multiview = asdict(ModelConfig()), asdict(ModelConfig(multiview=True))
    invariant = asdict(ModelConfig(encoder="domain_invariant_swin"))
    assert finetune_method("swinmm", multiview).name == "swinmm"
    assert finetune_method("swin_unetr", plain).name == "swin_unetr"
    # auto: the method whose declared network it is, one for each
    assert [finetune_method("auto", n).name for n in (plain, multiview, invariant)] == ["swin_unetr", "swinmm", "swinfuse"]
    # a named method is checked against the network its hooks drive
    with pytest.raises(ConfigError, match="finetune.method swinmm: .* model.multiview=true"):
        finetune_method("swinmm", plain)
    with pytest.raises(ConfigError, match="finetune.method swin_unetr: .* model.multiview=false"):
        finetune_method("swin_unetr", multiview)
    with pytest.raises(ConfigError, match="finetune.method 'nope'"):
        finetune_method("nope", plain)
    assert set(view_choices()) == {"auto", "single", "fused", "identity", "swap_xy", "swap_xz"}
    double = lambda w: w * 2  # noqa: E731
    predictor, chosen = window_predictor(double, None, "auto")
    assert chosen == "single" and predictor is double
    assert window_predictor(double, get_method("swinmm"), "auto")[1] == "fused"
    with pytest.raises(ConfigError, match="views 'diagonal'"):
        window_predictor(double, None, "diagonal")
    with pytest.raises(ConfigError, match="finetune.unlabeled needs model.multiview"):
        finetune_method("auto", plain).check_finetune(load_config("finetune/tiny", ["finetune.unlabeled=somewhere"]))


def test_a_plan_names_its_hooks_and_older_plans_get_them_from_their_network():
    from swinssl.methods import method_of
    from swinssl.plan import Plan

    plan = Plan(network=ModelConfig(multiview=True), preprocess=load_config("finetune/tiny").preprocess, out_channels=2)
    assert plan.finetune_method is None and method_of(plan).name == "swinmm"  # written before the name was recorded
    plan.finetune_method = "swinmm"
    assert Plan.from_dict(plan.to_dict()).finetune_method == "swinmm"
    plan.finetune_method = "swin_unetr"  # a plan whose name and network disagree is refused, naming the key
    with pytest.raises(ConfigError, match="plan.finetune_method swin_unetr"):
        method_of(plan)


def _code_tokens(path: Path) -> list[str]:
    """Names and strings of a module, without comments, docstrings and import statements."""
    tokens, previous, in_import = [], tokenize.NEWLINE, False
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME and tok.string in ("import", "from") and previous in (
                tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            in_import = True
        if tok.type == tokenize.NEWLINE:
            in_import = False
        if tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            previous = tok.type
            continue  # a docstring (an expression statement of its own)
        if tok.type in (tokenize.NAME, tokenize.STRING) and not in_import:
            tokens.append(tok.string.lower())
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            previous = tok.type
    return tokens


def test_engine_inference_and_cli_name_no_method():
    import ast

    package = Path(swinssl.__file__).parent
    names = ("swin_unetr", "swinmm", "swinfuse", "multiview", "domain_invariant", "invariance", "mutual", "density")
    cli = sorted((package / "cli").glob("*.py"))
    modules = [*sorted((package / "engine").glob("*.py")), *sorted((package / "infer").glob("*.py")), *cli]
    for path in modules:
        imported = [node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module]
        assert not [m for m in imported if m.startswith("swinssl.methods.")], f"{path.name} imports a method module"
        if path not in cli:  # the CLI's help names preset files, which are data
            found = [t for t in _code_tokens(path) if any(n in t for n in names)]
            assert not found, f"{path.name} names a method or its parts: {found}"


# --- each task's loss against a reference written out here ---------------------------------------


def _step(views: dict, out: dict, **method) -> TaskInput:
    x = views["targets"][0]
    return TaskInput(x=x, views=views, out=out, method=MethodConfig(**method), generator=torch.Generator().manual_seed(0))


def test_inpaint_is_l1_on_cutout_views_and_masked_mse_on_masked_views():
    from swinssl.ssl.views import multi_views, two_views

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 32, generator=g)
    recon = torch.rand(4, 1, 32, 32, 32, generator=g)
    cut = two_views(x, torch.Generator().manual_seed(1))
    expected = (recon - torch.cat(cut["targets"])).abs().mean()
    torch.testing.assert_close(TASKS["inpaint"].loss(_step(cut, {"reconstruction": recon})), expected)

    masked = multi_views(x, torch.Generator().manual_seed(1), ratio=0.5, patch=16)
    per_view = []
    for r, t, m in zip(recon.split(2), masked["targets"], masked["masks"]):
        per_view.append(((r - t) ** 2)[m.expand_as(t)].mean())
    torch.testing.assert_close(TASKS["inpaint"].loss(_step(masked, {"reconstruction": recon})), sum(per_view) / 2)
    # zscore_target: the target of each sample is normalised to mean 0, std 1 first.
    z = [(t - t.mean((1, 2, 3, 4), keepdim=True)) / (t.std((1, 2, 3, 4), keepdim=True) + 1e-6) for t in masked["targets"]]
    zscored = sum(((r - t) ** 2)[m.expand_as(t)].mean() for r, t, m in zip(recon.split(2), z, masked["masks"])) / 2
    torch.testing.assert_close(TASKS["inpaint"].loss(_step(masked, {"reconstruction": recon}, zscore_target=True)),
                               zscored)


def test_rotate_contrast_mutual_and_density_read_what_they_should():
    from swinssl.ssl.losses import kde_jsd, mutual_loss, ntxent, sample_tokens
    from swinssl.ssl.views import multi_views, to_common_frame

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, 32, generator=g)
    views = multi_views(x, torch.Generator().manual_seed(1))
    logits, z = torch.randn(4, 4, generator=g), torch.randn(4, 8, generator=g)
    recon = torch.rand(4, 1, 32, 32, 32, generator=g)
    streams = (torch.randn(2, 6, 4, 4, 4, generator=g), torch.randn(2, 6, 4, 4, 4, generator=g))
    out = {"rotation": logits, "contrastive": z, "reconstruction": recon, "streams": streams}
    step = _step(views, out, temperature=0.2, density_points=16)
    torch.testing.assert_close(TASKS["rotate"].loss(step),
                               torch.nn.functional.cross_entropy(logits, torch.cat(views["rotations"])))
    torch.testing.assert_close(TASKS["contrast"].loss(step)["contrast"], ntxent(z[:2], z[2:], temperature=0.2))
    common = [to_common_frame(r, o, k) for r, o, k in zip(recon.split(2), views["orders"], views["rotations"])]
    torch.testing.assert_close(TASKS["mutual"].loss(step), mutual_loss(common, views["mask"]))
    density = TASKS["density"].loss(step)
    points = sample_tokens(list(streams), 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(density["jsd"], kde_jsd(*points))
    torch.testing.assert_close(density["density"], -kde_jsd(*points))
