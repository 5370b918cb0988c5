"""Typed configuration: dataclasses with defaults, YAML presets, ``key=value`` overrides.

A config is plain data. ``load_config`` starts from the dataclass defaults, applies a
YAML preset (a file path, or a preset name such as ``data/phantom`` looked up in
``configs/``), then command-line overrides like ``preprocess.roi_size=64`` or
``data=PATH`` (short for ``data.path=PATH``). Every key and value is validated:
an unknown key or a wrong type raises ``ConfigError`` naming the key and the
allowed keys or values.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from swinssl.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "configs"

Modality = Literal["CT", "MRI", "auto"]


@dataclass
class DataConfig:
    """Where the volumes are and what they are."""

    path: str = ""  # a folder of volumes, an MSD/nnU-Net dataset.json, or an nnU-Net raw folder
    modality: Modality = "auto"  # used where the dataset does not say; auto: from folder names, then intensities
    num_classes: int = 0  # 0: take from the dataset's labels (or the label values found)
    cache: str = "auto"  # preprocessed-volume cache folder; auto: <train.out>/cache; off: read files every time
    # How cached images are stored (read back as float32 either way). float16 halves the cache, but its
    # rounding reaches 0.79 of a grey level on a real MRI (benchmarks/results/cache_dtype.txt): opt-in
    cache_dtype: Literal["float32", "float16"] = "float32"
    # Pre-training: a volume that cannot be read (or holds NaN/Inf) is skipped and listed in the run's
    # skipped.jsonl; the run stops when more than this share of its training volumes are bad
    max_bad_fraction: float = 0.01


@dataclass
class PreprocessConfig:
    """How a volume becomes network input. Stored with every checkpoint (its plan)."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None  # mm; None keeps each volume's own spacing
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU mapped to [0, 1], clipped
    mri_percentiles: tuple[float, float] = (0.5, 99.5)  # mapped to [0, 1], clipped
    mri_normalization: Literal["percentile", "zscore"] = "percentile"
    crop_foreground: bool = True
    foreground_threshold: float = 0.0  # on the normalised image: voxels above it are foreground
    roi_size: tuple[int, int, int] = (96, 96, 96)
    num_crops: int = 2  # random crops per volume and visit
    # Fine-tuning crops: "classes" centres a crop on a voxel of one class, the foreground classes
    # equally likely (MONAI RandCropByLabelClassesd; nnU-Net samples its foreground crops the same
    # way), so a small organ is trained on as often as a large one; "posneg" centres it on any
    # foreground voxel (RandCropByPosNegLabeld), so organs are seen in proportion to their volume.
    crop_sampling: Literal["classes", "posneg"] = "classes"
    pos_fraction: float = 0.5  # fine-tuning: share of crops centred on a foreground voxel
    augment: bool = True  # fine-tuning: flips, rot90, intensity shift/scale


@dataclass
class ModelConfig:
    """The network (stored in checkpoints as the plan's ``network``). Sizes: tiny 12, small 24, base 48, large 96."""

    feature_size: int = 48
    in_channels: int = 1
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)
    window_size: int = 7
    use_v2: bool = False
    downsample: Literal["merging", "mergingv2"] = "merging"
    dropout_path_rate: float = 0.0
    use_checkpoint: bool = False  # activation checkpointing: less memory, about 1.3x the time
    multiview: bool = False  # SwinMM fine-tuning: two views per crop joined by cross-view attention
    cross_residual: bool = False  # multiview: add the cross-view attention to the features (SwinMM replaces them)
    # multiview: where the two views meet in the cross-view attention (SwinMM Table 7): bottleneck (after
    # encoder10, as SwinMM), intermediate (the skip decoder5 joins: the stage-4 Swin output, 8x feature_size
    # channels at 1/16 of the input), none (no cross-view attention: the views meet only in the losses)
    cross_attention_at: Literal["bottleneck", "intermediate", "none"] = "bottleneck"
    # The encoder variant (swinssl.nn.swin_transformer.ENCODERS): swin, or domain_invariant_swin (SwinFUSE:
    # the domain-invariance module between the patch embedding and the first stage)
    encoder: Literal["swin", "domain_invariant_swin"] = "swin"
    # domain_invariant_swin: a list is the paper's co-attention stack, one layer per entry with that many
    # heads (layer i is feature_size x 2^i wide); an integer is the light module, one shared attention
    # layer with that many heads (swinssl.nn.dim).
    invariance_heads: int | tuple[int, ...] = (3, 6, 12, 24)
    invariance_pool: int = 4  # domain_invariant_swin: keys/values average-pooled by this per axis (memory)
    # Inputs of at most 32 voxels per axis have a one-voxel bottleneck: exact = its instance norm's
    # value there (zero); pad = pad the last axis to 64 (twice the work; what plans written before this key did)
    single_voxel_bottleneck: Literal["exact", "pad"] = "exact"


