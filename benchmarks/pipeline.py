"""End-to-end speed and memory: swinssl against the MONAI reference pipeline, in the same run.

    python benchmarks/pipeline.py                        # real volumes of ../shared/data, tiny + base, CPU
    python benchmarks/pipeline.py --data DIR --configs tiny --sections loader pretrain
    python benchmarks/pipeline.py --json runs/bench/pipeline.json

Sections (each measurement runs in a fresh subprocess, so its peak resident memory is its own):

  loader    crops/s of the data pipeline on ONE core (torch and the process limited to one
            thread): the reference MONAI chain (LoadImaged, EnsureChannelFirstd, Orientationd,
            Spacingd, ScaleIntensityRanged, CropForegroundd, SpatialPadd, RandSpatialCropSamplesd)
            against swinssl's pipeline uncached and from its preprocessing cache (warm; the
            one-off build is reported separately). Also against MONAI's own way of caching the
            same thing: swinssl's pre-training head and random tail in one Compose behind
            ``PersistentDataset`` (torch.save of everything up to the first random transform,
            whole volume reloaded per visit; a fresh cache_dir), first pass and later passes
            each against the same of swinssl's cache, with a parity line of their crops.
  pretrain  Swin UNETR SSL steps/s end to end, loading included (no worker processes, so loading
            and compute add up): reference = MONAI pipeline + MONAI's SwinTransformer encoder +
            per-sample rotation/cut-out loops (as research-contributions' rot_rand/aug_rand);
            ours = cached pipeline + swinssl encoder + batched views. Both models hold the same
            weights; the max |difference| of their outputs on one input is printed.
  finetune  supervised steps/s on the labelled volumes: MONAI pipeline with label-guided crops +
            monai SwinUNETR + DiceCE, against swinssl's cached pipeline + its SwinUNETR.
  predict   seconds per volume: load, preprocess, sliding-window inference (overlap 0.5,
            gaussian), map back to the file's grid; MONAI SwinUNETR + Invertd against
            swinssl.infer.predict_case, same weights; uncached, and with the volumes already in
            its preprocessing cache (as when predicting again, or volumes seen in training).

Configs: ``tiny`` (feature 12, 64^3 crops, 2 mm) and ``base`` (feature 48, 96^3, 1.5x1.5x2 mm).
Both sides normalise every file with the CT window of the reference (swinssl would scale MRI
by percentiles and crop its background at 0, a different amount of work), so they cut the
same crops and predict over the same grid.
Times are medians over ``--repeats``; ratios are reference time / ours (speed-up) and ours /
reference peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
CONFIGS = {
    "tiny": {"feature": 12, "roi": 64, "spacing": [2.0, 2.0, 2.0], "batch": 2, "crops": 2},
    "base": {"feature": 48, "roi": 96, "spacing": [1.5, 1.5, 2.0], "batch": 1, "crops": 2},
}
SECTIONS = ("loader", "pretrain", "finetune", "predict")
CT_WINDOW = (-1000.0, 1000.0)


# --- data ------------------------------------------------------------------------------------------


def find_volumes(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Images (every volume that is not a label) and (image, label) pairs under ``root``."""
    suffixes = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    labels = {f for f in files if any(w in Path(f).name for w in ("label", "seg", "_prob"))}  # not images
    images = [f for f in files if f not in labels]
    pairs = []
    for label in sorted(labels):
        image = label.replace("_label", "_image").replace("label", "image")
        if image in images:
            pairs.append((image, label))
    return images, pairs


def preprocess_cfg(cfg: dict):
    from swinssl.config import PreprocessConfig

    return PreprocessConfig(spacing=tuple(cfg["spacing"]), roi_size=(cfg["roi"],) * 3, num_crops=cfg["crops"],
                            ct_window=CT_WINDOW)


