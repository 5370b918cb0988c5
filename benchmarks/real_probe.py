"""The probe curve on real volumes: does pre-training on the CT/MRI volumes of ../shared/data move a
frozen-encoder probe of MRI brain tissue above a random encoder's?

    python benchmarks/real_probe.py                    # 300 steps, probe every 25 (about 15 min on 2 cores)
    python benchmarks/real_probe.py --steps 100 --probe-every 20 --out runs/real_probe

Pre-training (Swin UNETR SSL, the tiny network with one block per stage, 64x32x32 crops at 2 mm):
the real images of ../shared/data except the probe's volume (head CT template, lung CT, T1c brain
MRI, MNI152 T1; the MNI152 grey/white-matter probability maps are not images and stay out).
Probe: the ITK T1 brain MRI with its 7-class preliminary tissue segmentation, the only
multi-class labelled volume there. One labelled volume cannot be split into cases, so it is cut
into its four quadrants (left/right x lower/upper slabs, each with its own affine): three train
the probe head, one is held out (train.val_fraction 0.25). The probe and its random baseline are
the ones ``train.probe_data`` runs (engine.validate.ProbeTask). Writes real_probe.{json,txt,png} to --results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRETRAIN_IMAGES = {"ct": ["head_ct_template_1mm.nii.gz", "lung1_image.nrrd"],
                   "mri": ["brain1_t1c_image.nrrd", "mni152_t1.nii.gz"]}


def quadrant_dataset(data: Path, out: Path) -> Path:
    """``out/dataset.json``: the four quadrants of the ITK T1 volume and its tissue labels."""
    image, label = nib.load(data / "mri" / "itk_t1.nii.gz"), nib.load(data / "mri" / "itk_t1_tissue_seg.nii.gz")
    nx, _, nz = image.shape
    entries = []
    for name, (xs, zs) in {"q0": (slice(0, nx // 2), slice(0, nz // 2)), "q1": (slice(nx // 2, nx), slice(0, nz // 2)),
                           "q2": (slice(0, nx // 2), slice(nz // 2, nz)),
                           "q3": (slice(nx // 2, nx), slice(nz // 2, nz))}.items():
        for kind, volume in (("images", image), ("labels", label)):
            (out / kind).mkdir(parents=True, exist_ok=True)
            nib.save(volume.slicer[xs, :, zs], out / kind / f"itk_t1_{name}.nii.gz")  # slicer keeps the affine right
        entries.append({"image": f"./images/itk_t1_{name}.nii.gz", "label": f"./labels/itk_t1_{name}.nii.gz"})
    meta = {"name": "itk-t1-quadrants", "modality": {"0": "MRI"}, "training": entries, "test": [],
            "labels": {str(k): f"tissue_{k}" if k else "background" for k in range(7)}}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / "dataset.json"


def pretrain_folder(data: Path, out: Path) -> Path:
    for modality, names in PRETRAIN_IMAGES.items():
        (out / modality).mkdir(parents=True, exist_ok=True)
        for name in names:
            link = out / modality / name
            if not link.exists():
                link.symlink_to(data / modality / name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probe-every", type=int, default=25)
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/real_probe"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if not (args.data / "mri" / "itk_t1_tissue_seg.nii.gz").is_file():
        print(f"{args.data}: the real sample volumes are not there (see ../shared/data/README.md)", file=sys.stderr)
        return 2

    from swinssl.checkpoint import read_head
    from swinssl.config import load_config
    from swinssl.engine.pretrain import pretrain
    from swinssl.plots import save_probe_curve
    from swinssl.runs import RunDir, probe_curve, read_metrics

    probe_data = quadrant_dataset(args.data, args.out / "probe_data")
    volumes = pretrain_folder(args.data, args.out / "pretrain_data")
    cfg = load_config(["pretrain/swin_unetr_tiny", "demo/pretrain"], [
        f"data={volumes}", f"train.out={args.out}", "train.name=pretrain", f"seed={args.seed}",
        "preprocess.spacing=[2.0,2.0,2.0]", f"train.steps={args.steps}", "train.warmup_steps=20",
        f"train.probe_data={probe_data}", f"train.probe_every={args.probe_every}",
        f"train.probe_steps={args.probe_steps}", "train.val_fraction=0.25", "train.val_every=50",
        "train.checkpoint_every=50", "train.preview_every=100", "train.log_every=10"])
    run = pretrain(cfg)
    rows = read_metrics(run)
    probe, random = probe_curve(rows)
    cost = sum(r["value"] for r in rows if r["name"] == "probe_s")
    wall = read_head(RunDir(run).last).wall_s
    args.results.mkdir(parents=True, exist_ok=True)
    record = {"steps": args.steps, "probe_every": args.probe_every, "probe_steps": args.probe_steps,
              "seed": args.seed, "probe_dice": probe, "probe_dice_random": random,
              "wall_s": wall, "probe_s": cost, "run": str(run)}
    (args.results / "real_probe.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["step  probe mean Dice  gain over random",
             *(f"{s:4d}  {v:15.3f}  {v - random:+16.3f}" for s, v in sorted(probe.items())),
             f"random encoder: {random:.3f}",
             f"wall {wall:.0f} s, of which the probe {cost:.0f} s ({100 * cost / wall:.1f}%)"]
    (args.results / "real_probe.txt").write_text("\n".join(lines) + "\n")
    save_probe_curve(args.results / "real_probe.png", probe, random,
                     title=f"ITK T1 tissue probe, seed {args.seed}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
