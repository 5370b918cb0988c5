"""nnU-Net's smoke check on a real volume, the way a user meets it: what it costs in time and memory.

    python benchmarks/nnunet_smoke.py                       # brain MRI of ../shared/data/mri, CPU
    python benchmarks/nnunet_smoke.py --image ct.nrrd --label ct_seg.nrrd --channel CT \\
        --json benchmarks/results/nnunet_smoke_cpu2.json --txt benchmarks/results/nnunet_smoke_cpu2.txt

From one image and its label (any format SimpleITK reads; the label is binarised, > 0), it builds
an nnU-Net v2 raw dataset of that one case (``Dataset990_Smoke``: ``imagesTr/case_0000.nii.gz``,
``labelsTr/case.nii.gz``, written by SimpleITK, which nnU-Net reads them with, so the geometry is
the source's), then follows the bridge's smoke test (tests/test_nnunet.py::
test_nnunet_trains_from_a_swinssl_pretraining_and_predicts_in_the_input_geometry) with a real
checkpoint instead of a made-up one:

  pretrain   a 2-step swinssl pre-training on the image (pretrain/swin_unetr_tiny, feature 12,
             depths 1,1,1,1, 64^3 crops at the volume's own spacing)
  install    the shims into nnU-Net's package folder (``swinssl nnunet install``)
  planning   nnU-Net's fingerprint and plans, ``write_swinssl_plans``, nnU-Net's preprocessing of
             the swinssl plans (one process each), timed together
  export     ``export_for_nnunet``: the ``-pretrained_weights`` file
  training   ``run_training(ID, "3d_fullres", "all", TRAINER, "nnUNetPlans_swinssl", ...)`` on the CPU
             (fold ``all``: one case has no validation split), in a spawned child process with
             ``nnUNet_n_proc_DA=0`` (augmentation in-process) and ``nnUNet_compile=0``. Its wall time
             is the child's, imports included (as ``nnUNetv2_train`` pays them); its peak RSS is
             ``ru_maxrss`` of the child (RUSAGE_SELF) and of its own children (RUSAGE_CHILDREN), the
             larger, read in the child: the parent's RUSAGE_CHILDREN also holds the planning's
             worker processes.

Then it prints a markdown table (volume, shape, spacing; patch and batch of nnU-Net's plans, of the
trainer's saved plans.json and of its run (its debug.json); seconds, peak RSS, whether a
``validation`` folder was written, the trainer's ``swinssl: loaded ...`` log line), writes it with
``--txt`` and as JSON with ``--json``, and uninstalls the shims unless they were installed before.
nnU-Net's three folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) are under
``--work``, set before nnunetv2 is imported (it reads them at import); each run starts them afresh.
"""

from __future__ import annotations

import argparse
import ast
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET_NAME = 990, "Dataset990_Smoke"
CONFIGURATION, PLANS_NAME = "3d_fullres", "nnUNetPlans_swinssl"
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=REPO / "../shared/data/mri/brain1_t1c_image.nrrd")
    parser.add_argument("--label", type=Path, default=REPO / "../shared/data/mri/brain1_t1c_label.nrrd")
    parser.add_argument("--channel", default="MRI", help="nnU-Net channel name of the image (MRI, CT, T1, ...)")
    parser.add_argument("--work", type=Path, default=REPO / "runs/bench/nnunet_smoke")
    parser.add_argument("--trainer", default="nnUNetTrainer_SwinUNETR_smoke")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--txt", type=Path, help="write the printed table here")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# The dataset and the pre-training
# --------------------------------------------------------------------------------------------------


def set_nnunet_folders(work: Path) -> dict[str, Path]:
    """nnU-Net's three folders under ``work``, emptied, in the environment (before nnunetv2 is imported)."""
    paths = {name: work / name for name in NNUNET_FOLDERS}
    for name, path in paths.items():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        os.environ[name] = str(path)
    os.environ["nnUNet_def_n_proc"] = "1"  # nnU-Net's default worker count (e.g. its validation export)
    os.environ["nnUNet_compile"] = "0"
    return paths