@dataclass
class MethodConfig:
    """A pre-training method: proxy tasks with their loss weights, and the view maker's settings.
    Methods, tasks and view makers are registered in ``swinssl.methods`` (checked there)."""

    name: str = "swin_unetr"  # swin_unetr, swinmm, swinfuse (checked against swinssl.methods.METHODS)
    views: str = ""  # view maker: cutout (Swin UNETR, SwinFUSE) or masked (SwinMM); "" = the method's own
    # Proxy-task weights (tasks weighted 0 are not trained and get no head): inpaint, rotate,
    # contrast, mutual (masked views), density (domain-invariance module).
    weights: dict[str, float] = field(default_factory=lambda: {"inpaint": 1.0, "rotate": 1.0, "contrast": 1.0})
    temperature: float = 0.5  # NT-Xent
    embed_dim: int = 512  # contrastive head output
    max_cutout: float = 0.3  # cutout views: fraction of the crop cut out per view, drawn from U(0, max_cutout)
    mask_ratio: float = 0.5  # masked views: fraction of the mask_patch^3 cubes set to 0 (the masked fraction)
    mask_patch: int = 16  # masked views: side of the masked cubes in voxels
    zscore_target: bool = False  # inpaint on masked views: reconstruct the per-sample z-scored crop instead
    density_points: int = 256  # density task: token features sampled per stream for the KDE / JSD term


@dataclass
class TrainConfig:
    """The engine: optimisation, devices, logging, checkpoints. Steps are optimiser steps."""

    steps: int = 1000
    batch_size: int = 2  # volumes per device and micro-step; each gives preprocess.num_crops crops
    accumulate: int = 1  # micro-steps per optimiser step
    lr: float = 4e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    clip_grad: float = 1.0  # max gradient norm; 0 disables
    # 64-true: float64, for reference checks (a multi-process run equals one process to 1e-9 only there)
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "64-true"] = "32-true"
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"
    num_workers: int = 2
    val_fraction: float = 0.1  # held-out volumes for the validation loss (at least one when > 0)
    val_every: int = 100
    # Pre-training: the frozen-encoder probe (engine.validate.ProbeTask) on a labelled dataset every probe_every
    # steps, logged as probe_dice beside probe_dice_random (a random encoder of the same plan,
    # measured once per run): the gain of the encoder's features over random ones for that task.
    probe_data: str = ""  # a labelled dataset (dataset.json, nnU-Net raw or labelled folder); "" = no probe
    probe_every: int = 100
    probe_steps: int = 100  # optimiser steps of the probe's head
    log_every: int = 10
    preview_every: int = 100
    checkpoint_every: int = 100
    out: str = "runs"  # run directories are created under it
    name: str = ""  # run directory name; default <method>-<date>-<time>
    # CPU: keep freed memory in the process (runtime.keep_freed_memory): 1.5-2x faster steps for one
    # fixed shape, but resident memory then only grows; a tiny pre-training on real volumes grew
    # past 16 GiB in 40 steps (6 GiB without). Off by default: safe for long runs.
    keep_memory: bool = False
    deterministic: bool = True  # deterministic kernels: same seed + config + machine = same weights
    compile: bool = False  # torch.compile the model: faster steps on GPU after a compile of about a minute
    # A non-finite loss or gradient norm: "stop" (TrainingError, last checkpoint kept) or "skip"
    # the step (no update; stops after 10 skipped steps in a row). 16-mixed gradient overflow is
    # the GradScaler's business: it skips the step and lowers the scale, never counted here.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    timeout_s: int = 1800  # distributed: a collective that waits longer than this fails the run


