"""How close ``swinssl estimate`` comes to the run it predicts: predicted vs measured peak memory
and seconds per optimiser step, for the pre-training and fine-tuning presets, on real volumes.

    python benchmarks/estimate_accuracy.py                         # every config, real volumes, CPU
    python benchmarks/estimate_accuracy.py --configs tiny_finetune base_finetune_ct --merge
    python benchmarks/estimate_accuracy.py --data phantoms --out benchmarks/results/estimate_cpu2

Data (``--data``): ``real`` (default) builds four small datasets in a temporary folder from the
real volumes of ``/work/shared/data`` (``--shared``; see its README), linking the files, never
changing them:

- ``nrrd2``: the two NRRD volumes with labels, the post-contrast T1 brain MRI (256x256x25)
  training and the chest CT (512x512x48) validating: the case of issue 34, where a validation
  volume much larger than the training crops made the run's peak;
- ``ct``: the head CT template (202x202x179, a label of its brightest voxels, written here)
  training, the chest CT with its tumour mask validating;
- ``mri``: the brain MRI and the ITK T1 (7 tissue classes) training, the MNI152 T1 template
  (197x233x189, grey/white matter as argmax of its probability maps, written here) validating;
- ``unlabelled``: all five images (CT and MRI, labels not read) for pre-training.

``--data phantoms`` trains every config on 6 synthetic phantoms of 96^3, ``--data PATH`` on PATH.

For each config, one after the other (never two at once, so neither slows the other; take
``flock /tmp/cpu.lock`` around the command on a shared machine):

1. the estimate (``swinssl.workflows.estimate.estimate``): the real stage for 3 optimiser steps in
   a separate process, then once each what the run does after its last step (the validation of the
   largest validation volume, the preview, a checkpoint save), each phase's peak on its own;
2. a real 3-step run: ``swinssl pretrain`` / ``finetune --no-estimate`` with the preset,
   ``train.steps=3`` and ``train.log_every=1`` (so each step's ``step_s`` is logged), everything
   else as the preset says (its validation of every validation volume, preview and checkpoints
   at the last step included), in a subprocess of its own: peak memory is that process's
   ``ru_maxrss`` from ``os.wait4`` (its largest finished child's if larger, as the probe counts
   it); step time the median ``step_s`` of steps 2 and 3 in its metrics.csv, and the median
   ``cpu_s`` (the process's CPU seconds in the step, all threads), which other processes on the
   same cores disturb far less than wall time. On CUDA the run's own peak is not readable from
   outside, so only CPU is compared.

Both start from an empty preprocessing cache of their own (the first run of a new corpus), so
neither finds the other's preprocessed volumes. ``before`` is the training phase of the
estimate alone: what ``swinssl estimate`` reported before it measured validation and saving
(its probe stopped after the training steps).

With ``--fit`` the tiny configs are also estimated with a memory budget (a second probe at one
crop, the line ``training peak = base + crops x per_crop``) and a real run at more crops than
either probe (``--fit-batch`` volumes per step) checks the line's extrapolation.

``--steps N`` trains N steps on both sides (estimate probe and real run; at least 2) where 3
would take too long. Writes ``--out``.txt (the table) and ``--out``.json (every number);
``--merge`` keeps the rows of other configs already in ``--out``.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30
CONFIGS = {  # name: (stage, preset, dataset of --data real)
    "tiny_pretrain": ("pretrain", "pretrain/swin_unetr_tiny", "unlabelled"),
    "tiny_finetune": ("finetune", "finetune/tiny", "nrrd2"),
    "tiny_finetune_mri": ("finetune", "finetune/tiny", "mri"),
    "base_finetune_ct": ("finetune", "finetune/ct", "ct"),
    "base_finetune_mri": ("finetune", "finetune/mri", "mri"),
    "base_pretrain": ("pretrain", "pretrain/swin_unetr", "unlabelled"),
}
BAND = (0.8, 1.25)  # estimate / real peak within this band (issue 34)
TOLERANCE = 0.25  # step and CPU time: within 25%


# --- the data ------------------------------------------------------------------------------------------


def _write_label(image: Path, out: Path, make) -> Path:
    """A label NIfTI on ``image``'s grid: ``make(voxels)`` as uint8 (written once, in the scratch folder)."""
    import nibabel as nib
    import numpy as np

    source = nib.load(str(image))
    label = make(np.asarray(source.dataobj)).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, source.affine), str(out))
    return out


