"""Studies that check the papers' claims on small data, one command each (``swinssl study ...``).

``modality``: the out-of-modality comparison of SwinFUSE (Table 2). Pre-train each method on
the same mixed CT + MRI training volumes, fine-tune from each pre-training (and from scratch)
on CT and, separately, on MRI, then evaluate every model on the held-out test cases of both
modalities. On the paired phantoms the two modalities share one anatomy and one label map,
so "trained on CT, tested on MRI" isolates the modality shift.

Every stage writes its own run directory under ``out``; a finished stage is reused when the
study runs again (so an interrupted study resumes), an unfinished training stage resumes from
its last checkpoint. Sizes are plain data (``PRESETS``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from swinssl.config import load_config
from swinssl.data.discover import find_dataset
from swinssl.data.phantom import write_phantom_dataset
from swinssl.engine.checkpoint import load_checkpoint
from swinssl.engine.finetune import finetune
from swinssl.engine.pretrain import pretrain
from swinssl.errors import ConfigError
from swinssl.infer import predict
from swinssl.metrics import evaluate
from swinssl.utils import atomic_write_text

PRESETS = {
    "tiny": {  # about 20 minutes on 2 CPU cores
        "cases": 8,  # phantoms; 2 are test cases
        "size": 64,
        "methods": {"swin_unetr": "pretrain/swin_unetr_tiny", "swinfuse": "pretrain/swinfuse_tiny"},
        "pretrain": [
            "model.depths=[1,1,1,1]", "preprocess.roi_size=[64,32,32]", "preprocess.spacing=null", "train.steps=60",
            "train.warmup_steps=6", "train.lr=1e-3", "train.val_every=30", "train.preview_every=30",
            "train.checkpoint_every=30", "train.log_every=5",
        ],
        "finetune": [  # overrides of finetune/tiny
            "model.depths=[1,1,1,1]", "preprocess.roi_size=[32,32,32]", "train.steps=160", "train.lr=2e-3",
            "train.val_every=80", "train.checkpoint_every=80", "train.log_every=10",
        ],
    },
}
MODALITIES = {"CT": "dataset.json", "MRI": "dataset_mri.json"}


def run_modality_study(out: str | Path = "runs/study_modality", preset: str = "tiny", progress: bool = True) -> Path:
    """Run (or finish) the out-of-modality study into ``out``; returns its ``report.md``."""
    if preset not in PRESETS:
        raise ConfigError(f"study preset {preset!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    data = out / "data"
    if not (data / MODALITIES["MRI"]).is_file():
        write_phantom_dataset(data, cases=p["cases"], size=p["size"], seed=0)
    inits: dict[str, Path | None] = {"scratch": None}
    for method, config in p["methods"].items():
        # Both modalities' training images (imagesTr), never the test cases (imagesTs).
        cfg = load_config(config, [f"data={data / 'imagesTr'}", f"train.out={out}", f"train.name=pretrain_{method}",
                                   *p["pretrain"]])
        inits[method] = _train(pretrain, cfg, progress)
    rows = []
    for init, pre_run in inits.items():
        for train_mod, dataset in MODALITIES.items():
            extra = [f"finetune.pretrained={pre_run}"] if pre_run else []
            cfg = load_config("finetune/tiny", [f"data={data / dataset}", f"train.out={out}",
                                                f"train.name=finetune_{init}_{train_mod}", *p["finetune"], *extra])
            run = _train(finetune, cfg, progress)
            for test_mod, test_dataset in MODALITIES.items():
                summary = _evaluate(run, data / test_dataset, out / f"predictions_{init}_{train_mod}_on_{test_mod}",
                                    progress)
                rows.append({"init": init, "trained_on": train_mod, "tested_on": test_mod,
                             "dice": summary["mean"]["dice"], "hd95": summary["mean"]["hd95"],
                             "dice_by_class": {c["name"]: c["dice"]["mean"] for c in summary["classes"].values()}})
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    report = out / "report.md"
    atomic_write_text(report, modality_report(rows, p, out))
    return report


def _train(stage, cfg, progress: bool) -> Path:
    """A training stage's run directory: reused when finished, resumed when started, else run."""
    run_dir = Path(cfg.train.out) / cfg.train.name
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        if int(load_checkpoint(last)["step"]) >= cfg.train.steps:
            return run_dir
        return stage(resume=run_dir, progress=progress)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    return stage(cfg, progress=progress)


def _evaluate(run: Path, dataset: Path, pred_dir: Path, progress: bool) -> dict:
    summary_file = pred_dir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    images = [c.images[0] for c in find_dataset(dataset).split("test")]
    predict(run, images, pred_dir, progress=progress)
    return evaluate(pred_dir, dataset, out_dir=pred_dir, split="test")


def modality_report(rows: list[dict], preset: dict, out: Path) -> str:
    inits = list(dict.fromkeys(r["init"] for r in rows))
    lines = [
        "# Out-of-modality study",
        "",
        f"Paired CT/MRI phantoms ({preset['cases']} cases, {preset['size']}^3) in `{out / 'data'}`. Each "
        "pre-training used the same mixed CT + MRI training volumes; each fine-tuning the same cases, steps and "
        "seed; every model is tested on the held-out test cases of both modalities (mean Dice over the foreground "
        "classes, HD95 in mm).",
        "",
        "| init | trained on | tested on CT: Dice | tested on MRI: Dice | tested on CT: HD95 | tested on MRI: HD95 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for init in inits:
        for train_mod in MODALITIES:
            cell = {r["tested_on"]: r for r in rows if r["init"] == init and r["trained_on"] == train_mod}
            lines.append(f"| {init} | {train_mod} | {cell['CT']['dice']:.3f} | {cell['MRI']['dice']:.3f} | "
                         f"{cell['CT']['hd95']:.1f} | {cell['MRI']['hd95']:.1f} |")
    lines += ["", "Out-of-modality mean Dice (CT->MRI, MRI->CT):", ""]
    for init in inits:
        cross = [r["dice"] for r in rows if r["init"] == init and r["trained_on"] != r["tested_on"]]
        lines.append(f"- {init}: {sum(cross) / len(cross):.3f}")
    lines += ["", "Reproduce: `swinssl study modality --out " + str(out) + "`", ""]
    return "\n".join(lines)
