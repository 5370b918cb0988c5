import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import swinssl
from swinssl.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # help and errors on one line where they fit


def _flat(text: str) -> str:
    """Rendered help or error text without rich's box characters and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("phantom", "data", "config"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"swinssl {swinssl.__version__}"


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "swinssl.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and swinssl.__version__ in result.stdout


def test_phantom_then_data_check_end_to_end(tmp_path):
    out = tmp_path / "phantom"
    result = runner.invoke(app, ["phantom", "--out", str(out), "--cases", "2", "--size", "32", "--seed", "3"])
    assert result.exit_code == 0, result.output
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "CT"}
    assert (out / "dataset_mri.json").is_file()
    for target in (out, out / "dataset_mri.json"):
        check = runner.invoke(app, ["data", "check", str(target)])
        assert check.exit_code == 0, check.output
        assert "32x32x32" in check.output
        assert "1,2,3,4" in check.output  # every organ class present in the labels
    assert "MRI" in runner.invoke(app, ["data", "check", str(out / "dataset_mri.json")]).output


def test_config_show_applies_overrides():
    result = runner.invoke(app, ["config", "show", "preprocess/ct", "preprocess.roi_size=64"])
    assert result.exit_code == 0, result.output
    assert "roi_size:\n  - 64\n  - 64\n  - 64" in result.output


def test_config_error_is_one_line_with_exit_code_2():
    result = runner.invoke(app, ["config", "show", "preprocess.roi_sz=64"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and "preprocess.roi_sz" in lines[0]


@pytest.mark.parametrize("override, fragment", [
    ("method.weights.bogus=1", "method.weights: unknown task 'bogus'"),
    ("method.views=warped", "method.views 'warped': unknown view maker"),
    ("method.name=simclr", "method.name 'simclr': unknown method"),
])
def test_config_show_refuses_what_pretraining_refuses(override, fragment):
    result = runner.invoke(app, ["config", "show", "pretrain/swin_unetr_tiny", override])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {fragment}"), result.output


def test_data_check_rejects_unknown_modality(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--modality", "PET"])
    assert result.exit_code == 2
    assert "--modality" in result.output and all(f"'{m}'" in result.output for m in ("CT", "MRI", "auto"))


def test_phantom_into_unwritable_place_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["phantom", "--out", str(blocker / "data"), "--cases", "1", "--size", "32"])
    assert result.exit_code == 5
    assert result.output.startswith("error: ") and str(blocker) in result.output
    assert "Traceback" not in result.output


def test_pretrain_without_data_is_a_config_error(tmp_path):
    result = runner.invoke(app, ["pretrain", f"train.out={tmp_path}"])
    assert result.exit_code == 2
    assert "data.path is empty" in result.output and "Traceback" not in result.output


def test_pretrain_on_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["pretrain", f"data={missing}", f"train.out={tmp_path}"])
    assert result.exit_code == 3
    assert result.output.strip() == f"error: {missing}: no such file or folder"


def test_pretrain_help_names_presets_and_resume():
    result = runner.invoke(app, ["pretrain", "--help"])
    assert result.exit_code == 0
    assert "--resume" in result.output and "pretrain/swin_unetr_tiny" in result.output


def test_study_help_lists_its_commands_when_run_as_module():
    env = {**os.environ, **WIDE}
    result = subprocess.run([sys.executable, "-m", "swinssl.cli", "study", "--help"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    for command in ("data-efficiency", "views", "modality"):
        assert command in result.stdout


def test_predict_rejects_unknown_views_naming_the_registry_choices(tmp_path):
    from swinssl.methods import view_choices

    result = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"),
                                 "--views", "bogus"], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "--views" in result.output and "'bogus'" in result.output
    assert all(f"'{choice}'" in result.output for choice in view_choices())


def test_predict_rejects_unknown_format_naming_the_choices(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"),
                                 "--format", "png"], env=WIDE)
    assert result.exit_code == 2, result.output
    assert "--format" in result.output and "'nifti'" in result.output and "'same'" in result.output


def test_predict_help_lists_choices(tmp_path):
    result = runner.invoke(app, ["predict", "--help"], env=WIDE)
    assert result.exit_code == 0
    # --views: the registry's choices, checked by predict itself (see the test above), not listed by hand
    assert "an unknown choice is refused with the registered ones" in _flat(result.output)
    assert "<nifti|same>" in result.output and "<auto|cpu|cuda>" in result.output


def test_predict_passes_plain_strings_to_predict_options(tmp_path, monkeypatch):
    import swinssl.infer

    seen = {}

    def fake_predict(model, inputs, out, options):
        seen["options"] = options
        return []

    monkeypatch.setattr(swinssl.infer, "predict", fake_predict)
    result = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"),
                                 "--views", "swap_xy", "--format", "same", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert (options.views, options.output_format, options.device) == ("swap_xy", "same", "cpu")
    assert all(type(v) is str for v in (options.views, options.output_format, options.device))


def test_predict_ensemble_option_passes_every_model_and_is_explained(tmp_path, monkeypatch):
    from pathlib import Path

    import swinssl.infer

    seen = {}

    def fake_predict(model, inputs, out, options):
        seen["models"] = model
        return []

    monkeypatch.setattr(swinssl.infer, "predict", fake_predict)
    result = runner.invoke(app, ["predict", "cv", str(tmp_path), "-o", str(tmp_path / "out"), "--ensemble", "b.pt",
                                 "--ensemble", "c"])
    assert result.exit_code == 0, result.output
    assert seen["models"] == [Path("cv"), Path("b.pt"), Path("c")]
    helped = _flat(runner.invoke(app, ["predict", "--help"], env=WIDE).output)
    assert "--ensemble" in helped and "softmax probabilities are averaged" in helped
    assert "cross-validation folder" in helped
    assert "finetune.folds=5 finetune.fold=all" in _flat(runner.invoke(app, ["finetune", "--help"], env=WIDE).output)


def test_study_preset_is_a_string_the_study_checks(tmp_path, monkeypatch):
    import swinssl.workflows.study

    seen = {}

    def fake_study(out, preset):
        seen["preset"] = preset
        report = tmp_path / "report.md"
        report.write_text("report")
        return report

    monkeypatch.setattr(swinssl.workflows.study, "run_modality_study", fake_study)
    result = runner.invoke(app, ["study", "modality", "-o", str(tmp_path), "--preset", "full"])
    assert result.exit_code == 0, result.output
    assert seen["preset"] == "full" and type(seen["preset"]) is str
    monkeypatch.undo()  # the study itself refuses the name, before it writes anything
    bad = runner.invoke(app, ["study", "modality", "-o", str(tmp_path / "bad"), "--preset", "huge"], env=WIDE)
    assert not (tmp_path / "bad").exists()
    assert bad.exit_code == 2 and all(f"'{p}'" in bad.output for p in swinssl.workflows.study.PRESETS)


def test_data_efficiency_protocol_is_a_string_the_study_checks(tmp_path, monkeypatch):
    import swinssl.workflows.study

    seen = {}

    def fake_study(config, data, out, **kwargs):
        seen.update(kwargs)
        report = tmp_path / "report.md"
        report.write_text("report")
        return report

    monkeypatch.setattr(swinssl.workflows.study, "run_data_efficiency_study", fake_study)
    result = runner.invoke(app, ["study", "data-efficiency", "-o", str(tmp_path), "--protocol", "semi"])
    assert result.exit_code == 0, result.output
    assert seen["protocol"] == "semi" and type(seen["protocol"]) is str
    runner.invoke(app, ["study", "data-efficiency", "-o", str(tmp_path)])
    assert seen["protocol"] == "nested"
    monkeypatch.undo()
    bad = runner.invoke(app, ["study", "data-efficiency", "-o", str(tmp_path / "bad"), "--protocol", "mixed"], env=WIDE)
    assert not (tmp_path / "bad").exists()
    assert bad.exit_code == 2 and all(f"'{p}'" in bad.output for p in swinssl.workflows.study.PROTOCOLS)


@pytest.mark.parametrize("args, text", [
    (["predict", "--help"], "Sliding-window size [default: the training crop]"),
    (["evaluate", "--help"], "[default: the predictions folder]"),
    (["study", "data-efficiency", "--help"], "[default: 0.1 0.3 0.5 1]"),
    (["study", "views", "--help"], "[default: scratch]"),
    (["nnunet", "--help"], "(pip install 'swinssl[nnunet]')"),
])
def test_help_shows_bracketed_default_texts(args, text):
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0
    assert text in _flat(result.output)


@pytest.mark.parametrize("args, text", [
    (["predict", "--help"], "then the preprocessing is inverted (foreground crop, resampling, reorientation), so"),
    (["pretrain", "--help"], "contrastive), swinmm (masked multi-view reconstruction"),
    (["finetune", "--help"], "adds pseudo-labelled unlabelled volumes. A network with SwinFUSE's domain-invariance module"),
])
def test_help_paragraphs_are_not_broken_mid_sentence(args, text):
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0
    assert any(text in line for line in result.output.splitlines())  # on one line at 200 columns


def test_phantom_short_out_flag(tmp_path):
    out = tmp_path / "phantom"
    result = runner.invoke(app, ["phantom", "-o", str(out), "--cases", "2", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert (out / "dataset.json").is_file() and (out / "dataset_mri.json").is_file()


def test_top_level_help_does_not_import_torch():
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from swinssl.cli import app\n"
            "for args in (['--help'], ['phantom', '--help'], ['data', 'check', '--help'], ['study', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'swinssl.methods', 'swinssl.workflows.study') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
