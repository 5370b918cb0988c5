"""Predicting an archive on this machine's cores: cases per minute, one case after the other against the
pipeline (reader and writer threads beside the network), in the same run.

    python benchmarks/predict_archive.py                       # 20 volumes, results/predict_archive.*
    python benchmarks/predict_archive.py --cases 4 --repeats 1 --volumes /tmp/vols

The volumes are synthetic CT-like ones of clinical size: 512x512 in-plane, 80 to 120 slices, at
0.8x0.8x2.5 mm (int16 NIfTI, gzip; air, an elliptic body with lungs, spine and soft-tissue
blobs, 12 HU noise), written once into ``--volumes`` (a temporary folder by default). Their
names say no modality, so each is read once more for ``predict``'s modality check, as in a plain
folder of volumes. ``../shared/data`` holds one real CT of that size, not twenty, so none of it is
used. The model is a random-weight SwinUNETR saved as a fine-tuning checkpoint with its plan (as
tests/test_infer.py builds them): what a prediction costs does not depend on the weights.

  small  feature 12, depths 1-1-1-1, 64^3 windows at overlap 0.25, volumes resampled to 3 mm
  tiny   feature 12, depths 2-2-2-2 (finetune/tiny's network), 64^3 windows at overlap 0.25, 2 mm

Modes, each in fresh processes predicting every volume into its own folder (cache off, window
batch predict's default):

  before                  predict(...) of the commit ``--before`` (default a52c081, the last one
                          before predict learnt parts, resume and the pipeline), from ``git archive``

  in turn                 predict(..., pipeline=False), the network on every core (torch's default)
  pipelined               predict(..., pipeline=True), the same network threads, reader and writer
                          threads beside them (helper_threads: one intra-op thread each here)
  in turn, 1 thread       the network on one intra-op thread (torch.set_num_threads(1))
  pipelined, 1 thread     the same with the pipeline: a core left for the reader and writer
  2 parts, 1 thread each  two processes at once, --part 0/2 and 1/2 into one folder, each with its
                          network on one thread and predict's default (overlap_by_default)

Each mode runs ``--repeats`` times, interleaved with the others; the table gives the median and
the range. Per mode also: the seconds each step took summed over the cases (their sum exceeds the
wall time where steps overlap), CPU seconds / wall seconds, peak resident memory, and whether
the share of its mask voxels unlike the first mode's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    "small": {"feature": 12, "depths": [1, 1, 1, 1], "roi": 64, "overlap": 0.25, "spacing": [3.0, 3.0, 3.0]},
    "tiny": {"feature": 12, "depths": [2, 2, 2, 2], "roi": 64, "overlap": 0.25, "spacing": [2.0, 2.0, 2.0]},
}
MODES = {  # worker settings; parts: processes at once, each predicting its part
    "before": {"before": True},
    "in turn": {"pipeline": False},
    "pipelined": {"pipeline": True},
    "in turn, 1 thread": {"pipeline": False, "threads": 1},
    "pipelined, 1 thread": {"pipeline": True, "threads": 1},
    "2 parts, 1 thread each": {"pipeline": None, "threads": 1, "parts": 2},
}
SPACING = (0.8, 0.8, 2.5)
STEPS = ("read + preprocess", "network", "invert + write")


def write_volumes(folder: Path, count: int) -> list[Path]:
    """``count`` CT-like volumes of 512x512x(80..120) int16 at ``SPACING`` (kept when already there)."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"case_{i:03d}.nii.gz"  # no modality in the name: predict checks it from the voxels
        paths.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng(i)
        depth = 80 + (40 * i) // max(count - 1, 1)
        x, y = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512), indexing="ij")
        half_x, half_y = rng.uniform(0.7, 0.85), rng.uniform(0.5, 0.65)
        body = (x / half_x) ** 2 + (y / half_y) ** 2 < 1
        lungs = (((np.abs(x) - 0.35 * half_x) / (0.28 * half_x)) ** 2 + (y / (0.6 * half_y)) ** 2) < 1
        spine = (x / 0.07) ** 2 + ((y + 0.7 * half_y) / 0.07) ** 2 < 1
        slab = np.where(body, 40, -1024) + np.where(lungs & body, -860, 0) + np.where(spine, 660, 0)
        volume = np.repeat(slab[..., None], depth, axis=2).astype(np.float32)
        z = np.linspace(-1, 1, depth)[None, None, :]
        for _ in range(4):  # soft-tissue blobs (organs) of +20..+90 HU
            cx, cy, cz, r = rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3), rng.uniform(-0.6, 0.6), rng.uniform(.1, .2)
            blob = ((x[..., None] - cx) ** 2 + (y[..., None] - cy) ** 2 + (z - cz) ** 2) < r ** 2
            volume += np.where(blob & body[..., None], rng.uniform(20, 90), 0)
        volume += rng.normal(0, 12, volume.shape).astype(np.float32) * body[..., None]
        affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        nib.save(nib.Nifti1Image(np.clip(volume, -1024, 3071).astype(np.int16), affine), str(path))
    return paths


