"""The benchmark study on this machine: phantoms (dev) and real brain MRI (test), tiny networks,
nnU-Net on a short CPU schedule (``swinssl study benchmark --preset tiny``).

    python benchmarks/benchmark_study.py                     # runs/benchmark_cpu2 -> benchmarks/results/benchmark_cpu2/
    python benchmarks/benchmark_study.py --shared ../shared/data --out runs/benchmark_cpu2

Datasets:

- ``phantoms`` (dev): 12 synthetic CT phantoms of 64^3 (3 test cases), as the preset writes them;
- ``brain_mri`` (test): the one labelled real brain MRI of ``--shared`` with a whole-brain tissue map,
  the MNI152 2009a T1 template (197x233x189, 1 mm), averaged over 2x2x2 blocks to 2 mm (so that
  nnU-Net trains on it in minutes on a CPU) and cut into its 8 octants (each a case of 49x58x47
  voxels; 2 are test cases), labelled grey and white matter where their block-averaged probability
  maps (``mni152_gm_prob``, ``mni152_wm_prob``, 0..255) exceed both the other and half of 255. Octants
  of one template are no independent subjects: the test dataset stands for "data the choices never
  saw", not for a population.

One pre-training (Swin UNETR SSL, ``pretrain/swin_unetr_tiny`` under ``study/efficiency_tiny_pretrain``)
on the phantoms' training images is the pre-trained arm (for the brain MRI an encoder pre-trained on
other data, as a user starting from a public checkpoint would have); ``scratch`` and ``nnunet`` are
the others. ``--fraction`` (repeat) narrows the preset's label fractions.
The study's report files (not its runs and checkpoints) are copied to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPORT_FILES = ("report.md", "results.json", "cases.csv")


def brain_octants(shared: Path, out: Path) -> Path:
    """The MNI152 T1 cut into 8 labelled octants as a dataset.json (6 training, 2 test cases)."""
    import nibabel as nib
    import numpy as np

    data = out / "dataset.json"
    if data.is_file():
        return data
    t1 = nib.load(shared / "mri" / "mni152_t1.nii.gz")

    def blocks(path: Path) -> np.ndarray:  # the mean of each 2x2x2 block (odd edges dropped)
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        x, y, z = (s // 2 * 2 for s in volume.shape)
        return volume[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))

    image = blocks(shared / "mri" / "mni152_t1.nii.gz")
    gm, wm = blocks(shared / "mri" / "mni152_gm_prob.nii.gz"), blocks(shared / "mri" / "mni152_wm_prob.nii.gz")
    label = np.where((gm > wm) & (gm > 127.5), 1, np.where((wm >= gm) & (wm > 127.5), 2, 0)).astype(np.uint8)
    # A 2 mm voxel's centre is the centre of its 1 mm block: half a voxel from the first 1 mm centre.
    two_mm = t1.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    two_mm[:3, 3] = (t1.affine @ np.array([0.5, 0.5, 0.5, 1.0]))[:3]
    half = [s // 2 for s in image.shape]
    entries = []
    for i, (x, y, z) in enumerate(np.ndindex(2, 2, 2)):
        box = tuple(slice(h * k, h * k + h) for h, k in zip(half, (x, y, z)))
        start = np.array([b.start for b in box] + [1.0])
        affine = two_mm.copy()
        affine[:3, 3] = (two_mm @ start)[:3]  # the octant keeps its place in the template's space
        split = "test" if i in (3, 6) else "training"
        folder = "Ts" if split == "test" else "Tr"
        name = f"mni152_octant{i}"
        (out / f"images{folder}").mkdir(parents=True, exist_ok=True)
        (out / f"labels{folder}").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image[box], affine), str(out / f"images{folder}" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label[box], affine), str(out / f"labels{folder}" / f"{name}.nii.gz"))
        entries.append((split, {"image": f"./images{folder}/{name}.nii.gz", "label": f"./labels{folder}/{name}.nii.gz"}))
    dataset = {"name": "mni152-octants", "description": "MNI152 2009a T1 template cut into 8 octants; grey and "
               "white matter from its probability maps (nilearn, BSD-3)", "tensorImageSize": "3D",
               "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "grey matter", "2": "white matter"},
               "training": [e for s, e in entries if s == "training"], "test": [e for s, e in entries if s == "test"]}
    dataset["numTraining"], dataset["numTest"] = len(dataset["training"]), len(dataset["test"])
    data.write_text(json.dumps(dataset, indent=1))
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark_cpu2"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "benchmark_cpu2")
    parser.add_argument("--fraction", type=float, action="append", help="label fraction (repeat; default: the preset's)")
    args = parser.parse_args(argv)
    if not (args.shared / "mri" / "mni152_t1.nii.gz").is_file():
        raise SystemExit(f"{args.shared}: no mri/mni152_t1.nii.gz (the real volumes, see ../shared/data/README.md)")

    from swinssl.config import load_config
    from swinssl.data.phantom import write_phantom_dataset
    from swinssl.engine.pretrain import pretrain
    from swinssl.workflows.benchmark import BENCHMARK, run_benchmark_study
    from swinssl.workflows.study import _train

    started = time.time()
    p = BENCHMARK["tiny"]
    phantoms = args.out / "phantoms" / "dataset.json"
    if not phantoms.is_file():
        write_phantom_dataset(phantoms.parent, cases=p["cases"], size=p["size"], seed=0)
    brain = brain_octants(args.shared, args.out / "brain_mri")
    cfg = load_config(["pretrain/swin_unetr_tiny", "study/efficiency_tiny_pretrain"],
                      [f"data={phantoms}", f"train.out={args.out}", "train.name=pretrain_swin_unetr"])
    pre_run = _train(pretrain, cfg, progress=True)
    report = run_benchmark_study([f"dev:{phantoms}", f"test:{brain}"], [f"swin_unetr={pre_run}"],
                                 args.out / "study", preset="tiny", fractions=args.fraction)
    args.results.mkdir(parents=True, exist_ok=True)
    study = report.parent
    for path in [*(study / name for name in REPORT_FILES), *study.glob("*.png")]:
        shutil.copyfile(path, args.results / path.name)
    print(report.read_text())
    print(f"{time.time() - started:.0f} s; report files in {args.results}")


if __name__ == "__main__":
    main()
