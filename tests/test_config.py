from pathlib import Path

import pytest

from swinssl.config import Config, PreprocessConfig, from_dict, load_config, resolve_preset, save_config, to_dict
from swinssl.errors import ConfigError


def test_defaults_without_preset():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.preprocess.roi_size == (96, 96, 96)
    assert cfg.preprocess.ct_window == (-1000.0, 1000.0)
    assert cfg.data.modality == "auto"


def test_preset_by_name_and_by_path_are_the_same():
    by_name = load_config("preprocess/ct")
    by_path = load_config(resolve_preset("preprocess/ct.yaml"))
    assert by_name == by_path
    assert by_name.preprocess.spacing == (1.5, 1.5, 2.0)
    assert by_name.preprocess.ct_window == (-175.0, 250.0)
    assert by_name.data.modality == "CT"


def test_every_shipped_preset_loads():
    presets = sorted(Path(resolve_preset("preprocess/ct")).parents[1].rglob("*.yaml"))
    assert len(presets) >= 2
    for preset in presets:
        load_config(preset)


def test_overrides_apply_after_preset_with_yaml_values():
    cfg = load_config("preprocess/ct", ["preprocess.roi_size=[64, 64, 32]", "preprocess.spacing=null", "seed=7"])
    assert cfg.preprocess.roi_size == (64, 64, 32)
    assert cfg.preprocess.spacing is None
    assert cfg.seed == 7
    assert cfg.preprocess.ct_window == (-175.0, 250.0)  # untouched preset value