def reference_pipeline(cfg: dict, labels: bool, train: bool = True):
    """The MONAI reference chain (research-contributions SwinUNETR Pretrain / BTCV transforms)."""
    from monai import transforms as T

    keys = ["image", "label"] if labels else ["image"]
    roi = (cfg["roi"],) * 3
    steps = [
        T.LoadImaged(keys=keys, image_only=True),
        T.EnsureChannelFirstd(keys=keys),
        T.Orientationd(keys=keys, axcodes="RAS"),
        T.Spacingd(keys=keys, pixdim=cfg["spacing"], mode=["bilinear", "nearest"][: len(keys)]),
        T.ScaleIntensityRanged(keys=["image"], a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        T.CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
    ]
    if train and labels:
        steps += [
            T.SpatialPadd(keys=keys, spatial_size=roi),
            T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=1, neg=1,
                                     num_samples=cfg["crops"], image_key="image", image_threshold=0),
            T.RandFlipd(keys=keys, prob=0.1, spatial_axis=0),
            T.RandFlipd(keys=keys, prob=0.1, spatial_axis=1),
            T.RandFlipd(keys=keys, prob=0.1, spatial_axis=2),
            T.RandRotate90d(keys=keys, prob=0.1, max_k=3),
            T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
            T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1),
        ]
    elif train:
        steps += [T.SpatialPadd(keys=keys, spatial_size=roi),
                  T.RandSpatialCropSamplesd(keys=keys, roi_size=roi, num_samples=cfg["crops"], random_size=False)]
    return T.Compose(steps)


def item_of(image: str, label: str | None = None, modality: str | None = None) -> dict:
    from swinssl.data.discover import find_dataset
    from swinssl.data.transforms import case_item

    case = find_dataset(image).cases[0]
    out = case_item(case)
    if label:
        out["label"] = label
    if modality:
        out["modality"] = modality
    return out


def ours_pipeline(cfg: dict, cache: str | None, labels: bool):
    from swinssl.data.transforms import finetune_transforms, pretrain_transforms

    pre = preprocess_cfg(cfg)
    if labels:
        return finetune_transforms(pre, classes=None, train=True, cache=cache)
    return pretrain_transforms(pre, cache=cache)


def persistent_dataset(cfg: dict, images: list[str], cache_dir: str):
    """swinssl's pre-training pipeline the MONAI way: its deterministic head and random tail in one
    Compose behind ``PersistentDataset``, which caches the head (up to the first random transform)."""
    from monai.data import PersistentDataset
    from monai.transforms import Compose, Randomizable

    steps = list(ours_pipeline(cfg, None, labels=False).transforms)  # head (uncached) + RandCropsd
    transform = Compose(steps)
    first_random = transform.get_index_of_first(lambda t: isinstance(t, Randomizable))
    assert first_random == len(steps) - 1, f"PersistentDataset would cache {first_random} of {len(steps)} steps"
    return PersistentDataset([item_of(f, modality="CT") for f in images], transform=transform, cache_dir=cache_dir)


def collate_images(outputs: list) -> "torch.Tensor":  # noqa: F821
    import torch

    crops = [c for out in outputs for c in (out if isinstance(out, list) else [out])]
    images = [c["image"].as_tensor() if hasattr(c["image"], "as_tensor") else c["image"] for c in crops]
    x = torch.stack(images)
    if not crops or "label" not in crops[0]:
        return x, None
    labels = [c["label"].as_tensor() if hasattr(c["label"], "as_tensor") else c["label"] for c in crops]
    return x, torch.stack(labels)


