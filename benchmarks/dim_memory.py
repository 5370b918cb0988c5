"""What SwinFUSE's domain-invariance module costs, in its two forms (``swinssl.nn.dim``): the
paper's 4-layer co-attention stack (``model.invariance_heads=[3,6,12,24]``) and the light single
shared layer (``model.invariance_heads=4``), for one pair of streams of a 96^3 crop at feature 48
(48^3 = 110592 query tokens), keys pooled by ``model.invariance_pool``.

    python benchmarks/dim_memory.py                 # 96^3 at feature 48, pools 4 and 2 (a few minutes on 2 cores)
    python benchmarks/dim_memory.py --crop 64 --feature 12

Measured per form: parameters; the activation memory autograd keeps for the backward pass
(the bytes of every tensor saved by the forward, counted by ``torch.autograd.graph.saved_tensors_hooks``:
what training needs beyond the weights on any device, with flash / memory-efficient attention,
which never keeps the L x L' attention matrix); the forward time on this machine. The same
count for the Swin encoder (feature 48, depths 2 2 2 2, no module) on the same crop puts the
module's share in proportion. Writes dim_memory.{json,txt} to --results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swinssl.nn.dim import domain_invariance_module
from swinssl.nn.swin_transformer import SwinTransformer


def saved_bytes(fn) -> tuple[int, float]:
    """Bytes of the tensors autograd saves while ``fn()`` runs forward (each storage once), and seconds."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    tick = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--feature", type=int, default=48)
    parser.add_argument("--pools", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    side = args.crop // 2  # the patch embedding halves each side
    streams = [torch.randn(1, args.feature, side, side, side, requires_grad=True) for _ in range(2)]
    forms = {"paper [3, 6, 12, 24]": [3, 6, 12, 24], "light (4 heads)": 4}
    rows = []
    for name, heads in forms.items():
        for pool in args.pools:
            module = domain_invariance_module(args.feature, heads, pool)
            nbytes, seconds = saved_bytes(lambda: module.gates(*streams))
            rows.append({"module": name, "pool": pool, "key_tokens": (-(-side // pool)) ** 3,
                         "params": sum(p.numel() for p in module.parameters()),
                         "saved_GiB": nbytes / 2**30, "forward_s": seconds})
            print(rows[-1], flush=True)
    encoder = SwinTransformer(1, args.feature, depths=(2, 2, 2, 2))
    image = torch.randn(1, 1, args.crop, args.crop, args.crop)
    nbytes, seconds = saved_bytes(lambda: encoder(image))
    encoder_row = {"module": "Swin encoder (no module), one crop", "saved_GiB": nbytes / 2**30, "forward_s": seconds,
                   "params": sum(p.numel() for p in encoder.parameters())}
    print(encoder_row, flush=True)
    lines = [f"SwinFUSE domain-invariance module, one pair of {args.crop}^3 crops at feature {args.feature} "
             f"({side ** 3} query tokens), batch 1; CPU, torch {torch.__version__}", "",
             "| module | key pool | key tokens | parameters | activations kept for backward (GiB) | forward s (CPU) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['module']} | {r['pool']} | {r['key_tokens']} | {r['params']:,} | {r['saved_GiB']:.2f} | "
                     f"{r['forward_s']:.1f} |")
    lines.append(f"| {encoder_row['module']} | - | - | {encoder_row['params']:,} | {encoder_row['saved_GiB']:.2f} | "
                 f"{encoder_row['forward_s']:.1f} |")
    lines += ["", "In pre-training both streams then go through the encoder (two encoder passes per pair); in "
              "fine-tuning the averaged stream goes through once."]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dim_memory.txt").write_text("\n".join(lines) + "\n")
    (out / "dim_memory.json").write_text(json.dumps({"modules": rows, "encoder": encoder_row}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
