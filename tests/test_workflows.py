"""The workflows' shared pieces: a function in a fresh process, and when the estimate runs before a run."""

from __future__ import annotations

import sys

import pytest

from swinssl.config import load_config
from swinssl.errors import DataError
from swinssl.workflows import estimate as est
from swinssl.workflows.fresh import FreshProcess, FreshProcessFailed, run_fresh

HERE = "tests_fresh_targets"  # a module the fresh process imports from tests/ (on its PYTHONPATH below)


@pytest.fixture()
def targets(tmp_path, monkeypatch):
    (tmp_path / f"{HERE}.py").write_text(
        "import os, sys\n"
        "from swinssl.errors import DataError\n"
        "def echo(payload):\n"
        "    print('said on stdout, which carries only the result')\n"
        "    return {'got': payload, 'threads': __import__('torch').get_num_threads()}\n"
        "def refuse(payload):\n"
        "    raise DataError(payload['file'] + ': not a volume')\n"
        "def crash(payload):\n"
        "    raise RuntimeError('something unexpected')\n"
        "def killed(payload):\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def test_a_fresh_process_returns_the_functions_result_with_its_threads(targets):
    assert run_fresh(f"{HERE}:echo", {"a": [1, 2]}, threads=1) == {"got": {"a": [1, 2]}, "threads": 1}
    job = FreshProcess(f"{HERE}:echo", {}, threads=2)
    assert job.result()["threads"] == 2 and job.done()


def test_a_fresh_process_reports_each_failure_in_one_line(targets):
    with pytest.raises(FreshProcessFailed, match="x.nii: not a volume") as err:
        run_fresh(f"{HERE}:refuse", {"file": "x.nii"})
    assert err.value.exit_code == DataError.exit_code and not err.value.out_of_memory  # the function's own code
    with pytest.raises(FreshProcessFailed, match=r"failed \(exit code 1\): RuntimeError: something unexpected") as err:
        run_fresh(f"{HERE}:crash", {})
    assert "Traceback" in err.value.worker_traceback and "def crash" not in str(err.value)  # for --debug
    with pytest.raises(FreshProcessFailed, match=r"was killed \(SIGKILL\)") as err:
        run_fresh(f"{HERE}:killed", {})
    assert err.value.out_of_memory


def test_the_estimate_at_start_is_skipped_where_it_cannot_help(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(est, "estimate", lambda *a, **k: asked.append(a) or None)
    cfg = load_config("pretrain/swin_unetr_tiny", [f"data={tmp_path}", "train.accelerator=cpu"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun process: every process would probe
    assert est.estimate_at_start("pretrain", cfg, say=lambda s: None) is None
    monkeypatch.delenv("WORLD_SIZE")
    assert est.estimate_at_start("pretrain", load_config("pretrain/swin_unetr_tiny"), say=lambda s: None) is None
    assert est.estimate_at_start("pretrain", None, resume=tmp_path, say=lambda s: None) is None  # no config there
    mps = load_config("pretrain/swin_unetr_tiny", [f"data={tmp_path}", "train.accelerator=mps"])
    assert est.estimate_at_start("pretrain", mps, say=lambda s: None) is None
    assert asked == []
    said = []
    est.estimate_at_start("pretrain", cfg, say=said.append)
    assert len(asked) == 1 and said == ["estimate: measuring 3 steps in a separate process (--no-estimate skips this)"]


def test_export_picks_the_format_by_the_files_ending(tmp_path, monkeypatch):
    from swinssl.errors import ConfigError
    from swinssl.infer import export as export_module

    calls = []
    monkeypatch.setattr(export_module, "export_weights", lambda source, out: calls.append(("weights", out)) or out)
    monkeypatch.setattr(export_module, "export_predictor", lambda s, out, views: calls.append((views, out)) or out)
    export_module.export("run", tmp_path / "w.safetensors")
    export_module.export("run", tmp_path / "p.onnx", "fused")
    export_module.export("run", tmp_path / "p.PT2")
    assert [c[0] for c in calls] == ["weights", "fused", "auto"]
    with pytest.raises(ConfigError, match="--views applies to .onnx and .pt2"):
        export_module.export("run", tmp_path / "w.safetensors", "fused")
    with pytest.raises(ConfigError, match="model.bin: the name's ending picks the format"):
        export_module.export("run", tmp_path / "model.bin")
    assert len(calls) == 3


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