# --- workers ---------------------------------------------------------------------------------------


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def loader_worker(spec: dict) -> dict:
    """Crops/s over rounds of all volumes, one thread."""
    import torch

    torch.set_num_threads(1)
    cfg, images = CONFIGS[spec["config"]], spec["images"]
    side = spec["side"]
    if side.startswith("persistent"):  # MONAI's PersistentDataset over swinssl's head + random tail
        dataset = persistent_dataset(cfg, images, spec["persistent_cache"])
        pipeline, items, load = dataset.transform, range(len(dataset)), dataset.__getitem__
    else:
        if side == "reference":
            pipeline, items = reference_pipeline(cfg, labels=False), [{"image": f} for f in images]
        else:
            pipeline = ours_pipeline(cfg, spec["cache"] if "cache" in side else None, labels=False)
            items = [item_of(f, modality="CT") for f in images]
        load = lambda it: pipeline(dict(it))
    if side in ("ours cache build", "persistent build"):  # the one-off build (first pass), in its own process
        pipeline.set_random_state(seed=0)
        start = time.perf_counter()
        crops = sum(len(load(it)) for it in items)
        build_s = time.perf_counter() - start
        return {"build_s": build_s, "crops_per_s": crops / build_s, "peak_rss_gib": _peak_rss_gib()}
    rates = []
    for r in range(spec["repeats"]):
        pipeline.set_random_state(seed=r)
        start = time.perf_counter()
        crops = sum(len(load(it)) for it in items)
        rates.append(crops / (time.perf_counter() - start))
    return {"crops_per_s": statistics.median(rates), "rates": rates, "peak_rss_gib": _peak_rss_gib()}


def _ssl_models(cfg: dict, reference: bool):
    """Our SSL model; for the reference, the same with MONAI's SwinTransformer as encoder (same keys)."""
    import torch

    from swinssl.config import Config, MethodConfig, ModelConfig
    from swinssl.methods import get_method

    torch.manual_seed(0)
    method = MethodConfig()
    model = get_method(method.name).build_model(Config(model=ModelConfig(feature_size=cfg["feature"]), method=method))
    if reference:
        from monai.networks.nets.swin_unetr import SwinTransformer

        ours = model.swinViT.state_dict()
        model.swinViT = SwinTransformer(in_chans=1, embed_dim=cfg["feature"], window_size=(7, 7, 7), patch_size=(2, 2, 2),
                                        depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), spatial_dims=3)
        model.swinViT.load_state_dict(ours)
    return model


