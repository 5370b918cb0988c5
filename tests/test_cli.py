import json
import subprocess
import sys

from typer.testing import CliRunner

import swinssl
from swinssl.cli import app

runner = CliRunner()


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


def test_data_check_rejects_unknown_modality(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--modality", "PET"])
    assert result.exit_code == 2
    assert "--modality must be one of CT, MRI, auto" in result.output


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
