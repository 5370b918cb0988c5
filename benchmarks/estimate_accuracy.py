"""How close ``swinssl estimate`` comes to the run it predicts: predicted vs measured peak memory
and seconds per optimiser step, for tiny and base pre-training and fine-tuning presets.

    python benchmarks/estimate_accuracy.py                       # all four configs, CPU
    python benchmarks/estimate_accuracy.py --configs tiny_pretrain tiny_finetune
    python benchmarks/estimate_accuracy.py --device cuda --out benchmarks/results/estimate_cuda

For each config, one after the other (never two at once, so neither slows the other):

1. the estimate (``swinssl.workflows.estimate.estimate``: the real stage for 3 optimiser steps in a
   separate process; its peak resident set size and the median ``step_s`` of steps 2 and 3);
2. a real 3-step run: ``swinssl pretrain`` / ``finetune --no-estimate`` with the preset,
   ``train.steps=3`` and ``train.log_every=1`` (so each step's ``step_s`` is logged), everything
   else as the preset says (its validation, preview and checkpoint at the last step included),
   in a subprocess of its own: peak memory is that process's ``ru_maxrss`` from ``os.wait4``
   (its largest finished child's if larger, as the probe counts it), on CUDA
   ``torch.cuda.max_memory_reserved`` is not readable from outside, so the run's own peak is
   not compared there); step time the median ``step_s`` of steps 2 and 3 in its metrics.csv, and
   the median ``cpu_s`` (the process's CPU seconds in the step, all threads), which other
   processes on the same cores disturb far less than wall time.

With ``--fit`` the tiny configs are also estimated with a memory budget (a second probe at one
crop, the line ``peak = base + crops x per_crop``) and a real run at more crops than either
probe (``--fit-batch`` volumes per step) checks the line's extrapolation.

Both sides train on the same data: ``--data`` (a dataset.json or folder, labelled for
fine-tuning), by default synthetic phantoms of 96^3 written once into a temporary folder.
Writes ``--out``.txt (the table) and ``--out``.json (every number).
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
CONFIGS = {  # name: (stage, preset)
    "tiny_pretrain": ("pretrain", "pretrain/swin_unetr_tiny"),
    "tiny_finetune": ("finetune", "finetune/tiny"),
    "base_pretrain": ("pretrain", "pretrain/swin_unetr"),
    "base_finetune": ("finetune", "finetune/ct"),
}
TOLERANCE = 0.25


def real_run(stage: str, preset: str, overrides: list[str], out: Path, device: str) -> dict:
    """A real 3-step run of the CLI in its own process: peak resident bytes and median step_s after the first."""
    from swinssl.runs import read_metrics

    accelerator = "cpu" if device == "cpu" else "cuda"
    command = [sys.executable, "-m", "swinssl.cli", stage, "--no-estimate", "--config", preset, *overrides,
               f"train.out={out}", "train.name=real", "train.steps=3", "train.log_every=1", "train.devices=1",
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


def measure(name: str, data: str, device: str, scratch: Path, fit: bool, fit_batch: int) -> dict:
    from swinssl.config import load_config
    from swinssl.workflows.estimate import estimate

    stage, preset = CONFIGS[name]
    overrides = [f"data={data}"]
    cfg = load_config(preset, [*overrides, f"train.out={scratch / name}"])
    began, load = time.perf_counter(), os.getloadavg()
    predicted = estimate(cfg, stage, device, fit=fit)
    estimate_s = time.perf_counter() - began
    print(f"  {name}: estimate {predicted.summary()} in {estimate_s:.0f} s", file=sys.stderr, flush=True)
    measured = real_run(stage, preset, overrides, scratch / name, device)
    print(f"  {name}: real run peak {measured['peak'] / GIB:.2f} GiB, {measured['step_s']:.3g} s/step "
          f"({measured['cpu_s']:.3g} CPU s); estimate {predicted.cpu_s:.3g} CPU s/step",
          file=sys.stderr, flush=True)
    row = {"stage": stage, "preset": preset, "crops": predicted.crops, "predicted": predicted.to_dict(),
           "estimate_s": estimate_s, "estimate_load": load, "measured": measured,
           "peak_ratio": predicted.peak / measured["peak"], "step_ratio": predicted.seconds / measured["step_s"],
           "cpu_ratio": predicted.cpu_s / measured["cpu_s"]}
    if fit and predicted.fit is not None:
        batch = fit_batch
        crops = batch * cfg.preprocess.num_crops
        at = real_run(stage, preset, [*overrides, f"train.batch_size={batch}"], scratch / f"{name}_b{batch}", device)
        row["fit_check"] = {"batch_size": batch, "crops": crops, "predicted_peak": predicted.fit.peak(crops),
                            "measured": at, "peak_ratio": predicted.fit.peak(crops) / at["peak"]}
        print(f"  {name}: fit at batch {batch}: predicted {predicted.fit.peak(crops) / GIB:.2f} GiB, measured "
              f"{at['peak'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    return row


def table(rows: dict, header: str) -> list[str]:
    lines = [header, "",
             f"{'config':<15} {'preset':<26} {'crops':>5} {'peak GiB pred':>13} {'meas':>6} {'ratio':>6} "
             f"{'s/step pred':>11} {'meas':>7} {'ratio':>6} {'CPU s/step pred':>15} {'meas':>7} {'ratio':>6} "
             f"{'load':>9}  within 25%"]
    lines.append("-" * len(lines[-1]))
    for name, r in rows.items():
        ok = {k: abs(r[k] - 1) <= TOLERANCE for k in ("peak_ratio", "step_ratio", "cpu_ratio")}
        verdict = ", ".join(f"{k.split('_')[0]} {'yes' if v else 'NO'}" for k, v in ok.items())
        load = f"{r['estimate_load'][0]:.1f}/{r['measured']['load'][0]:.1f}"
        lines.append(f"{name:<15} {r['preset']:<26} {r['crops']:>5} {r['predicted']['peak'] / GIB:>13.2f} "
                     f"{r['measured']['peak'] / GIB:>6.2f} {r['peak_ratio']:>6.2f} {r['predicted']['seconds']:>11.3g} "
                     f"{r['measured']['step_s']:>7.3g} {r['step_ratio']:>6.2f} {r['predicted']['cpu_s']:>15.3g} "
                     f"{r['measured']['cpu_s']:>7.3g} {r['cpu_ratio']:>6.2f} {load:>9}  {verdict}")
    checks = {n: r["fit_check"] for n, r in rows.items() if "fit_check" in r}
    if checks:
        lines += ["", "memory fit (probes at the config's crops and at one crop) extrapolated to a larger batch:",
                  f"{'config':<15} {'batch':>5} {'crops':>5} {'peak GiB pred':>13} {'meas':>6} {'ratio':>6}"]
        for name, c in checks.items():
            lines.append(f"{name:<15} {c['batch_size']:>5} {c['crops']:>5} {c['predicted_peak'] / GIB:>13.2f} "
                         f"{c['measured']['peak'] / GIB:>6.2f} {c['peak_ratio']:>6.2f}")
    lines += ["", "pred: swinssl estimate (3 steps of the real stage in a separate process, first step not timed); "
              "meas: a real 3-step run of the CLI in its own process (validation/checkpoint at step 3 as the preset "
              "says); peak = the process's peak resident set size (CPU); s/step = median step_s (wall) of steps 2-3; "
              "CPU s/step = median cpu_s (the process's CPU seconds in the step, all threads: the work done, "
              "much less sensitive to other processes on the same cores than wall time); ratio = pred / meas; "
              "load = 1-minute load average when the estimate / the real run started (2 CPUs)"]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--data", default=None, help="dataset.json or folder (labelled); default: phantoms of 96^3")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fit", action="store_true", help="tiny configs: also check the memory fit at --fit-batch")
    parser.add_argument("--fit-batch", type=int, default=4, help="volumes per step of the fit check")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "estimate_cpu2",
                        help="writes OUT.txt and OUT.json")
    args = parser.parse_args(argv)

    import torch

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="swinssl-estimate-accuracy-") as scratch:
        scratch = Path(scratch)
        data = args.data
        if data is None:
            from swinssl.data.phantom import write_phantom_dataset

            data = str(write_phantom_dataset(scratch / "data", cases=6, size=96, seed=0))
        rows = {}
        for name in args.configs:
            fit = args.fit and name.startswith("tiny")
            rows[name] = measure(name, data, args.device, scratch, fit, args.fit_batch)
    after = os.getloadavg()
    header = (f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: python benchmarks/estimate_accuracy.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device "
              f"{args.device}, {platform.machine()}; data {args.data or 'phantoms 96^3, 6 cases'}; load average "
              f"{load[0]:.1f} before, {after[0]:.1f} after (other processes share these CPUs)")
    lines = table(rows, header)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"load_before": load, "load_after": after, "rows": rows},
                                                        indent=2, default=str) + "\n")
    print(f"wrote {args.out.with_suffix('.txt')} and .json")


if __name__ == "__main__":
    main()