def reference_views(x, generator):
    """Per-sample loops, as the reference's rot_rand and aug_rand: rotate, then noise boxes."""
    import torch

    views, rotations, targets = [], [], []
    for _ in range(2):
        rotated, labels = [], []
        for sample in x:
            k = int(torch.randint(0, 4, (1,), generator=generator))
            rotated.append(torch.rot90(sample, k, dims=(-2, -1)))
            labels.append(k)
        target = torch.stack(rotated)
        damaged = target.clone()
        for sample in damaged:
            _, d, h, w = sample.shape
            budget = float(torch.rand(1, generator=generator)) * 0.3 * d * h * w
            covered = 0
            while covered < budget:
                side = [int(torch.randint(max(1, s // 20), s // 4 + 1, (1,), generator=generator)) for s in (d, h, w)]
                start = [int(torch.randint(0, s - b + 1, (1,), generator=generator)) for s, b in zip((d, h, w), side)]
                noise = torch.randn(side, generator=generator)
                noise = (noise - noise.min()) / (noise.max() - noise.min() + 1e-12)
                sample[:, start[0]:start[0] + side[0], start[1]:start[1] + side[1], start[2]:start[2] + side[2]] = noise
                covered += side[0] * side[1] * side[2]
        views.append(damaged)
        targets.append(target)
        rotations.append(torch.tensor(labels))
    return {"views": views, "targets": targets, "rotations": rotations}


def timed_steps(steps: int, cfg: dict, items: list, pipeline, loss_of, optimizer) -> list[float]:
    """Seconds of each training step after one warm-up: load the batch's crops, loss, backward, AdamW."""
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        batch = [items[(step * cfg["batch"] + i) % len(items)] for i in range(cfg["batch"])]
        pipeline.set_random_state(seed=step)
        loss = loss_of(*collate_images([pipeline(dict(it)) for it in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # step 0 warms up
            times.append(time.perf_counter() - start)
    return times


def pretrain_worker(spec: dict) -> dict:
    import torch

    from swinssl.config import MethodConfig
    from swinssl.methods import TaskInput
    from swinssl.methods.base import task_losses, weighted_tasks
    from swinssl.ssl.losses import weighted_sum
    from swinssl.ssl.views import two_views

    cfg, images, reference = CONFIGS[spec["config"]], spec["images"], spec["side"] == "reference"
    model = _ssl_models(cfg, reference).train()
    if reference:
        pipeline, items = reference_pipeline(cfg, labels=False), [{"image": f} for f in images]
    else:
        pipeline, items = ours_pipeline(cfg, spec["cache"], labels=False), [item_of(f, modality="CT") for f in images]
        for it in items:  # the cache is built by an earlier run; building it is not a training step
            pipeline(dict(it))
    method = MethodConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def loss_of(x, _):
        views = (reference_views if reference else two_views)(x, generator)
        out = model(torch.cat(views["views"]))
        weights = weighted_tasks(method)
        return weighted_sum(task_losses(TaskInput(x, views, out, method, generator), weights), weights)

    times = timed_steps(spec["steps"], cfg, items, pipeline, loss_of, optimizer)
    return {"step_s": statistics.median(times), "times": times, "peak_rss_gib": _peak_rss_gib()}


def _segmentation_model(cfg: dict, reference: bool, out_channels: int = 2):
    import torch

    torch.manual_seed(0)
    from swinssl.nn import SwinUNETR

    ours = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=cfg["feature"])
    if not reference:
        return ours
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    model = MonaiSwinUNETR(in_channels=1, out_channels=out_channels, feature_size=cfg["feature"])
    model.load_state_dict(ours.state_dict())
    return model


def finetune_worker(spec: dict) -> dict:
    import torch
    from monai.losses import DiceCELoss

    cfg, pairs, reference = CONFIGS[spec["config"]], spec["pairs"], spec["side"] == "reference"
    model = _segmentation_model(cfg, reference).train()
    if reference:
        pipeline, items = reference_pipeline(cfg, labels=True), [{"image": i, "label": l} for i, l in pairs]
    else:
        pipeline = ours_pipeline(cfg, spec["cache"], labels=True)
        items = [item_of(i, l, modality="CT") for i, l in pairs]
        for it in items:
            pipeline(dict(it))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = timed_steps(spec["steps"], cfg, items, pipeline, lambda x, y: loss_fn(model(x), y), optimizer)
    return {"step_s": statistics.median(times), "times": times, "peak_rss_gib": _peak_rss_gib()}


def predict_worker(spec: dict) -> dict:
    import torch

    cfg, reference = CONFIGS[spec["config"]], spec["side"] == "reference"
    model = _segmentation_model(cfg, reference).eval()
    roi = (cfg["roi"],) * 3
    times = []
    if reference:
        from monai import transforms as T
        from monai.inferers import sliding_window_inference

        pipeline = reference_pipeline(cfg, labels=False, train=False)
        for image in spec["images"]:
            start = time.perf_counter()
            data = pipeline({"image": image})
            with torch.no_grad():
                logits = sliding_window_inference(data["image"][None], roi, 1, model, overlap=0.5, mode="gaussian")
            data["pred"] = logits[0].argmax(0, keepdim=True).float()
            T.Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=True)(data)
            times.append(time.perf_counter() - start)
    else:
        from swinssl.config import ModelConfig
        from swinssl.data.discover import find_dataset
        from swinssl.infer import inference_pipeline, predict_case
        from swinssl.plan import Plan

        plan = Plan(network=ModelConfig(feature_size=cfg["feature"]), preprocess=preprocess_cfg(cfg), out_channels=2,
                    modality="CT")
        pipeline = inference_pipeline(plan, spec["cache"] if spec["side"] == "ours cached" else None)
        cases = [dataclasses.replace(find_dataset(image).cases[0], modality="CT") for image in spec["images"]]
        if spec["side"] == "ours cached":  # a first pass fills the cache, as a first prediction (or training) would
            for case in cases:
                predict_case(model, plan, case, pipeline=pipeline)
        for case in cases:
            start = time.perf_counter()
            predict_case(model, plan, case, pipeline=pipeline)
            times.append(time.perf_counter() - start)
    return {"s_per_volume": statistics.median(times), "times": times, "peak_rss_gib": _peak_rss_gib()}


def parity_worker(spec: dict) -> dict:
    """Max |ours - reference| of the preprocessed volumes (inf where a shape differs), and of the
    SSL outputs and segmentation logits on one input (eval, fp32)."""
    import torch

    from swinssl.data.transforms import inference_transforms

    cfg = CONFIGS[spec["config"]]
    reference, ours = reference_pipeline(cfg, labels=False, train=False), inference_transforms(preprocess_cfg(cfg))
    volumes = 0.0
    for image in spec["images"]:
        a, b = reference({"image": image})["image"], ours(item_of(image, modality="CT"))["image"]
        volumes = max(volumes, (a - b).abs().max().item() if a.shape == b.shape else float("inf"))
    x = torch.rand(1, 1, cfg["roi"], cfg["roi"], cfg["roi"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = _ssl_models(cfg, False).eval()(x), _ssl_models(cfg, True).eval()(x)
        ssl = max((a[k] - b[k]).abs().max().item() for k in a)
        seg = (_segmentation_model(cfg, False).eval()(x) - _segmentation_model(cfg, True).eval()(x)).abs().max().item()
    return {"preprocessed": volumes, "ssl": ssl, "segmentation": seg}


def loader_parity_worker(spec: dict) -> dict:
    """Crops of swinssl's cache and of PersistentDataset for the same seed (both caches built by the
    loader runs): shapes, value range of each, max |difference| (inf where a shape differs)."""
    cfg, images = CONFIGS[spec["config"]], spec["images"]
    ours = ours_pipeline(cfg, spec["cache"], labels=False)
    dataset = persistent_dataset(cfg, images, spec["persistent_cache"])
    ours.set_random_state(seed=0)
    dataset.transform.set_random_state(seed=0)
    out = {"shapes": [], "persistent_shapes": [], "range": [float("inf"), -float("inf")],
           "persistent_range": [float("inf"), -float("inf")], "max_diff": 0.0}
    for i, image in enumerate(images):
        for a, b in zip(ours(item_of(image, modality="CT")), dataset[i], strict=True):
            a, b = a["image"], b["image"]
            for key, crop in (("", a), ("persistent_", b)):
                low, high = out[key + "range"]
                out[key + "shapes"] = sorted(set(map(tuple, out[key + "shapes"])) | {tuple(crop.shape)})
                out[key + "range"] = [min(low, crop.min().item()), max(high, crop.max().item())]
            out["max_diff"] = max(out["max_diff"], (a - b).abs().max().item() if a.shape == b.shape else float("inf"))
    return out


WORKERS = {"loader": loader_worker, "loader_parity": loader_parity_worker, "pretrain": pretrain_worker,
           "finetune": finetune_worker, "predict": predict_worker, "parity": parity_worker}


def run_worker(kind: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if kind == "loader":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {spec.get('side')} {spec.get('config')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- driver ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of volumes (default: ../shared/data)")
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"], choices=sorted(CONFIGS))
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--repeats", type=int, default=3, help="loader rounds over all volumes (median)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up (median)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="swinssl cache folder (default: a new temporary one, so the one-off build is measured)")
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder (the real volumes live in ../shared/data)")
    images, pairs = find_volumes(args.data)
    if not images:
        parser.error(f"--data {args.data}: no volumes found")

    import torch

    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "images": images, "pairs": pairs, "configs": {}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(images)} volumes "
          f"({len(pairs)} labelled) under {args.data}")
    with tempfile.TemporaryDirectory(prefix="swinssl-bench-cache-") as scratch:
        for name in args.configs:
            rows = measure_config(name, args, images, pairs, args.cache or Path(scratch), Path(scratch))
            results["configs"][name] = rows
            print_table(name, rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def measure_config(name: str, args: argparse.Namespace, images: list[str], pairs: list, cache: Path,
                   scratch: Path) -> dict:
    persistent = tempfile.mkdtemp(prefix=f"persistent-{name}-", dir=scratch)  # always fresh: its first pass builds
    base = {"config": name, "images": images, "pairs": pairs, "cache": str(cache / name),
            "persistent_cache": persistent, "repeats": args.repeats, "steps": args.steps}
    rows = {"parity": run_worker("parity", base)}
    for section in args.sections:
        if section == "finetune" and not pairs:
            print(f"  {name}: no labelled volumes, finetune skipped", file=sys.stderr)
            continue
        sides = {"loader": ["reference", "ours", "ours cache build", "ours cached", "persistent build", "persistent"],
                 "predict": ["reference", "ours", "ours cached"]}.get(section, ["reference", "ours"])
        rows[section] = {}
        for side in sides:
            rows[section][side] = run_worker(section, {**base, "side": side})
            print(f"  measured {name} {section} {side}: {rows[section][side]}"[:200], file=sys.stderr)
        if section == "loader":
            rows["loader_parity"] = run_worker("loader_parity", base)
    return rows


def print_table(name: str, rows: dict) -> None:
    cfg = CONFIGS[name]
    print(f"\n{name}: feature {cfg['feature']}, {cfg['roi']}^3 crops at {cfg['spacing']} mm, "
          f"{cfg['batch']} volume(s) x {cfg['crops']} crops per step; max |ours - reference| outputs: "
          f"preprocessed volumes {rows['parity']['preprocessed']:.1e}, SSL {rows['parity']['ssl']:.1e}, "
          f"segmentation {rows['parity']['segmentation']:.1e}")
    header = f"{'measure':<34} {'reference':>10} {'ours':>10} {'speed-up':>9} {'peak GiB ref':>13} {'ours':>6} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    metrics = {"loader": ("crops_per_s", "loader crops/s (1 core)", True), "pretrain": ("step_s", "pre-training s/step", False),
               "finetune": ("step_s", "fine-tuning s/step", False), "predict": ("s_per_volume", "predict s/volume", False)}
    for section, (key, label, higher_better) in metrics.items():
        if section not in rows:
            continue
        ref = rows[section]["reference"]
        apart = ("reference", "ours cache build", "persistent build", "persistent")  # not against the reference
        for side in [s for s in rows[section] if s not in apart]:
            ours = rows[section][side]
            speed = ours[key] / ref[key] if higher_better else ref[key] / ours[key]
            text = label + ("" if side == "ours" else f", {side.removeprefix('ours ')}")
            print(f"{text:<34} {ref[key]:>10.3f} {ours[key]:>10.3f} {speed:>8.2f}x {ref['peak_rss_gib']:>13.2f} "
                  f"{ours['peak_rss_gib']:>6.2f} {ours['peak_rss_gib'] / ref['peak_rss_gib']:>6.2f}")
        if "ours cache build" in rows[section]:
            build = rows[section]["ours cache build"]
            print(f"{'  cache build, once: s, peak GiB':<34} {'':>10} {build['build_s']:>10.1f} {'':>9} {'':>13} "
                  f"{build['peak_rss_gib']:>6.2f}")
        if "persistent" in rows[section]:
            print("  vs MONAI PersistentDataset (same head + RandCropsd): "
                  "reference = PersistentDataset, ours = swinssl cache")
            for text, theirs, mine in (("loader crops/s, first pass (build)", "persistent build", "ours cache build"),
                                       ("loader crops/s, later passes", "persistent", "ours cached")):
                ref, ours = rows[section][theirs], rows[section][mine]
                print(f"{text:<34} {ref[key]:>10.3f} {ours[key]:>10.3f} {ours[key] / ref[key]:>8.2f}x "
                      f"{ref['peak_rss_gib']:>13.2f} {ours['peak_rss_gib']:>6.2f} "
                      f"{ours['peak_rss_gib'] / ref['peak_rss_gib']:>6.2f}")
            p = rows["loader_parity"]
            print(f"  parity, seed 0: crops {' '.join(map(str, p['shapes']))} vs "
                  f"{' '.join(map(str, p['persistent_shapes']))}, values [{p['range'][0]:.3f}, {p['range'][1]:.3f}] "
                  f"vs [{p['persistent_range'][0]:.3f}, {p['persistent_range'][1]:.3f}], max |diff| {p['max_diff']:.1e}")
    print("speed-up = reference time / ours (loader: ours crops/s / reference); ratio = ours / reference peak RSS")


if __name__ == "__main__":
    main()
