"""Is float16 good enough for the preprocessing cache? The round-trip error on real CT and MRI.

    python benchmarks/cache_dtype.py                    # writes benchmarks/results/cache_dtype.txt
    python benchmarks/cache_dtype.py --data DIR --cap 6

For every real image volume under ``DIR`` (default ``../shared/data``: ``ct/`` and ``mri/``, label,
segmentation and probability maps left out; at most ``--cap`` per modality), the image head of the
default preprocessing of its modality (presets ``preprocess/ct`` and ``preprocess/mri``: read,
reorient, resample, normalise, foreground crop) gives the float32 volume a cache entry stores; that
volume is rounded to float16 and back, and the absolute error is compared with two scales:

- one grey level of the source: the smallest nonzero difference between two distinct intensities of
  the file, times the normalisation's scale (CT: 1 / window width; MRI z-score: 1 / the standard
  deviation of the non-zero voxels; MRI percentiles: 1 / (high - low percentile)). The input the
  network sees cannot resolve less than that, so an error below half of it loses nothing the file held;
- float32's own resolution at the volume's largest value (``np.spacing``), the error of storing as
  float32 (none beyond this).

float16 becomes the default (``data.cache_dtype``) only if the largest error is below half a grey level
on every volume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
RESULT = ROOT / "benchmarks" / "results" / "cache_dtype.txt"
NOT_IMAGES = ("label", "seg", "prob")


def real_volumes(data: Path, cap: int) -> list[tuple[Path, str]]:
    """(file, modality) of the image volumes under ``data/ct`` and ``data/mri``, ``cap`` of each."""
    found = []
    for folder, modality in (("ct", "CT"), ("mri", "MRI")):
        files = sorted(p for p in (data / folder).glob("*") if p.name.endswith((".nrrd", ".nii.gz", ".nii", ".mha"))
                       and not any(w in p.name for w in NOT_IMAGES))
        found += [(p, modality) for p in files[:cap]]
    return found


def grey_level(source: np.ndarray) -> float:
    """The smallest nonzero difference between distinct intensities of the file."""
    values = np.unique(source)
    return float(np.diff(values).min()) if len(values) > 1 else float("nan")


def normalisation_scale(cfg, source: np.ndarray, modality: str) -> float:
    """d(normalised) / d(source intensity) of the preset's normalisation, as MONAI computes it."""
    if modality == "CT":
        low, high = cfg.ct_window
        return 1.0 / (high - low)
    if cfg.mri_normalization == "zscore":
        nonzero = source[source != 0].astype(np.float64)
        return 1.0 / float(nonzero.std())
    low, high = np.percentile(source.astype(np.float64), cfg.mri_percentiles)
    return 1.0 / float(high - low)


def measure(path: Path, modality: str) -> dict:
    from swinssl.config import load_config
    from swinssl.data.io import read_image
    from swinssl.data.transforms import case_item, inference_transforms
    from swinssl.data.discover import Case

    cfg = load_config(f"preprocess/{modality.lower()}").preprocess
    source = read_image(str(path), channels=1).numpy()
    item = case_item(Case(case_id=path.name, images=(path,), label=None, modality=modality))
    normalised = inference_transforms(cfg)(item)["image"].numpy().astype(np.float32)
    back = normalised.astype(np.float16).astype(np.float32)
    error = np.abs(back - normalised)
    grey = grey_level(source) * normalisation_scale(cfg, source, modality)
    largest = float(np.abs(normalised).max())
    ulp32 = float(np.spacing(np.float32(largest)))
    return {"file": f"{path.parent.name}/{path.name}", "modality": modality, "shape": "x".join(map(str, normalised.shape[1:])),
            "max_err": float(error.max()), "p999_err": float(np.percentile(error, 99.9)), "grey": grey,
            "ulp32": ulp32, "source_dtype": str(source.dtype),
            "fits": bool(float(error.max()) < grey / 2)}


def table(rows: list[dict]) -> list[str]:
    head = (f"{'volume':34} {'mod':4} {'shape':12} {'max |err|':>10} {'p99.9':>10} {'grey lvl':>10} "
            f"{'max/grey':>9} {'max/ulp32':>10}  < grey/2")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['file']:34} {r['modality']:4} {r['shape']:12} {r['max_err']:10.3g} {r['p999_err']:10.3g} "
                     f"{r['grey']:10.3g} {r['max_err'] / r['grey']:9.3g} {r['max_err'] / r['ulp32']:10.3g}  "
                     f"{'yes' if r['fits'] else 'NO'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cap", type=int, default=6, help="volumes per modality at most")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    volumes = real_volumes(args.data, args.cap)
    if not volumes:
        print(f"no real volumes under {args.data}", file=sys.stderr)
        return 1
    rows = []
    for path, modality in volumes:
        rows.append(measure(path, modality))
        print(f"measured {rows[-1]['file']}", file=sys.stderr)
    every = all(r["fits"] for r in rows)
    lines = [
        "Cache dtype: float16 round trip of the normalised image (default preprocessing: presets",
        "preprocess/ct, preprocess/mri) on the real volumes of ../shared/data.",
        "max |err|, p99.9: absolute error of float32 -> float16 -> float32, in normalised units;",
        "grey lvl: one intensity step of the source file after normalisation; ulp32: float32's spacing at",
        "the volume's largest value (the error float32 storage has: none beyond it).",
        f"command: python benchmarks/cache_dtype.py --cap {args.cap}",
        "",
        *table(rows),
        "",
        ("verdict: float16 keeps every volume within half a grey level: data.cache_dtype default float16"
         if every else
         "verdict: float16 exceeds half a grey level on "
         + ", ".join(r["file"] for r in rows if not r["fits"])
         + ": data.cache_dtype default stays float32 (float16 is an opt-in that halves the cache)"),
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