@dataclass
class FinetuneConfig:
    """Segmentation fine-tuning (``swinssl finetune``): start weights, case subsets, loss, validation."""

    pretrained: str = ""  # a pre-training run directory or checkpoint (any load_pretrained layout); "" = scratch
    # Whose fine-tuning and inference hooks (swinssl.methods): swin_unetr (a plain SwinUNETR), swinmm
    # (model.multiview), swinfuse (model.encoder=domain_invariant_swin), or auto: the one whose network
    # the model is. Recorded in the plan; prediction looks the hooks up by that name.
    method: str = "auto"
    # Adopt the pre-trained plan's orientation, spacing and intensity normalisation (what its encoder
    # saw), saying what changed; false keeps this config's and says how they differ.
    adopt_preprocessing: bool = True
    allow_modality_change: bool = False  # fine-tune an encoder pre-trained on one modality on another
    label_ratio: float = 1.0  # share of the labelled training cases used (a seeded subset, at least one)
    cases: list[str] = field(default_factory=list)  # explicit training case ids; overrides label_ratio
    folds: int = 0  # k-fold cross-validation (0: the dataset's validation split, else train.val_fraction)
    # Which fold is held out, 0 <= fold < folds; "all": train every fold into one folder (fold_0 ...),
    # the models that ``swinssl predict FOLDER`` ensembles.
    fold: int | Literal["all"] = 0
    layer_decay: float = 1.0  # layer-wise LR decay of the encoder: stage i gets lr * decay^(5 - i); 1 = off
    dice_weight: float = 1.0  # DiceCE = dice_weight * Dice + ce_weight * cross-entropy
    ce_weight: float = 1.0
    # multiview: the consistency term between the two views' softmax outputs (SwinMM Table 7): kl, the
    # symmetric KL divergence; cosine, 1 - their cosine similarity per voxel (ssl.losses.cosine_consistency)
    consistency: Literal["kl", "cosine"] = "kl"
    consistency_weight: float = 1.0  # multiview: weight of the consistency term
    # multiview: unlabelled volumes for pseudo-labels: a folder, dataset.json or nnU-Net raw folder, or
    # rest: the training cases of data.path that neither train (label_ratio / cases) nor validate
    unlabeled: str = ""
    unlabeled_weight: float = 1.0  # multiview: weight of the unlabelled crops' loss
    overlap: float = 0.5  # sliding-window overlap in validation
    sw_batch_size: int = 2  # windows per forward pass in validation
    # Networks with the domain-invariance module: the second stream is the crop with up to this
    # fraction cut out (SwinFUSE sec. 2.4, two views per crop); 0: the crop in both, as inference.
    dim_cutout: float = 0.3


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0


# A section given a scalar sets this field: ``data=PATH`` means ``data.path=PATH``.
SHORTHANDS = {"data": "path"}

# Keys that older versions wrote (run folders' config.yaml): read and ignored, with a warning.
RETIRED = {"model.out_channels": "fine-tuning takes the number of classes from the dataset's labels"}


def load_config(preset: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = (),
                cls: type = Config) -> Any:
    """Build a validated config of type ``cls`` from defaults, a preset and overrides.

    ``preset`` may be a list: each later preset sets its keys over the earlier ones, section by
    section (a preset that holds only ``train: {steps: 40}`` changes only that key); a value that
    is itself a mapping (``method.weights``) is replaced whole, as ``method.weights={...}`` is.
    """
    raw: dict[str, Any] = {}
    sources = []
    presets = [preset] if isinstance(preset, (str, Path)) else list(preset or [])
    presets = [p for p in presets if str(p)]  # "" (no preset) means the defaults
    for item in presets:
        path = resolve_preset(item)
        sources.append(str(path))
        for section, values in _read_yaml(path).items():
            if section == "model" and isinstance(values, dict):
                values = legacy_model_fields(values)  # per layer: a later layer's key wins, old name or new
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
    source = " + ".join(sources) or "defaults"
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        if isinstance(raw.get("model"), dict):
            raw["model"] = legacy_model_fields(raw["model"])
    if overrides:
        source = "command line" if source == "defaults" else f"{source} + command line"
    return from_dict(cls, raw, source=source)