def write_checkpoint(path: Path, model: dict) -> Path:
    """A fine-tuning checkpoint of a random-weight SwinUNETR (3 classes) with its plan."""
    import torch

    from swinssl.config import ModelConfig, PreprocessConfig, to_dict
    from swinssl.nn.swin_unetr import SwinUNETR

    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=3, feature_size=model["feature"], depths=tuple(model["depths"]))
    preprocess = PreprocessConfig(spacing=tuple(model["spacing"]), crop_foreground=True, ct_window=(-175.0, 250.0),
                                  roi_size=(model["roi"],) * 3)
    plan = {"network": {**to_dict(ModelConfig(feature_size=model["feature"], depths=tuple(model["depths"]))),
                        "out_channels": 3, "patch_size": 2},
            "preprocess": to_dict(preprocess), "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "channel_names": ["image"], "modality": "CT", "overlap": model["overlap"]}
    torch.save({"format": "swinssl", "kind": "finetune", "model": network.state_dict(), "plan": plan}, path)
    return path


def worker(spec: dict) -> dict:
    """Predict the volumes (or part) of ``spec`` in one mode; seconds, step seconds, CPU use, peak memory."""
    import resource
    import threading

    import torch

    from swinssl.infer import PredictOptions, cases, predict

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("before"):  # an older predict: its own signature, no step timings
        started, cpu = time.time(), time.process_time()
        masks = predict(spec["model"], spec["inputs"], spec["out"], PredictOptions(cache="off", device="cpu"),
                        progress=False)
        return {"started": started, "ended": time.time(), "cpu_s": time.process_time() - cpu, "masks": len(masks),
                "step_s": dict.fromkeys(STEPS, float("nan")), "threads": torch.get_num_threads(),
                "overlapped": False, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    seconds = dict.fromkeys(STEPS, 0.0)
    lock = threading.Lock()

    def timed(step: str, function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    seconds[step] += time.perf_counter() - started
        return run

    steps = {"_as_case": "read + preprocess", "_preprocessed": "read + preprocess", "_labels": "network",
             "_mask": "invert + write", "write_mask": "invert + write"}
    for name, step in steps.items():
        setattr(cases, name, timed(step, getattr(cases, name)))
    pipeline = spec["pipeline"]
    overlapped = cases.overlap_by_default("cpu") if pipeline is None else pipeline
    started, cpu = time.time(), time.process_time()
    masks = predict(spec["model"], spec["inputs"], spec["out"], PredictOptions(cache="off", device="cpu"),
                    progress=False, pipeline=pipeline, part=tuple(spec["part"]) if spec.get("part") else None)
    ended = time.time()
    return {"started": started, "ended": ended, "cpu_s": time.process_time() - cpu, "masks": len(masks), "step_s": seconds,
            "threads": torch.get_num_threads(), "overlapped": overlapped,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_mode(checkpoint: Path, inputs: list[Path], out: Path, mode: dict, before_src: Path | None = None) -> dict:
    """One run of ``mode``: its processes started together; wall time from the first one's call of predict
    to the last one's return (imports and start-up are left out, as in a long run they would be)."""
    parts = mode.get("parts", 1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if mode.get("before"):
        env["PYTHONPATH"] = str(before_src)
    settings = {k: v for k, v in mode.items() if k != "parts"}
    specs = [{"model": str(checkpoint), "inputs": [str(p) for p in inputs], "out": str(out), **settings,
              "part": [i, parts] if parts > 1 else None} for i in range(parts)]
    running = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for spec in specs]
    outputs = [p.communicate() for p in running]
    for process, (_, err) in zip(running, outputs):
        if process.returncode:
            sys.exit(f"{mode} failed:\n{err[-3000:]}")
    rows = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    wall = max(r["ended"] for r in rows) - min(r["started"] for r in rows)
    return {"wall_s": wall, "cpu_s": sum(r["cpu_s"] for r in rows),
            "masks": sum(r["masks"] for r in rows), "threads": rows[0]["threads"],
            "overlapped": all(r["overlapped"] for r in rows),
            "step_s": {s: sum(r["step_s"][s] for r in rows) for s in STEPS},
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rows)}


def differing_voxels(first: Path, other: Path) -> float | None:
    """The share of voxels whose label differs from ``first``'s masks, over every case (None: the folders do
    not hold the same masks, or a mask's affine differs). A network on another number of threads sums in
    another order, so a voxel whose two best classes are nearly tied can flip."""
    import nibabel as nib
    import numpy as np

    names = sorted(p.name for p in first.glob("*.nii.gz"))
    if not names or names != sorted(p.name for p in other.glob("*.nii.gz")):
        return None
    differ = total = 0
    for name in names:
        a, b = nib.load(first / name), nib.load(other / name)
        if a.shape != b.shape or not np.array_equal(a.affine, b.affine):
            return None
        differ += int(np.count_nonzero(np.asarray(a.dataobj) != np.asarray(b.dataobj)))
        total += int(np.prod(a.shape))
    return differ / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["small"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, interleaved")
    parser.add_argument("--volumes", type=Path, help="Folder for the volumes (kept; default: a temporary one).")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "predict_archive")
    parser.add_argument("--before", default="a52c081", help="Commit whose predict the 'before' mode runs.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="predict_archive_") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        inputs = write_volumes(args.volumes or tmp / "volumes", args.cases)
        print(f"{len(inputs)} volumes ready in {time.perf_counter() - started:.0f} s", flush=True)
        before_src = tmp / "before"
        if "before" in args.modes:  # the older package, importable ahead of the installed one
            before_src.mkdir()
            archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", args.before, "src"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
            before_src = before_src / "src"
        runs: dict[tuple[str, str], list[dict]] = {}
        for model_name in args.models:
            checkpoint = write_checkpoint(tmp / f"{model_name}.pt", MODELS[model_name])
            for repeat in range(args.repeats):
                for mode in args.modes:
                    out = tmp / "out" / model_name / f"{mode.replace(' ', '_').replace(',', '')}_{repeat}"
                    run = {**run_mode(checkpoint, inputs, out, MODES[mode], before_src), "out": str(out),
                           "load_1min": os.getloadavg()[0]}  # this run's own threads count too
                    first = runs.get((model_name, args.modes[0]), [run])[0]
                    run["differing"] = 0.0 if first is run else differing_voxels(Path(first["out"]), out)
                    runs.setdefault((model_name, mode), []).append(run)
                    print(f"{model_name:<6} {mode:<24} run {repeat + 1}: {60 * run['masks'] / run['wall_s']:6.2f} "
                          f"cases/min", flush=True)
    results = [summary(model, mode, found) for (model, mode), found in runs.items()]
    text = report(results, args.cases, args.repeats, args.before)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


def summary(model: str, mode: str, runs: list[dict]) -> dict:
    """The median run of a mode (by wall time), with the range of cases per minute over its runs."""
    per_minute = [60 * r["masks"] / r["wall_s"] for r in runs]
    median = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    return {"model": model, "mode": mode, **median, "cases_per_min": statistics.median(per_minute),
            "load_1min_max": max(r["load_1min"] for r in runs),
            "cases_per_min_range": [min(per_minute), max(per_minute)],
            "differing": None if any(r["differing"] is None for r in runs) else max(r["differing"] for r in runs),
            "runs": len(runs)}


def _differing(share: float | None) -> str:
    if share is None:
        return "NOT THE SAME CASES OR GRID"
    return "none" if share == 0 else f"{100 * share:.2g}%"


def report(results: list[dict], cases: int, repeats: int, before: str) -> str:
    lines = [f"Predicting {cases} CT-like volumes of 512x512x(80..120) at 0.8x0.8x2.5 mm (synthetic; cache off) on "
             f"{len(os.sched_getaffinity(0))} cores; median of {repeats} interleaved run(s); 1-minute load average "
             f"after a run at most {max(r['load_1min_max'] for r in results):.1f} (2 is this benchmark's own)", "",
             "| model | mode | network threads | steps overlap | cases/min (range) | s/case | vs before | "
             + " | ".join(f"{s} s" for s in STEPS) + " | CPU s / wall s | peak GiB | voxels differing |",
             "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in STEPS) + " | --- | --- | --- |"]
    for row in results:
        base = next(r for r in results if r["model"] == row["model"] and r["mode"] in ("before", "in turn"))
        low, high = row["cases_per_min_range"]
        lines.append(f"| {row['model']} | {row['mode']} | {row['threads']} | {'yes' if row['overlapped'] else 'no'} | "
                     f"{row['cases_per_min']:.2f} ({low:.2f}-{high:.2f}) | {60 / row['cases_per_min']:.2f} | "
                     f"{row['cases_per_min'] / base['cases_per_min']:.2f}x | "
                     + " | ".join(f"{row['step_s'][s]:.0f}" if row['step_s'][s] == row['step_s'][s] else "-" for s in STEPS)
                     + f" | {row['cpu_s'] / row['wall_s']:.2f} | {row['peak_rss_gib']:.2f} | "
                     f"{_differing(row['differing'])} |")
    lines += ["", f"vs before: cases per minute / those of 'before' (predict at {before}: the network on every core, "
              "one case after the other; 'in turn' where 'before' was not run). Step seconds are summed over the cases and processes, "
              "whatever thread ran them (of the median run); where steps overlap they exceed the wall time, and "
              "each step runs slower than alone where they share the cores. Voxels differing: the share of mask "
              "voxels unlike the first mode's (the most over the runs; a network on another number of threads "
              "sums in another order, and a voxel whose two best classes nearly tie can flip).",
              "models: " + "; ".join(f"{name}: feature {m['feature']}, depths {'-'.join(map(str, m['depths']))}, "
                                     f"{m['roi']}^3 windows at overlap {m['overlap']}, "
                                     f"{'x'.join(f'{s:g}' for s in m['spacing'])} mm"
                                     for name, m in MODELS.items() if any(r["model"] == name for r in results))]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