def write_raw_dataset(raw: Path, image_path: Path, label_path: Path, channel: str) -> dict:
    """The one case as an nnU-Net raw dataset; returns what the table says about the volume."""
    import SimpleITK as sitk

    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    if image.GetSize() != label.GetSize() or \
            max(abs(a - b) for a, b in zip(image.GetSpacing() + image.GetOrigin() + image.GetDirection(),
                                           label.GetSpacing() + label.GetOrigin() + label.GetDirection())) > 1e-4:
        raise SystemExit(f"error: {label_path}: not on the grid of {image_path}")
    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    sitk.WriteImage(image, str(folder / "imagesTr" / "case_0000.nii.gz"))
    sitk.WriteImage(sitk.Cast(label > 0, sitk.sitkUInt8), str(folder / "labelsTr" / "case.nii.gz"))
    dataset = {"channel_names": {"0": channel}, "labels": {"background": 0, "foreground": 1}, "numTraining": 1,
               "file_ending": ".nii.gz", "name": "Smoke"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return {"volume": image_path.name, "shape": list(image.GetSize()),
            "spacing": [round(s, 4) for s in image.GetSpacing()],
            "foreground_voxels": int(sitk.GetArrayViewFromImage(label > 0).sum())}


def pretrain_checkpoint(work: Path, image: Path, modality: str) -> Path:
    """A 2-step swinssl pre-training on the image alone; returns its checkpoint."""
    from swinssl.config import load_config
    from swinssl.engine.pretrain import pretrain
    from swinssl.runs import resolve_checkpoint

    data, out = work / "pretrain_data", work / "pretrain"
    for folder in (data, out):  # a fresh run each time (a run directory is never overwritten)
        shutil.rmtree(folder, ignore_errors=True)
    data.mkdir(parents=True)
    shutil.copy(image, data / "case.nii.gz")
    cfg = load_config("pretrain/swin_unetr_tiny", [
        f"data={data}", f"data.modality={modality}", "train.steps=2", "train.num_workers=0",
        "preprocess.roi_size=64", "preprocess.spacing=null", "preprocess.num_crops=1", "model.depths=[1,1,1,1]",
        "train.val_fraction=0", "train.log_every=1", "train.warmup_steps=1", f"train.out={out}", "train.name=smoke"])
    return resolve_checkpoint(pretrain(cfg, progress=False))


# --------------------------------------------------------------------------------------------------
# nnU-Net: planning and preprocessing, export, training in a child process
# --------------------------------------------------------------------------------------------------


def plan_and_preprocess(preprocessed: Path, checkpoint: Path) -> Path:
    """nnU-Net's fingerprint and plans, the swinssl plans, nnU-Net's preprocessing of them."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess_dataset)

    from swinssl.nnunet.plans import write_swinssl_plans

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    swinssl_plans, said = write_swinssl_plans(preprocessed / DATASET_NAME / "nnUNetPlans.json", checkpoint,
                                              configuration=CONFIGURATION, plans_name=PLANS_NAME)
    for line in said:
        print(f"swinssl nnunet plans: {line}", flush=True)
    preprocess_dataset(DATASET_ID, PLANS_NAME, [CONFIGURATION], [1], show_progress_bar=False)
    return swinssl_plans


def train_child(trainer: str, weights: str, report: str) -> None:
    """The training, in a spawned process; writes its peak RSS and seconds to ``report``."""
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (the planner needs it unset)
    os.environ["nnUNet_compile"] = "0"
    import torch
    from nnunetv2.run.run_training import run_training

    started = time.perf_counter()
    run_training(str(DATASET_ID), CONFIGURATION, "all", trainer, PLANS_NAME, pretrained_weights=weights,
                 device=torch.device("cpu"))
    seconds = time.perf_counter() - started
    maxrss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    Path(report).write_text(json.dumps({"run_training_s": seconds, "maxrss_kib": maxrss,
                                        "threads": torch.get_num_threads()}))


def train(trainer: str, weights: Path, work: Path) -> dict:
    """``train_child`` in a spawned process: its wall seconds (imports included) and what it reported."""
    report = work / "train_child.json"
    report.unlink(missing_ok=True)
    started = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=train_child, args=(trainer, str(weights), str(report)))
    child.start()
    child.join()
    seconds = time.perf_counter() - started
    if child.exitcode != 0 or not report.is_file():
        raise SystemExit(f"error: the training process exited with {child.exitcode} after {seconds:.0f} s")
    return {"train_wall_s": seconds, **json.loads(report.read_text()),
            "parent_rusage_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def trainer_outputs(results: Path, trainer: str) -> dict:
    """What the trainer left: the patch and batch of its saved plans.json (what nnU-Net's prediction
    reads) and of its run (debug.json), a validation folder, the load line."""
    base = results / DATASET_NAME / f"{trainer}__{PLANS_NAME}__{CONFIGURATION}"
    config = json.loads((base / "plans.json").read_text())["configurations"][CONFIGURATION]
    fold = base / "fold_all"
    debug = json.loads((fold / "debug.json").read_text())  # the trainer's attributes, as str()
    used = ast.literal_eval(debug["configuration_manager"])
    lines = [line.strip() for log in sorted(fold.glob("training_log_*.txt")) for line in log.read_text().splitlines()]
    loaded = [line.split(": ", 1)[-1] for line in lines if "swinssl: loaded" in line]
    return {"trainer_patch_size": config["patch_size"], "trainer_batch_size": config["batch_size"],
            "trained_patch_size": used["patch_size"], "trained_batch_size": int(debug["batch_size"]),
            "validation_folder": (fold / "validation").is_dir(), "loaded_line": loaded[-1] if loaded else None,
            "checkpoint_final": (fold / "checkpoint_final.pth").is_file()}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def table(r: dict, header: str) -> str:
    rows = [
        ("volume", r["volume"]),
        ("shape (x, y, z)", " x ".join(map(str, r["shape"]))),
        ("spacing (mm)", " x ".join(f"{s:g}" for s in r["spacing"])),
        ("nnU-Net plans: patch, batch", f"{r['plans_patch_size']}, {r['plans_batch_size']}"),
        ("trainer's saved plans.json: patch, batch", f"{r['trainer_patch_size']}, {r['trainer_batch_size']}"),
        ("trained with (debug.json): patch, batch", f"{r['trained_patch_size']}, {r['trained_batch_size']}"),
        ("pre-training (2 steps, swinssl's imports included), s", f"{r['pretrain_s']:.1f}"),
        ("planning + preprocessing, s", f"{r['plan_preprocess_s']:.1f}"),
        ("export, s", f"{r['export_s']:.1f}"),
        ("training, wall s (child process; run_training alone)",
         f"{r['train_wall_s']:.1f} ({r['run_training_s']:.1f})"),
        ("training, peak RSS GiB", f"{r['maxrss_kib'] / 2**20:.2f}"),
        ("validation folder written", "yes" if r["validation_folder"] else "no"),
        ("trainer log", f"`{r['loaded_line']}`" if r["loaded_line"] else "(no 'swinssl: loaded' line)"),
    ]
    lines = [header, "", "| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows), "",
             f"Trainer: {r['trainer']}. Patch sizes in nnU-Net's axis order (SimpleITK's z, y, x after the plans' "
             "transpose); the saved plans.json is what nnUNetv2_predict reads for this model. Training wall "
             "seconds include the child's imports, as nnUNetv2_train pays them; peak RSS is ru_maxrss of the "
             "training process and its children."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]  # another job on the machine slows every step: said in the header
    work = args.work.resolve()
    paths = set_nnunet_folders(work)  # before anything imports nnunetv2
    from swinssl.nnunet import install as shims
    from swinssl.nnunet.plans import channel_modality

    result = {"trainer": args.trainer, "channel": args.channel,
              **write_raw_dataset(paths["nnUNet_raw"], args.image, args.label, args.channel)}
    started = time.perf_counter()
    checkpoint = pretrain_checkpoint(work, paths["nnUNet_raw"] / DATASET_NAME / "imagesTr" / "case_0000.nii.gz",
                                     channel_modality(args.channel))
    result["pretrain_s"] = time.perf_counter() - started

    folder, _ = shims.installed_nnunet()
    was_installed = all((folder / shim.file).is_file() for shim in shims.SHIMS)
    shims.install()
    try:
        started = time.perf_counter()
        swinssl_plans = plan_and_preprocess(paths["nnUNet_preprocessed"], checkpoint)
        result["plan_preprocess_s"] = time.perf_counter() - started
        planned = json.loads((swinssl_plans.parent / "nnUNetPlans.json").read_text())["configurations"][CONFIGURATION]
        result.update(plans_patch_size=planned["patch_size"], plans_batch_size=planned["batch_size"])

        from swinssl.nnunet.export import export_for_nnunet

        started = time.perf_counter()
        weights, report = export_for_nnunet(checkpoint, swinssl_plans, work / "swinssl_weights.pth")
        result.update(export_s=time.perf_counter() - started, encoder_tensors_exported=report.encoder_loaded)
        result.update(train(args.trainer, weights, work))
        result.update(trainer_outputs(paths["nnUNet_results"], args.trainer))
    finally:
        if not was_installed:
            shims.uninstall()

    import nnunetv2  # noqa: F401  (its version, for the header)
    import torch
    from importlib.metadata import version

    header = (f"nnU-Net smoke check ({args.trainer}, fold all, one case) on the CPU: torch {torch.__version__}, "
              f"nnunetv2 {version('nnunetv2')}, {result['threads']} threads, {os.cpu_count()} cores, "
              f"{platform.processor() or platform.machine()}; load average {load_at_start:.2f} at the start")
    text = table(result, header)
    print(text)
    if args.txt:
        args.txt.parent.mkdir(parents=True, exist_ok=True)
        args.txt.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, **result}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