def test_scalar_broadcasts_to_3_tuple_and_comma_lists_parse():
    cfg = load_config(None, ["preprocess.roi_size=64", "preprocess.spacing=1,1,2.5"])
    assert cfg.preprocess.roi_size == (64, 64, 64)
    assert cfg.preprocess.spacing == (1.0, 1.0, 2.5)


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 reads "4e-4" as a string; a learning rate typed that way must still work.
    cfg = load_config(None, ["train.lr=4e-4", "train.weight_decay=1E-5", "method.temperature=.5"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.method.temperature) == (4e-4, 1e-5, 0.5)
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(None, ["train.lr=4e-4x"])


def test_data_shorthand_sets_data_path():
    assert load_config(None, ["data=/some/folder"]).data.path == "/some/folder"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'preprocess.roi_sz'; allowed: .*roi_size"):
        load_config(None, ["preprocess.roi_sz=64"])


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown key .sed.; allowed: data, preprocess, model, method, train, finetune, seed"):
        load_config(None, ["sed=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("preprocess.num_crops=two", "preprocess.num_crops must be an integer"),
        ("preprocess.num_crops=2.5", "preprocess.num_crops must be an integer"),
        ("preprocess.crop_foreground=maybe", "preprocess.crop_foreground must be true or false"),
        ("preprocess.roi_size=[64, 64]", "preprocess.roi_size must be a list of 3 values"),
        ("preprocess.mri_normalization=minmax", "must be one of percentile, zscore"),
        ("data.modality=PET", "data.modality must be one of CT, MRI, auto"),
        ("preprocess.ct_window=wide", "preprocess.ct_window must be"),
        ("preprocess=3", "preprocess must be a section"),
    ],
)
def test_wrong_type_names_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="overrides are key=value"):
        load_config(None, ["preprocess.roi_size"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  roi_size: [64, 64\n  num_crops: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ malformed YAML"):
        load_config(bad)


def test_yaml_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(bad)


def test_missing_preset_lists_available():
    with pytest.raises(ConfigError, match=r"nope: no such config file or preset; presets: .*preprocess/ct"):
        load_config("nope")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("preprocess/mri", ["preprocess.roi_size=48", "seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert not [p for p in tmp_path.iterdir() if p.name != "config.yaml"]  # no temporary file left


def test_from_dict_on_a_section_class():
    cfg = from_dict(PreprocessConfig, {"roi_size": [32, 32, 32]})
    assert cfg.roi_size == (32, 32, 32)
    assert to_dict(cfg)["roi_size"] == [32, 32, 32]


def test_presets_lay_over_one_another_key_by_key(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train: {steps: 7}\nmethod: {weights: {inpaint: 2.0}}\n")
    cfg = load_config(["pretrain/swin_unetr_tiny", overlay], ["train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3
    assert cfg.train.warmup_steps == 20 and cfg.model.feature_size == 12  # the base preset's other keys stay (default 50)
    assert cfg.method.weights == {"inpaint": 2.0}  # a value that is a mapping is replaced, as an override does
    assert load_config([overlay, "pretrain/swin_unetr_tiny"]).train.steps == 300  # the later preset wins


def test_retired_keys_of_older_run_folders_are_ignored_with_a_warning(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("model: {feature_size: 12, out_channels: 5}\n")
    with pytest.warns(UserWarning, match="model.out_channels is no longer used"):
        assert load_config(old).model.feature_size == 12


# The paper presets' settings, each with the paper's own words (their comments cite the line).
PAPER_SETTINGS = {
    # SwinMM, sec. 3: "a batch size of 2 on each GPU, and an initial learning rate of 5e-4 and weight decay
    # of 1e-1", "a warm-up of 50 iterations", "100K steps for pre-training".
    "pretrain/swinmm": {"train.batch_size": 2, "preprocess.num_crops": 1, "train.lr": 5e-4,
                        "train.weight_decay": 0.1, "train.warmup_steps": 50, "train.steps": 100_000},
    # SwinMM, sec. 3: "a learning rate of 3e-4 and a layer-wise learning rate decay of 0.75", "a warm-up of
    # 50 iterations", "window size is 64x64x64 and the overlapping between windows is 70%".
    "finetune/swinmm": {"train.lr": 3e-4, "finetune.layer_decay": 0.75, "train.warmup_steps": 50,
                        "preprocess.roi_size": (64, 64, 64), "finetune.overlap": 0.7},
    # SwinFUSE, sec. 3: "a warm-up cosine scheduler with 500 iterations", "4e-4 and a decay of 1e-5"; sec. 2.2:
    # "a 4-layer deep Multi-Head Attention Block (MHA) with 3, 6, 12, 24 heads"; sec. 2.4: fine-tuning "while
    # retaining the DIM".
    "pretrain/swinfuse": {"train.lr": 4e-4, "train.weight_decay": 1e-5, "train.warmup_steps": 500,
                          "model.invariance_heads": (3, 6, 12, 24), "model.feature_size": 48},
    "finetune/swinfuse": {"model.encoder": "domain_invariant_swin", "model.invariance_heads": (3, 6, 12, 24),
                          "finetune.method": "swinfuse"},
    # Swin UNETR SSL, sec. 4: "96x96x96 patch", "4e-4", "decay of 1e-5", "warm-up cosine scheduler of 500
    # iterations"; 4 crops per GPU = 2 volumes x 2 crops. (450K iterations in the paper; 100K here, said.)
    "pretrain/swin_unetr": {"preprocess.roi_size": (96, 96, 96), "train.lr": 4e-4, "train.weight_decay": 1e-5,
                            "train.warmup_steps": 500, "train.batch_size": 2, "preprocess.num_crops": 2},
}


@pytest.mark.parametrize("preset", sorted(PAPER_SETTINGS))
def test_paper_presets_hold_the_papers_settings(preset):
    cfg = load_config(preset)
    for key, value in PAPER_SETTINGS[preset].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(value), key


def _paired_arms():
    """(name, pre-training presets, fine-tuning presets) of every comparison of a pre-trained and a
    scratch arm that swinssl runs: the demo and the studies."""
    from swinssl.workflows.demo import DEMO
    from swinssl.workflows.study import EFFICIENCY, PRESETS

    yield "demo", DEMO["pretrain"], DEMO["finetune"]
    for size, p in PRESETS.items():
        for method, config in p["methods"].items():
            yield f"modality {size} {method}", [config, p["pretrain"]], ["finetune/tiny", p["finetune"]]
    for size, p in EFFICIENCY.items():
        for method in ("swin_unetr", "swinmm", "swinfuse"):
            config = f"pretrain/{method}_tiny" if size == "tiny" else f"pretrain/{method}"
            for finetune in (p["finetune_config"], p["semi_finetune_config"]):
                yield f"efficiency {size} {method} {finetune}", [config, p["pretrain"]], [finetune, p["finetune"]]


@pytest.mark.parametrize("name, pretrain, finetune", list(_paired_arms()), ids=lambda v: v if isinstance(v, str) else "")
def test_pretrained_and_scratch_arms_see_the_same_input(name, pretrain, finetune):
    """Fine-tuning adopts the pre-trained plan's grid and intensities (finetune.adopt_preprocessing); the
    scratch arm does not. Where they differed, the comparison would not be of the encoder alone."""
    from swinssl.plan import INPUT_FIELDS

    pre, fine = load_config(pretrain).preprocess, load_config(finetune).preprocess
    for field_name in INPUT_FIELDS:
        assert getattr(pre, field_name) == getattr(fine, field_name), f"{name}: preprocess.{field_name}"


def test_yaml_11_words_are_text_for_text_keys_and_booleans_for_boolean_keys():
    cfg = load_config("pretrain/swin_unetr_tiny", ["data.cache=off", "train.name=no", "train.compile=on",
                                                   "train.deterministic=off"])
    assert cfg.data.cache == "off" and cfg.train.name == "no"  # the README's data.cache=off
    assert cfg.train.compile is True and cfg.train.deterministic is False


def test_older_model_keys_read_layer_by_layer_so_a_later_layer_wins(tmp_path):
    older = tmp_path / "older.yaml"  # a run's config.yaml written before model.encoder existed
    older.write_text("model:\n  domain_invariance: true\n  dim_heads: 3\n  dim_pool: 4\n")
    cfg = load_config(older)
    assert (cfg.model.encoder, cfg.model.invariance_heads, cfg.model.invariance_pool) == ("domain_invariant_swin", 3, 4)
    cfg = load_config(older, ["model.invariance_pool=2", "model.encoder=swin"])
    assert (cfg.model.encoder, cfg.model.invariance_pool) == ("swin", 2)
    assert load_config("pretrain/swinfuse_tiny", ["model.dim_pool=2"]).model.invariance_pool == 2
