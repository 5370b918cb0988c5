"""SwinUNETR speed and memory: ours against MONAI's, measured in the same run.

    python benchmarks/network.py                   # feature 48, 64^3 and 96^3, batch 1, CPU
    python benchmarks/network.py --sizes 64 --repeats 5 --json runs/bench/network.json
    python benchmarks/network.py --device cuda --sizes 96 128 --batch 2   # a GPU

For each input size and variant it measures, each in a fresh subprocess so peak memory
is clean: a train step (forward + cross-entropy + backward + AdamW), an inference pass
(eval, no grad), the peak resident memory of each, and achieved GFLOP/s against a
measured matmul peak. Times are medians over ``--repeats`` after one warm-up.

A variant is a network, ``monai`` (monai.networks.nets.SwinUNETR) or ``ours`` (swinssl's,
same weights, so outputs can be compared), plus any of these settings joined by ``+``:
  keep      CPU: glibc kept from returning freed memory (swinssl.runtime.keep_freed_memory);
            plain ``ours`` on CPU has it on (the speed setting), ``ours+ckpt`` has it off
  ckpt      activation checkpointing (encoder blocks and decoder conv blocks): the memory setting
  bf16      bfloat16 autocast (AMX on CPUs that have it; outputs differ within bf16 precision)
  compile   torch.compile (``module.compile()``); its compilation is in the warm-up runs
Peak memory is resident memory on CPU and ``torch.cuda.max_memory_allocated`` on CUDA.
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

DEFAULT_VARIANTS = {
    "cpu": ["monai", "monai+keep", "ours", "ours+ckpt", "ours+bf16"],
    "cuda": ["monai", "monai+bf16", "ours", "ours+bf16", "ours+bf16+compile", "ours+ckpt+bf16"],
}
SETTINGS = {"keep", "ckpt", "bf16", "compile"}


def parse_variant(variant: str) -> tuple[str, set[str]]:
    network, *settings = variant.split("+")
    if network not in ("monai", "ours") or not set(settings) <= SETTINGS:
        raise argparse.ArgumentTypeError(
            f"{variant!r}: a variant is 'monai' or 'ours' plus settings from {sorted(SETTINGS)} joined by '+'")
    if network == "monai" and "ckpt" in settings:
        raise argparse.ArgumentTypeError(f"{variant!r}: checkpointing is a setting of ours only")
    return network, set(settings)


def _keeps_memory(variant: str) -> bool:
    network, settings = parse_variant(variant)
    return "keep" in settings or (network == "ours" and "ckpt" not in settings)


# --- worker: one measurement in its own process ---------------------------------------------------


def _build(variant: str, feature: int, out_channels: int):
    import torch

    network, settings = parse_variant(variant)
    torch.manual_seed(0)
    if network == "monai":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature)
    from swinssl.nn import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature, use_checkpoint="ckpt" in settings)


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(spec: dict) -> dict:
    variant, size, device, batch = spec["variant"], spec["size"], spec["device"], spec["batch"]
    settings = parse_variant(variant)[1]
    if device == "cpu" and _keeps_memory(variant):
        from swinssl.runtime import keep_freed_memory

        keep_freed_memory()
    import torch

    net = _build(variant, spec["feature"], spec["out_channels"]).to(device)
    if "compile" in settings:
        net.compile()
    x = torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled="bf16" in settings)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    if spec["mode"] == "train":
        y = torch.randint(0, spec["out_channels"], (batch, size, size, size), device=device)
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

    warmup = 3 if "compile" in settings else 1  # compilation, then recompiles after the first step
    for i in range(spec["repeats"] + warmup):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:  # the first runs warm up kernels and allocations
            times.append(time.perf_counter() - start)
    result = {"median_s": statistics.median(times), "times_s": times, "peak_rss_gib": _peak_rss_gib()}
    if device == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def flops_worker(spec: dict) -> dict:
    """FLOPs of one train step and one inference pass (counted, not timed), and a matmul peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = spec["device"]
    net = _build("ours", spec["feature"], spec["out_channels"]).to(device)
    size, batch = spec["size"], spec["batch"]
    x = torch.randn(batch, 1, size, size, size, device=device)
    y = torch.randint(0, spec["out_channels"], (batch, size, size, size), device=device)
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

    device = spec["device"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare true fp32
    torch.manual_seed(0)
    ref = MonaiSwinUNETR(in_channels=1, out_channels=spec["out_channels"], feature_size=spec["feature"]).eval()
    ours = SwinUNETR(in_channels=1, out_channels=spec["out_channels"], feature_size=spec["feature"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(1, 1, *(spec["size"],) * 3).to(device)
    with torch.no_grad():
        expected = ref(x)
        fp32 = (ours(x) - expected).abs().max().item()
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = (ours(x).float() - expected).abs().max().item()
    return {"fp32": fp32, "bf16": bf16, "logit_scale": expected.abs().max().item()}


def matmul_peak(spec: dict) -> dict:
    import torch

    device = spec["device"]
    n, reps = (4096, 5) if device == "cpu" else (8192, 20)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        out[name] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
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
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="e.g. monai ours ours+bf16+compile; default: " +
                             "; ".join(f"{d}: {' '.join(v)}" for d, v in DEFAULT_VARIANTS.items()))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"step": worker, "flops": flops_worker, "parity": parity_worker, "peak": matmul_peak}[kind]
        print(json.dumps(fn(spec)))
        return
    variants = args.variants or DEFAULT_VARIANTS[args.device]
    for variant in variants:
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))

    import torch

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none"
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device, "gpu": gpu,
               "batch": args.batch, "sizes": {}}
    peak = run_worker("peak", {"device": args.device})
    results["matmul_peak_gflops"] = peak
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} (GPU: {gpu}); "
          f"matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    for size in args.sizes:
        base = {"size": size, "feature": args.feature, "out_channels": args.out_channels, "repeats": args.repeats,
                "device": args.device, "batch": args.batch}
        flops = run_worker("flops", base)
        parity = run_worker("parity", base)
        rows = {}
        for variant in variants:
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
    memory = "peak_gpu_gib" if args.device == "cuda" else "peak_rss_gib"
    print(f"\nSwinUNETR feature {args.feature}, input {args.batch}x1x{size}^3, {args.out_channels} classes, "
          f"{args.device}, median of {args.repeats}")
    if parity:
        print(f"max |ours - MONAI| logits: fp32 {parity['fp32']:.1e}, bf16 autocast {parity['bf16']:.1e} "
              f"(logits up to {parity['logit_scale']:.1f})")
    header = f"{'variant':<18} {'train s':>8} {'x MONAI':>8} {'GFLOP/s':>8} {'peak GiB':>9} {'x MONAI':>8} " \
             f"{'infer s':>8} {'x MONAI':>8} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for variant, r in rows.items():
        train, infer = r["train"], r["infer"]
        speed = (ref["train"]["median_s"] / train["median_s"]) if ref else float("nan")
        mem = (train[memory] / ref["train"][memory]) if ref else float("nan")
        ispeed = (ref["infer"]["median_s"] / infer["median_s"]) if ref else float("nan")
        gflops = flops["train_flops"] / train["median_s"] / 1e9
        print(f"{variant:<18} {train['median_s']:>8.3f} {speed:>7.2f}x {gflops:>8.0f} {train[memory]:>9.2f} "
              f"{mem:>7.2f}x {infer['median_s']:>8.3f} {ispeed:>7.2f}x {infer[memory]:>9.2f}")
    print(f"train step {flops['train_flops'] / 1e9:.0f} GFLOP (fwd+bwd), inference {flops['infer_flops'] / 1e9:.0f} GFLOP; "
          f"'x MONAI' is speed-up (time ratio MONAI/ours) and memory ratio ours/MONAI")


if __name__ == "__main__":
    main()