def real_datasets(shared: Path, scratch: Path) -> dict[str, str]:
    """The datasets of ``--data real`` (module docstring), written under ``scratch``: name -> path."""
    for name in ("ct/lung1_image.nrrd", "ct/head_ct_template_1mm.nii.gz", "mri/brain1_t1c_image.nrrd",
                 "mri/mni152_t1.nii.gz", "mri/itk_t1.nii.gz"):
        if not (shared / name).is_file():
            raise SystemExit(f"{shared / name}: missing; --shared names the folder of the real volumes")
    scratch.mkdir(parents=True, exist_ok=True)
    head_label = _write_label(shared / "ct/head_ct_template_1mm.nii.gz", scratch / "head_ct_bright_label.nii.gz",
                              lambda v: v > 50)  # about the brightest 1%: bone
    mni_label = _write_label(shared / "mri/mni152_t1.nii.gz", scratch / "mni152_tissue_label.nii.gz",
                             lambda _: _mni_tissue(shared))
    brain = {"image": str(shared / "mri/brain1_t1c_image.nrrd"), "label": str(shared / "mri/brain1_t1c_label.nrrd"),
             "modality": "MRI"}
    lung = {"image": str(shared / "ct/lung1_image.nrrd"), "label": str(shared / "ct/lung1_label.nrrd"), "modality": "CT"}
    sets = {
        "nrrd2": {"labels": {"0": "background", "1": "tumour"}, "training": [brain], "validation": [lung]},
        "ct": {"labels": {"0": "background", "1": "target"}, "modality": {"0": "CT"},
               "training": [{"image": str(shared / "ct/head_ct_template_1mm.nii.gz"), "label": str(head_label)}],
               "validation": [lung]},
        "mri": {"labels": {str(i): f"class_{i}" for i in range(7)}, "modality": {"0": "MRI"},
                "training": [brain, {"image": str(shared / "mri/itk_t1.nii.gz"),
                                     "label": str(shared / "mri/itk_t1_tissue_seg.nii.gz")}],
                "validation": [{"image": str(shared / "mri/mni152_t1.nii.gz"), "label": str(mni_label)}]},
    }
    paths = {}
    for name, content in sets.items():
        folder = scratch / name
        folder.mkdir(exist_ok=True)
        (folder / "dataset.json").write_text(json.dumps({"name": name, **content}, indent=1))
        paths[name] = str(folder / "dataset.json")
    unlabelled = scratch / "unlabelled"
    for name in ("ct/lung1_image.nrrd", "ct/head_ct_template_1mm.nii.gz", "mri/brain1_t1c_image.nrrd",
                 "mri/mni152_t1.nii.gz", "mri/itk_t1.nii.gz"):
        link = unlabelled / name  # ct/ and mri/ folders: the modality from the folder's name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(shared / name)
    paths["unlabelled"] = str(unlabelled)
    return paths


def _mni_tissue(shared: Path):
    """Background 0, grey matter 1, white matter 2: the argmax of the MNI152 probability maps (0..255)."""
    import nibabel as nib
    import numpy as np

    gm, wm = (np.asarray(nib.load(str(shared / f"mri/mni152_{m}_prob.nii.gz")).dataobj).astype(int) for m in ("gm", "wm"))
    return np.argmax(np.stack([255 - np.minimum(255, gm + wm), gm, wm]), axis=0)


# --- one config --------------------------------------------------------------------------------------------


def real_run(stage: str, preset: str, overrides: list[str], out: Path, device: str, steps: int) -> dict:
    """A real run of the CLI in its own process: peak resident bytes and median step_s after the first."""
    from swinssl.runs import read_metrics

    accelerator = "cpu" if device == "cpu" else "cuda"
    command = [sys.executable, "-m", "swinssl.cli", stage, "--no-estimate", "--config", preset, *overrides,
               f"train.out={out}", "train.name=real", f"train.steps={steps}", "train.log_every=1", "train.devices=1",
               f"train.accelerator={accelerator}"]
    began = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {out.parent / f'{out.name}.log'}")
    rows = sorted(read_metrics(out / "real"), key=lambda r: r["step"])
    times = [r["value"] for r in rows if r["name"] == "step_s"]
    cpu = [r["value"] for r in rows if r["name"] == "cpu_s"]
    return {"peak": usage.ru_maxrss * 1024, "step_s": statistics.median(times[1:]), "times": times,
            "cpu_s": statistics.median(cpu[1:]), "cpu_times": cpu, "wall_s": time.perf_counter() - began,
            "load": os.getloadavg(), "command": command}


