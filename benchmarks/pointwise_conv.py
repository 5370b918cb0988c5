"""A 1x1x1 convolution on CPU: ``nn.Conv3d`` against ``swinssl.nn.heads.PointwiseConv3d``.

    python benchmarks/pointwise_conv.py            # table, results/pointwise_conv_cpu2.txt

Forward + backward (a training step's share) and forward alone, median of 10 after a warm-up,
at the shapes where swinssl's networks have a 1x1x1 convolution: the reconstruction head's
last layer (C -> 1 at the pre-training crop, 2 views x 2 crops x 2 volumes), the segmentation
output (C -> classes) and a residual 1x1x1 of the decoder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from swinssl.nn.heads import PointwiseConv3d

HERE = Path(__file__).resolve().parent
SHAPES = [  # (what, batch, in, out, size)
    ("reconstruction, tiny demo", 8, 12, 1, (64, 32, 32)),
    ("reconstruction, tiny", 8, 12, 1, (64, 64, 64)),
    ("segmentation output, tiny", 2, 12, 5, (32, 32, 32)),
    ("decoder residual, tiny", 2, 24, 12, (32, 32, 32)),
    ("reconstruction, base", 8, 48, 1, (96, 96, 96)),
]


def median_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[repeats // 2] * 1000


def measure(batch: int, cin: int, cout: int, size: tuple[int, ...]) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(batch, cin, *size, requires_grad=True)
    out = {}
    for name, layer in (("conv", nn.Conv3d(cin, cout, kernel_size=1)), ("pointwise", PointwiseConv3d(cin, cout))):
        def train():
            layer(x).sum().backward()

        def infer():
            with torch.no_grad():
                layer(x)

        out[f"{name}_train"], out[f"{name}_infer"] = median_ms(train), median_ms(infer)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"pointwise_conv_cpu{torch.get_num_threads()}")
    args = parser.parse_args(argv)
    lines = [f"1x1x1 convolution on CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; ms, median of 10",
             "", "| shape | input | fwd+bwd Conv3d | fwd+bwd pointwise | ratio | fwd Conv3d | fwd pointwise | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for what, batch, cin, cout, size in SHAPES:
        m = measure(batch, cin, cout, size)
        lines.append(f"| {what} | {batch}x{cin}x{'x'.join(map(str, size))} -> {cout} | {m['conv_train']:.1f} | "
                     f"{m['pointwise_train']:.1f} | {m['conv_train'] / m['pointwise_train']:.2f}x | "
                     f"{m['conv_infer']:.1f} | {m['pointwise_infer']:.1f} | "
                     f"{m['conv_infer'] / m['pointwise_infer']:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "ratio: Conv3d's time / the pointwise product's (above 1: the product is faster)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
