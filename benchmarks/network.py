"""SwinUNETR speed and memory: ours against MONAI's, measured in the same run.

    python benchmarks/network.py                   # feature 48, 64^3 and 96^3, batch 1, CPU
    python benchmarks/network.py --sizes 64 --repeats 5 --json runs/bench/network.json

For each input size and variant it measures, each in a fresh subprocess so peak memory
is clean: a train step (forward + cross-entropy + backward + AdamW), an inference pass
(eval, no grad), the peak resident memory of each, and achieved GFLOP/s against a
measured matmul peak. Times are medians over ``--repeats`` after one warm-up.

Variants (same weights, so outputs can be compared):
  monai          monai.networks.nets.SwinUNETR, default process settings
  monai+keep     the same with glibc kept from returning memory (swinssl.runtime.keep_freed_memory)
  ours           swinssl SwinUNETR with keep_freed_memory: the speed setting
  ours+ckpt      activation checkpointing (encoder blocks and decoder conv blocks), default
                 allocator: the memory setting
  ours+bf16      ours + bfloat16 autocast (AMX on CPUs that have it; outputs differ within bf16 precision)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["monai", "monai+keep", "ours", "ours+ckpt", "ours+bf16"]


# --- worker: one measurement in its own process ---------------------------------------------------


def _build(variant: str, feature: int, out_channels: int):
    import torch

    torch.manual_seed(0)
    if variant.startswith("monai"):
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature)
    from swinssl.nn import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature, use_checkpoint="ckpt" in variant)


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(spec: dict) -> dict:
    if spec["variant"] in ("monai+keep", "ours", "ours+bf16"):
        from swinssl.runtime import keep_freed_memory

        keep_freed_memory()
    import torch

    variant, size, device = spec["variant"], spec["size"], spec["device"]
    net = _build(variant, spec["feature"], spec["out_channels"]).to(device)
    x = torch.randn(1, 1, size, size, size, device=device, generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled="bf16" in variant)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    if spec["mode"] == "train":
        y = torch.randint(0, spec["out_channels"], (1, size, size, size), device=device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        net.train()

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()

    else:
        net.eval()

        def step():
            with torch.no_grad(), autocast:
                net(x)

    for i in range(spec["repeats"] + 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i:  # the first run warms up kernels and allocations
            times.append(time.perf_counter() - start)
    result = {"median_s": statistics.median(times), "times_s": times, "peak_rss_gib": _peak_rss_gib()}
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def flops_worker(spec: dict) -> dict:
    """FLOPs of one train step and one inference pass (counted, not timed), and a matmul peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = _build("ours", spec["feature"], spec["out_channels"])
    size = spec["size"]
    x = torch.randn(1, 1, size, size, size)
    y = torch.randint(0, spec["out_channels"], (1, size, size, size))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    train = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(x)
    return {"train_flops": train, "infer_flops": counter.get_total_flops()}


def parity_worker(spec: dict) -> dict:
    """Max |ours - MONAI| of the logits with the same weights, fp32 and bf16 autocast."""
    import torch
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    from swinssl.nn import SwinUNETR

    torch.manual_seed(0)
    ref = MonaiSwinUNETR(in_channels=1, out_channels=spec["out_channels"], feature_size=spec["feature"]).eval()
    ours = SwinUNETR(in_channels=1, out_channels=spec["out_channels"], feature_size=spec["feature"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, *(spec["size"],) * 3)
    with torch.no_grad():
        expected = ref(x)
        fp32 = (ours(x) - expected).abs().max().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = (ours(x).float() - expected).abs().max().item()
    return {"fp32": fp32, "bf16": bf16, "logit_scale": expected.abs().max().item()}


def matmul_peak() -> dict:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        out[name] = 2 * 4096**3 * 5 / (time.perf_counter() - start) / 1e9
    return out


# --- driver ---------------------------------------------------------------------------------------


def run_worker(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--feature", type=int, default=48)
    parser.add_argument("--out-channels", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"step": worker, "flops": flops_worker, "parity": parity_worker, "peak": lambda s: matmul_peak()}[kind]
        print(json.dumps(fn(spec)))
        return

    import torch

    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device, "sizes": {}}
    peak = run_worker("peak", {})
    results["matmul_peak_gflops"] = peak
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    for size in args.sizes:
        base = {"size": size, "feature": args.feature, "out_channels": args.out_channels, "repeats": args.repeats,
                "device": args.device}
        flops = run_worker("flops", base)
        parity = run_worker("parity", base) if args.device == "cpu" else {}
        rows = {}
        for variant in args.variants:
            rows[variant] = {mode: run_worker("step", {**base, "variant": variant, "mode": mode}) for mode in ("train", "infer")}
            print(f"  measured {size}^3 {variant}: train {rows[variant]['train']['median_s']:.2f} s, "
                  f"infer {rows[variant]['infer']['median_s']:.2f} s", file=sys.stderr)
        results["sizes"][size] = {"flops": flops, "parity": parity, "variants": rows}
        print_table(size, args, rows, flops, parity, peak)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def print_table(size: int, args, rows: dict, flops: dict, parity: dict, peak: dict) -> None:
    ref = rows.get("monai")
    print(f"\nSwinUNETR feature {args.feature}, input 1x1x{size}^3, {args.out_channels} classes, median of {args.repeats}")
    if parity:
        print(f"max |ours - MONAI| logits: fp32 {parity['fp32']:.1e}, bf16 autocast {parity['bf16']:.1e} "
              f"(logits up to {parity['logit_scale']:.1f})")
    header = f"{'variant':<12} {'train s':>8} {'x MONAI':>8} {'GFLOP/s':>8} {'peak GiB':>9} {'x MONAI':>8} " \
             f"{'infer s':>8} {'x MONAI':>8} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for variant, r in rows.items():
        train, infer = r["train"], r["infer"]
        speed = (ref["train"]["median_s"] / train["median_s"]) if ref else float("nan")
        mem = (train["peak_rss_gib"] / ref["train"]["peak_rss_gib"]) if ref else float("nan")
        ispeed = (ref["infer"]["median_s"] / infer["median_s"]) if ref else float("nan")
        gflops = flops["train_flops"] / train["median_s"] / 1e9
        print(f"{variant:<12} {train['median_s']:>8.2f} {speed:>7.2f}x {gflops:>8.0f} {train['peak_rss_gib']:>9.2f} "
              f"{mem:>7.2f}x {infer['median_s']:>8.2f} {ispeed:>7.2f}x {infer['peak_rss_gib']:>9.2f}")
    print(f"train step {flops['train_flops'] / 1e9:.0f} GFLOP (fwd+bwd), inference {flops['infer_flops'] / 1e9:.0f} GFLOP; "
          f"'x MONAI' is speed-up (time ratio MONAI/ours) and memory ratio ours/MONAI")


if __name__ == "__main__":
    main()
