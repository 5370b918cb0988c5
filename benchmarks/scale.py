"""How start-up, memory, preparation and the cache grow with the number of volumes (issue 34).

    python benchmarks/scale.py                                   # 40, 400 and 4,000 volumes
    python benchmarks/scale.py --sizes 40 400 --out benchmarks/results/scale_quick

Synthetic corpora of small CT-like files (``--side`` voxels a side, 2 mm): the point is the cost
per volume of bookkeeping, not of voxels. For each size N, one after the other, each command a
process of its own (``swinssl`` CLI, ``--no-estimate``, the tiny pre-training preset at 64x32x32 crops (the contrastive task needs a side of 64),
no validation split so that nothing but the run's own batches is read):

- cold start: a 1-step pre-training into an empty output folder (no checksum memo, no cache):
  ``startup_s`` (process start to its first batch ready, from metrics.csv) and the process's
  peak resident memory (``ru_maxrss``);
- warm start: the same again into a new run of the same folder (memo and first entries present);
- prepare: ``swinssl data prepare`` of the whole corpus into an empty cache with 1 and with 2
  worker processes: volumes per second (from its report); cache bytes per volume;
- steady crops/s: a 6-step pre-training on the prepared cache, median ``crops_per_s`` of steps 3-6.

The table's last rows are the growth per added volume between the smallest and largest N
(seconds, bytes). Writes ``--out``.txt (the table) and ``--out``.json (every number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["preprocess.roi_size=[64,32,32]", "preprocess.num_crops=1", "preprocess.spacing=[2.0,2.0,2.0]", "model.feature_size=12",
       "train.batch_size=2", "train.num_workers=0", "train.val_fraction=0", "train.log_every=1",
       "train.warmup_steps=0", "train.preview_every=0"]


def write_corpus(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """``count`` CT-like volumes (air, a body block of soft tissue with noise), int16 NIfTI, 2 mm."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(count):
        volume = np.full((side, side, side), -1000, np.int16)
        lo, hi = side // 6, side - side // 6
        volume[lo:hi, lo:hi, lo:hi] = rng.normal(40, 30, (hi - lo,) * 3).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, affine), folder / f"ct_{i:05d}.nii.gz")


def run_cli(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak resident bytes, output) of one CLI command in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "swinssl.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"swinssl {' '.join(args)} failed:\n{output[-3000:]}")
    return wall, usage.ru_maxrss * 1024, output


def metric(run_dir: Path, name: str) -> list[float]:
    from swinssl.runs import read_metrics

    return [r["value"] for r in read_metrics(run_dir) if r["name"] == name]


def pretrain(data: Path, out: Path, name: str, steps: int, cwd: Path) -> dict:
    wall, peak, _ = run_cli(["pretrain", "--no-estimate", f"data={data}", f"train.out={out}", f"train.name={name}",
                             f"train.steps={steps}", f"train.checkpoint_every={steps}", *RUN], cwd)
    return {"wall_s": wall, "peak_rss": peak, "startup_s": metric(out / name, "startup_s")[0],
            "crops_per_s": metric(out / name, "crops_per_s")}


def prepare(data: Path, cache: Path, workers: int, cwd: Path) -> dict:
    wall, peak, _ = run_cli(["data", "prepare", "pretrain/swin_unetr_tiny", f"data={data}",
                             f"data.cache={cache}", f"--workers={workers}", *RUN], cwd)
    report = json.loads((cache / "prepare" / "pretrain.json").read_text())
    return {"wall_s": wall, "peak_rss": peak, "volumes_per_s": report["volumes"] / report["seconds"],
            "cache_bytes": report["cache_bytes"], "report": report}


def measure(count: int, side: int, root: Path, skip_prepare: bool) -> dict:
    data, out = root / f"corpus_{count}", root / f"runs_{count}"
    t = time.perf_counter()
    write_corpus(data, count, side)
    row = {"volumes": count, "write_s": time.perf_counter() - t}
    row["cold"] = pretrain(data, out, "cold", 1, root)
    row["warm"] = pretrain(data, out, "warm", 1, root)
    if not skip_prepare:
        row["prepare_1"] = prepare(data, root / f"cache1_{count}", 1, root)
        row["prepare_2"] = prepare(data, root / f"cache2_{count}", 2, root)
        steady = pretrain(data, root / f"steady_{count}", "steady", 6, root)  # its own cache: cold, then warm
        row["steady_crops_per_s"] = statistics.median(steady["crops_per_s"][2:])
    shutil.rmtree(data, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = ["| volumes | cold start s | warm start s | peak RSS of the 1-step run MiB (cold / warm) | prepare vol/s (1 / 2 "
             "workers) | steady crops/s | cache KiB/volume |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        prep = (f"{r['prepare_1']['volumes_per_s']:.1f} / {r['prepare_2']['volumes_per_s']:.1f}"
                if "prepare_1" in r else "-")
        cache = f"{r['prepare_1']['cache_bytes'] / r['volumes'] / 1024:.1f}" if "prepare_1" in r else "-"
        steady = f"{r['steady_crops_per_s']:.2f}" if "steady_crops_per_s" in r else "-"
        lines.append(f"| {r['volumes']:,} | {r['cold']['startup_s']:.2f} | {r['warm']['startup_s']:.2f} | "
                     f"{r['cold']['peak_rss'] / mib:.0f} / {r['warm']['peak_rss'] / mib:.0f} | {prep} | {steady} | "
                     f"{cache} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        added = b["volumes"] - a["volumes"]
        lines.append("")
        lines.append(f"Growth per added volume ({a['volumes']:,} -> {b['volumes']:,}): warm start-up "
                     f"{(b['warm']['startup_s'] - a['warm']['startup_s']) / added * 1e3:.2f} ms, cold start-up "
                     f"{(b['cold']['startup_s'] - a['cold']['startup_s']) / added * 1e3:.2f} ms, peak RSS (warm) "
                     f"{(b['warm']['peak_rss'] - a['warm']['peak_rss']) / added / 1024:.1f} KiB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 400, 4000])
    parser.add_argument("--side", type=int, default=32, help="voxels a side of each synthetic volume")
    parser.add_argument("--skip-prepare", action="store_true", help="start-up only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_cpu2"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="swinssl_scale_") as tmp:
        for count in args.sizes:
            rows.append(measure(count, args.side, Path(tmp), args.skip_prepare))
            print(table(rows).splitlines()[-1] if len(rows) == 1 else table(rows), flush=True)
    text = (f"# benchmarks/scale.py --sizes {' '.join(map(str, args.sizes))} --side {args.side}\n"
            f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}\n\n{table(rows)}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