def resolve_preset(preset: str | Path) -> Path:
    """A preset is a YAML file path or a name relative to ``configs/`` (``.yaml`` optional)."""
    path = Path(preset)
    candidates = [path, PRESET_DIR / path, PRESET_DIR / path.with_suffix(".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{preset}: no such config file or preset; presets: {', '.join(preset_names())}")


def preset_names() -> list[str]:
    """The presets shipped in ``configs/``, by the name ``--config`` takes (``finetune/tiny``)."""
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(err, 'problem', err)})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value); the value is parsed as YAML (numbers, lists, null, true)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{item!r}: overrides are key=value, e.g. preprocess.roi_size=64")
    if text.strip().lower() in _YAML11_BOOLS:
        return key, text.strip()  # data.cache=off is the text "off"; a bool key reads it as false
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SHORTHANDS and not isinstance(value, dict):
        parts = [parts[0], SHORTHANDS[parts[0]]]
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def legacy_model_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Model keys as configs and plans wrote them before the domain-invariant encoder was a variant of its
    own: ``domain_invariance: true`` is ``encoder: domain_invariant_swin``; ``dim_heads`` and ``dim_pool``
    are ``invariance_heads`` and ``invariance_pool``. Read, never written."""
    out = dict(raw)  # a mapping holds the old key or the new one (load_config maps each layer before merging)
    if "domain_invariance" in out:
        flag = out.pop("domain_invariance")
        out["encoder"] = "domain_invariant_swin" if flag is True else "swin" if flag is False else flag
    for old, new in (("dim_heads", "invariance_heads"), ("dim_pool", "invariance_pool")):
        if old in out:
            out[new] = out.pop(old)
    return out


def from_dict(cls: type, raw: dict[str, Any], source: str = "config", prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from nested dicts, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a section (key: value), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelConfig:
        raw = legacy_model_fields(raw)
    kwargs = {}
    for key, value in raw.items():
        if f"{prefix}{key}" in RETIRED:
            warnings.warn(f"{source}: {prefix}{key} is no longer used ({RETIRED[prefix + key]}); ignored", stacklevel=2)
            continue
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and convert where lossless (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            fail("one of " + ", ".join(map(str, args)))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, source)
        for option in inner:  # the first type that takes the value (int | tuple: 4 stays an int; int | "all")
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                pass
        fail(" or ".join(map(_type_name, args)))
    if origin is tuple:
        if isinstance(value, str) and "," in value:
            value = [yaml.safe_load(v) for v in value.split(",")]
        if len(args) == 2 and args[1] is Ellipsis:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(_coerce(v, args[0], key, source) for v in items)
        if not isinstance(value, (list, tuple)):
            if len(set(args)) == 1 and not isinstance(value, (dict, str)):
                value = [value] * len(args)  # roi_size=96 means (96, 96, 96)
            else:
                fail(f"a list of {len(args)} values")
        if len(value) != len(args):
            fail(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail("a list")
        return [_coerce(v, args[0], key, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return {_coerce(k, args[0], key, source): _coerce(v, args[1], key, source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.lower()]
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 4e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            fail("a string")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug in a dataclass, not user input


# Words YAML 1.1 reads as booleans besides true/false: kept as text in overrides, booleans for bool keys.
_YAML11_BOOLS = {"on": True, "off": False, "yes": True, "no": False, "y": True, "n": False}
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def to_yaml(cfg: Any) -> str:
    """A config as the YAML ``config.yaml`` holds and ``swinssl config show`` prints."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that ``from_dict`` reads back."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    from swinssl.utils import atomic_write_text

    atomic_write_text(path, to_yaml(cfg))