def measure(name: str, data: str, device: str, scratch: Path, fit: bool, fit_batch: int, steps: int) -> dict:
    from swinssl.config import load_config
    from swinssl.workflows.estimate import estimate

    stage, preset, _ = CONFIGS[name]
    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    overrides = [f"data={data}"]
    # Each side its own empty cache: both preprocess the volumes they visit, as a first run does.
    cfg = load_config(preset, [*overrides, f"train.out={folder}", f"data.cache={folder / 'cache_estimate'}"])
    began, load = time.perf_counter(), os.getloadavg()
    predicted = estimate(cfg, stage, device, fit=fit, steps=steps)
    estimate_s = time.perf_counter() - began
    print(f"  {name}: estimate {predicted.summary()} in {estimate_s:.0f} s", file=sys.stderr, flush=True)
    measured = real_run(stage, preset, [*overrides, f"data.cache={folder / 'cache_real'}"], folder / "real_out", device,
                        steps)
    print(f"  {name}: real run peak {measured['peak'] / GIB:.2f} GiB, {measured['step_s']:.3g} s/step "
          f"({measured['cpu_s']:.3g} CPU s) in {measured['wall_s']:.0f} s; estimate {predicted.cpu_s:.3g} CPU s/step",
          file=sys.stderr, flush=True)
    training = predicted.phases.get("training", predicted.peak)
    row = {"stage": stage, "preset": preset, "data": data, "steps": steps, "crops": predicted.crops,
           "predicted": predicted.to_dict(), "estimate_s": estimate_s, "estimate_load": load, "measured": measured,
           "before_ratio": training / measured["peak"], "peak_ratio": predicted.peak / measured["peak"],
           "step_ratio": predicted.seconds / measured["step_s"], "cpu_ratio": predicted.cpu_s / measured["cpu_s"]}
    if fit and predicted.fit is not None:
        batch = fit_batch
        crops = batch * cfg.preprocess.num_crops
        at = real_run(stage, preset, [*overrides, f"train.batch_size={batch}", f"data.cache={folder / 'cache_real'}"],
                      folder / f"real_b{batch}", device, steps)
        row["fit_check"] = {"batch_size": batch, "crops": crops, "predicted_peak": predicted.fit.peak(crops),
                            "measured": at, "peak_ratio": predicted.fit.peak(crops) / at["peak"]}
        print(f"  {name}: fit at batch {batch}: predicted {predicted.fit.peak(crops) / GIB:.2f} GiB (training), "
              f"measured {at['peak'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    return row


# --- the table ------------------------------------------------------------------------------------------------


def within(ratio: float) -> bool:
    return BAND[0] <= ratio <= BAND[1]


def table(rows: dict, header: str) -> list[str]:
    lines = [header, "",
             f"{'config':<18} {'preset':<25} {'data':<16} {'steps':>5} {'peak GiB before':>15} {'after':>6} "
             f"{'real':>6} {'before':>7} {'after':>6}  {'in 0.8-1.25':<11} {'s/step pred':>11} {'real':>6} "
             f"{'ratio':>6} {'CPU s ratio':>11}  phases of the estimate (GiB); validated"]
    lines.append("-" * len(lines[-1]))
    for name, r in rows.items():
        p, m = r["predicted"], r["measured"]
        phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.get("phases", {}).items())
        verdict = f"{'no' if not within(r['before_ratio']) else 'yes'} -> {'yes' if within(r['peak_ratio']) else 'NO'}"
        data = r["data"] if len(r["data"]) <= 16 else "..." + r["data"][-13:]
        lines.append(f"{name:<18} {r['preset']:<25} {data:<16} {r.get('steps', 3):>5} "
                     f"{p.get('phases', {}).get('training', p['peak']) / GIB:>15.2f} {p['peak'] / GIB:>6.2f} "
                     f"{m['peak'] / GIB:>6.2f} {r['before_ratio']:>7.2f} {r['peak_ratio']:>6.2f}  {verdict:<11} "
                     f"{p['seconds']:>11.3g} {m['step_s']:>6.3g} {r['step_ratio']:>6.2f} {r['cpu_ratio']:>11.2f}  "
                     f"{phases}; {p.get('validated') or '-'}")
    checks = {n: r["fit_check"] for n, r in rows.items() if "fit_check" in r}
    if checks:
        lines += ["", "memory fit of training (probes at the config's crops and at one crop) extrapolated to a larger "
                  "batch:", f"{'config':<18} {'batch':>5} {'crops':>5} {'peak GiB pred':>13} {'real':>6} {'ratio':>6}"]
        for name, c in checks.items():
            lines.append(f"{name:<18} {c['batch_size']:>5} {c['crops']:>5} {c['predicted_peak'] / GIB:>13.2f} "
                         f"{c['measured']['peak'] / GIB:>6.2f} {c['peak_ratio']:>6.2f}")
    lines += ["", "after: swinssl estimate (the real stage in a separate process: the training steps, then its "
              "validation of the largest validation volume, preview and one checkpoint save, each phase's peak on "
              "its own; the estimate is the largest); before: the training phase alone, what the estimate reported "
              "when its probe stopped after the training steps; real: a real run of the CLI in its own process "
              "(validation of every validation volume, preview, best.pt and last.pt at its last step, as the preset "
              "says), both from an empty cache; peak = the process's peak resident set size (CPU); ratio = "
              "estimate / real, accepted within 0.8-1.25; s/step = median step_s (wall) of the steps after the "
              "first; CPU s = median cpu_s (the process's CPU seconds in the step, all threads: much less sensitive "
              "to other processes on the same cores than wall time)"]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--data", default="real", help="real (default), phantoms, or a dataset.json / folder "
                        "(labelled for fine-tuning) for every config")
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data",
                        help="the real volumes (README there)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="training steps on both sides (at least 2)")
    parser.add_argument("--fit", action="store_true", help="tiny configs: also check the memory fit at --fit-batch")
    parser.add_argument("--fit-batch", type=int, default=4, help="volumes per step of the fit check")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "estimate_accuracy_real",
                        help="writes OUT.txt and OUT.json")
    parser.add_argument("--merge", action="store_true", help="keep the other configs' rows of OUT.json")
    args = parser.parse_args(argv)

    import torch

    load = os.getloadavg()
    rows, runs = {}, []
    if args.merge and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        rows, runs = previous.get("rows", {}), previous.get("runs", [])
    with tempfile.TemporaryDirectory(prefix="swinssl-estimate-accuracy-") as scratch:
        scratch = Path(scratch)
        if args.data == "real":
            datasets = real_datasets(args.shared, scratch / "data")
        elif args.data == "phantoms":
            from swinssl.data.phantom import write_phantom_dataset

            phantoms = str(write_phantom_dataset(scratch / "data", cases=6, size=96, seed=0))
            datasets = {key: phantoms for key in ("nrrd2", "ct", "mri", "unlabelled")}
        else:
            datasets = {key: args.data for key in ("nrrd2", "ct", "mri", "unlabelled")}
        for name in args.configs:
            fit = args.fit and name.startswith("tiny")
            rows[name] = measure(name, datasets[CONFIGS[name][2]], args.device, scratch, fit, args.fit_batch,
                                 args.steps)
            rows[name]["data"] = f"{args.data}:{CONFIGS[name][2]}" if args.data in ("real", "phantoms") else args.data
    after = os.getloadavg()
    command = f"python benchmarks/estimate_accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    runs.append({"when": time.strftime('%Y-%m-%d %H:%M:%S %Z'), "command": command, "configs": args.configs,
                 "load_before": load, "load_after": after})
    header = "\n".join(
        [f"{run['when']}: {run['command']} (load average {run['load_before'][0]:.1f} before, "
         f"{run['load_after'][0]:.1f} after)" for run in runs]
        + [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs (shared with other "
           f"processes), device {args.device}, {platform.machine()}; data: {args.data}"])
    lines = table(rows, header)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {args.out.with_suffix('.txt')} and .json")


if __name__ == "__main__":
    main()
