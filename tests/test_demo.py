"""The demo end to end at micro size: its report and results.json say what the runs measured."""

import json

import pytest
import torch
import yaml

from swinssl.workflows.demo import INITS, run_demo
from swinssl.runs import read_metrics

MICRO = {"cases": 6, "size": 32, "test_fraction": 0.34,
         "overrides": ["train.steps=4", "train.warmup_steps=1", "train.val_every=2", "train.probe_every=2",
                       "train.probe_steps=5", "train.checkpoint_every=2", "train.log_every=1",
                       "train.val_fraction=0.25"]}


def test_micro_demo_reports_dice_probe_and_verdict_as_measured(tmp_path):
    report = run_demo(tmp_path / "demo", progress=False, settings=MICRO)
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["kind"] == "demo"  # the report tells a demo from a study by it
    assert set(results["dice"]) == set(INITS)
    for init in INITS:
        summary = json.loads((tmp_path / "demo" / f"predictions_{init}" / "summary.json").read_text())
        expected = {c["name"]: c["dice"]["mean"] for c in summary["classes"].values()}
        assert results["dice"][init] == {**expected, "mean": summary["mean"]["dice"]}
        assert set(expected) == {"liver", "kidney", "spleen", "lesion"}
    rows = read_metrics(tmp_path / "demo" / "pretrain")
    logged = [r["value"] for r in rows if r["name"] == "probe_dice"]
    assert results["probe"] == {"random": next(r["value"] for r in rows if r["name"] == "probe_dice_random"),
                                "pretrained": logged[-1]}
    verdict = results["verdict"]
    assert verdict.split(":")[0] in ("pre-training helps", "pre-training hurts", "no detectable difference")
    assert results["verdict_detail"]["n"] == 2  # the two test cases, paired
    cases = results["case_dice"]
    gains = [cases["pretrained"][c] - cases["scratch"][c] for c in cases["scratch"]]
    assert results["verdict_detail"]["mean"] == pytest.approx(sum(gains) / len(gains))  # pretrained - scratch
    text = report.read_text()
    assert verdict in text and f"{results['probe']['random']:.3f}" in text and "probe_curve.png" in text
    assert (tmp_path / "demo" / "probe_curve.png").is_file()
    page = (tmp_path / "demo" / "report.html").read_text()  # beside report.md, which points to it
    assert "`report.html`" in text and "swinssl demo: demo" in page and verdict in page
    assert page.count('type="application/octet-stream"') == 2 * 4  # 2 test cases: image, label, 2 predictions
    # The two fine-tunings, each from its own start: at once in two processes of half the threads each.
    threads = torch.get_num_threads()
    for init in INITS:
        run = tmp_path / "demo" / f"finetune_{init}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        predicted = json.loads((tmp_path / "demo" / f"predictions_{init}" / "predictions.json").read_text())
        assert predicted["model"] == str(run)  # each arm's test cases predicted by that arm
        assert bool(config["finetune"]["pretrained"]) == (init == "pretrained")
        environment = json.loads((run / "environment.json").read_text())
        assert environment["torch_threads"] == (threads // 2 if threads >= 2 else threads)
        if threads in (2, 3):  # one thread each, so no core for a data worker
            assert config["train"]["num_workers"] == 0
        assert f"| finetune {init} |" in text  # its own seconds in the time table


def test_one_progress_bar_follows_both_arms_through_their_metrics(tmp_path, capsys):
    """The arms run in other processes: the bar reads each one's metrics.csv; a file caught while
    the other process is half way through a row keeps the count read before, and a run that has
    not written one yet counts 0."""
    from types import SimpleNamespace

    from swinssl.workflows.demo import _follow

    header = "step,split,name,value\n"

    def arm(name, text):
        run = tmp_path / name
        if text is not None:
            run.mkdir()
            (run / "metrics.csv").write_text(header + text)
        return SimpleNamespace(train=SimpleNamespace(steps=30, out=str(tmp_path), name=name))

    class Job:  # done at its third poll; at its second, arm b is caught writing a row
        polls = 0

        def done(self):
            self.polls += 1
            if self.polls == 2:
                (tmp_path / "b" / "metrics.csv").write_text(header + "8,train,loss,1.0\n16,train,lo")
            return self.polls > 2

    configs = {"scratch": arm("a", "10,train,loss,1.0\n20,train,loss,0.5\n"),
               "pretrained": arm("b", "8,train,loss,1.0\n"), "third": arm("c", None)}
    _follow(configs, {init: Job() for init in configs})
    assert "28/90" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_the_pretraining_table_shows_losses_not_the_start_up_time(tmp_path):
    from swinssl.workflows.demo import first_last

    (tmp_path / "metrics.csv").write_text("step,split,name,value\n1,train,startup_s,7.9\n1,train,loss,4.0\n"
                                          "2,train,loss,2.0\n1,train,lr,0.001\n")
    assert first_last(tmp_path) == {"loss": (4.0, 2.0)}
