"""Exported predictors on the CPU: seconds per sliding window, PyTorch against onnxruntime (and the
torch.export program), the same weights, measured in the same run.

    python benchmarks/export.py                                # tiny and base, ROI 64 and 96, 2 threads
    python benchmarks/export.py --sizes tiny --rois 64 --repeats 5 --out runs/bench/export

For each network size (tiny: feature 12, base: feature 48; depths 2,2,2,2, 14 classes, random
weights) and window size (64^3, the tiny presets' crop, and 96^3, the base presets'), it writes a
fine-tuning checkpoint, exports it with ``swinssl.infer.export_predictor`` to .onnx and .pt2 (the
export time is reported), loads both with ``load_exported`` as ``predict`` does, and times one
window (batch 1) through:

  pytorch   the checkpoint's network, eval and no grad, as ``predict_volume`` calls it (on CPU the
            chunked window attention of ``swinssl.nn.cpu_attention``)
  onnx      the ONNX file in onnxruntime (CPU execution provider, intra-op threads = --threads)
  pt2       the torch.export program (``torch.export.load``; attention through SDPA)

Times are medians of ``--repeats`` after one warm-up, the backends taking turns window by window (a
busy spell of a shared machine hits each alike), as wall seconds and as CPU seconds of the process
(all its threads: less sensitive to other processes on the machine). ``max |diff|`` is the largest
logit difference from PyTorch on that window. Writes ``<out>.txt`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from swinssl.checkpoint import Checkpoint
from swinssl.config import ModelConfig, PreprocessConfig
from swinssl.infer import export_predictor, load_exported, load_model
from swinssl.infer.export import WindowNetwork
from swinssl.methods import method_of
from swinssl.nn.build import build_network
from swinssl.plan import Plan

SIZES = {"tiny": 12, "base": 48}
CLASSES = 14


def checkpoint(folder: Path, feature_size: int, roi: int) -> Path:
    plan = Plan(network=ModelConfig(feature_size=feature_size), preprocess=PreprocessConfig(roi_size=(roi,) * 3),
                out_channels=CLASSES, labels={str(i): f"class_{i}" for i in range(CLASSES)}, modality="CT")
    torch.manual_seed(0)
    model = build_network(plan.network_fields())
    path = folder / f"f{feature_size}_roi{roi}.pt"
    Checkpoint(kind="finetune", step=0, model=model.state_dict(), plan=plan.to_dict()).save(path)
    return path


def timed(run, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds: all threads) of one window."""
    wall, cpu = time.perf_counter(), time.process_time()
    run(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(size: str, roi: int, formats: list[str], repeats: int, folder: Path) -> dict:
    source = checkpoint(folder, SIZES[size], roi)
    model, plan = load_model(source)
    runs = {"pytorch": WindowNetwork(model, method_of(plan)).eval()}
    row: dict = {"size": size, "feature_size": SIZES[size], "roi": roi}
    for fmt in formats:
        start = time.perf_counter()
        path = export_predictor(source, folder / f"{source.stem}.{fmt}")
        row[f"{fmt}_export_s"] = time.perf_counter() - start
        row[f"{fmt}_mb"] = path.stat().st_size / 2**20
        runs[fmt] = load_exported(path)[0]
    x = torch.randn((1, 1, roi, roi, roi), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    with torch.no_grad():
        outputs = {name: run(x) for name, run in runs.items()}  # warm-up
        for _ in range(repeats):  # round robin: a busy spell of the machine hits every backend alike
            for name, run in runs.items():
                times[name].append(timed(run, x))
    for name in runs:
        row[f"{name}_s"] = statistics.median(t[0] for t in times[name])
        row[f"{name}_cpu_s"] = statistics.median(t[1] for t in times[name])
        if name != "pytorch":
            row[f"{name}_max_diff"] = (outputs[name] - outputs["pytorch"]).abs().max().item()
    print(f"  measured {size} {roi}^3: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                     if isinstance(v, float)), file=sys.stderr, flush=True)
    return row


def table(rows: list[dict], formats: list[str], header: str) -> str:
    names = ["pytorch", *formats]
    cols = ["network", "window"] + [f"{n} {kind}" for n in names for kind in ("s", "cpu s")] + \
        [f"x {f}" for f in formats] + [f"{f} |diff|" for f in formats]
    lines = [header, "", "  ".join(f"{c:>11}" for c in cols), "-" * (13 * len(cols))]
    for r in rows:
        cells = [f"{r['size']} (f{r['feature_size']})", f"{r['roi']}^3"]
        cells += [f"{r[f'{n}_{kind}']:.3f}" for n in names for kind in ("s", "cpu_s")]
        cells += [f"{r['pytorch_cpu_s'] / r[f + '_cpu_s']:.2f}x" for f in formats]
        cells += [f"{r[f + '_max_diff']:.1e}" for f in formats]
        lines.append("  ".join(f"{c:>11}" for c in cells))
    lines += ["", "s: wall seconds per window; cpu s: CPU seconds of the process (all its threads) per window; "
                  "'x onnx' / 'x pt2': speed-up over PyTorch in CPU seconds; |diff|: max logit difference from "
                  "PyTorch on the timed window.",
              "export seconds and file sizes: " + "; ".join(
                  f"{r['size']} {r['roi']}^3 " + ", ".join(f"{f} {r[f + '_export_s']:.0f} s / {r[f + '_mb']:.0f} MB"
                                                          for f in formats) for r in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rois", nargs="+", type=int, default=[64, 96])
    parser.add_argument("--formats", nargs="+", default=["onnx", "pt2"], choices=["onnx", "pt2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="A line added to the header (e.g. how busy the machine was).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_cpu2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    header = (f"swinssl exported predictors, seconds per window (batch 1) on the CPU, median of {args.repeats} after a "
              f"warm-up; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
              f"{platform.processor() or platform.machine()}; depths 2,2,2,2, {CLASSES} classes. {args.note}").strip()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for roi in args.rois:
                rows.append(measure(size, roi, args.formats, args.repeats, Path(folder)))
    text = table(rows, args.formats, header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
