"""CPU prediction of a clinical CT: seconds per volume, swinssl against MONAI, in the same run.

    python benchmarks/predict_cpu.py                      # 512x512x61, tiny + base, results/predict_cpu2.*
    python benchmarks/predict_cpu.py --shape 256 256 61 --max-windows 50 10 2

The volume is a 512x512x61 CT at its native spacing (the case of issue 25: a tiny model trained on
32^3 crops did not finish in 20 minutes on 2 cores). Only the sliding-window step is timed (the
network's work: windows at overlap 0.5, Gaussian blending, 4 output classes); the image is random
numbers, since the network's time does not depend on them. Every row runs in a fresh subprocess.

Rows:
  ours          swinssl.infer.predict_volume with its default window batch (``window_batch``: one
                window per CPU thread within a quarter of the free memory)
  ours, batch 1 the same with one window per forward pass (swinssl's default before)
  ours, padded  batch 1 with the rule of older plans: a 32^3 window padded to 32x32x64
  MONAI         monai.inferers.sliding_window_inference with monai.networks.nets.SwinUNETR, batch 1
                (its default), same weights. MONAI's SwinUNETR cannot run a 32^3 window (its
                one-voxel bottleneck's instance norm raises), so at ROI 32 there is no MONAI row;
                at ROI 64 and 96 there is.
The first row (the default a user gets) predicts the whole volume. The others time a part of
the volume's tiling, at most ``--max-windows`` windows of 32^3, 64^3 and 96^3 (base at 96^3 on 2
cores takes seconds per window), and scale by windows / timed windows (said in the table): a
window costs the same wherever it lies. ``--whole`` times every window of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = [  # (size name, feature, roi, variant)
    ("tiny", 12, 32, "ours"), ("tiny", 12, 32, "ours, batch 1"), ("tiny", 12, 32, "ours, padded"),
    ("tiny", 12, 64, "ours"), ("tiny", 12, 64, "ours, batch 1"), ("tiny", 12, 64, "MONAI"),
    ("base", 48, 96, "ours"), ("base", 48, 96, "ours, batch 1"), ("base", 48, 96, "MONAI"),
]


def worker(spec: dict) -> dict:
    import resource

    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    from swinssl.utils import count_windows
    from swinssl.infer.volume import predict_volume, window_batch
    from swinssl.nn.swin_unetr import SwinUNETR

    torch.manual_seed(0)
    roi, variant = spec["roi"], spec["variant"]
    shape = list(spec["shape"])
    total = count_windows(shape, (roi,) * 3, 0.5)
    if spec["max_windows"] and total > spec["max_windows"]:
        # A sub-volume along the first axes with about max_windows windows; the time is scaled back.
        for axis in range(3):
            while count_windows(shape, (roi,) * 3, 0.5) > spec["max_windows"] and shape[axis] > roi:
                shape[axis] = max(roi, shape[axis] - roi // 2)
    timed = count_windows(shape, (roi,) * 3, 0.5)
    ours = SwinUNETR(1, 4, spec["feature"], single_voxel_bottleneck="pad" if variant == "ours, padded" else "exact")
    image = torch.randn(1, *shape)
    with torch.inference_mode():
        if variant == "MONAI":
            net = MonaiSwinUNETR(in_channels=1, out_channels=4, feature_size=spec["feature"]).eval()
            net.load_state_dict(ours.state_dict())
            batch = 1

            def run():
                return sliding_window_inference(image[None], (roi,) * 3, 1, net, overlap=0.5, mode="gaussian")
        else:
            net = ours.eval()
            batch = window_batch(net, (roi,) * 3) if variant == "ours" else 1

            def run():
                return predict_volume(net, image, roi, 0.5, batch, "gaussian")
        net(torch.randn(1, 1, roi, roi, roi))  # warm-up
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
    return {"windows": total, "timed_windows": timed, "window_batch": batch,
            "s_per_volume": seconds * total / timed, "s_per_window": seconds / timed,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 61])
    parser.add_argument("--max-windows", type=int, nargs=3, default=[400, 60, 8], metavar=("ROI32", "ROI64", "ROI96"),
                        help="windows timed per row after the first, by ROI (the rest is scaled)")
    parser.add_argument("--whole", action="store_true", help="time every window of every row")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "predict_cpu2")
    args = parser.parse_args(argv)
    results = []
    caps = dict(zip((32, 64, 96), args.max_windows))
    for i, (size, feature, roi, variant) in enumerate(ROWS):
        spec = {"shape": args.shape, "feature": feature, "roi": roi, "variant": variant,
                "max_windows": 0 if args.whole or i == 0 else caps[roi]}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            sys.exit(f"{size} {roi} {variant} failed:\n{done.stderr[-2000:]}")
        row = {"size": size, "feature": feature, "roi": roi, "variant": variant, **json.loads(done.stdout)}
        results.append(row)
        print(f"{size:<5} roi {roi:<3} {variant:<14} {row['s_per_volume']:8.1f} s/volume", flush=True)
    lines = [f"CPU prediction of a {'x'.join(map(str, args.shape))} volume (sliding windows at overlap 0.5, "
             f"Gaussian; {results[0]['threads']} threads)", "",
             "| size | ROI | variant | windows (timed) | window batch | s/window | s/volume | vs MONAI | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        monai = next((r for r in results if r["size"] == row["size"] and r["roi"] == row["roi"]
                      and r["variant"] == "MONAI"), None)
        ratio = f"{monai['s_per_volume'] / row['s_per_volume']:.2f}x" if monai and row is not monai else "-"
        timed = f"{row['windows']} ({row['timed_windows']})"
        lines.append(f"| {row['size']} | {row['roi']} | {row['variant']} | {timed} | {row['window_batch']} | "
                     f"{row['s_per_window']:.3f} | {row['s_per_volume']:.1f} | {ratio} | {row['peak_rss_gib']:.2f} |")
    lines.append("")
    lines.append("vs MONAI: MONAI's seconds per volume / this row's (higher is faster). Rows whose windows were "
                 "partly timed are scaled by windows / timed windows.")
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
