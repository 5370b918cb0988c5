"""``swinssl nnunet plans``: an nnU-Net plans file for fine-tuning a swinssl pre-trained encoder.

From nnU-Net's plans (``nnUNetv2_plan_and_preprocess`` or ``nnUNetv2_plan_experiment``) and a
pre-trained checkpoint, ``write_swinssl_plans`` writes a sibling plans file (default
``nnUNetPlans_swinssl.json``) holding one 3D configuration with:

- ``swinssl``: the pre-trained network's architecture (``nnUNetTrainer_SwinUNETR`` builds it,
  in training and in prediction), the checkpoint, its modality and the normalisation below;
- ``normalization_schemes``: ``SwinsslNormalization`` per channel, with the pre-training's
  setting recorded in the plans' ``foreground_intensity_properties_per_channel[c]["swinssl"]``
  (the only part of the plans nnU-Net hands a normalisation scheme): a CT channel gets the
  pre-training's HU window scaled to [0, 1] and clipped, another channel the pre-training's MRI
  normalisation (0.5-99.5 percentiles to [0, 1], or z-score on non-zero voxels);
- its own ``data_identifier``, so nnU-Net preprocesses into a folder of its own and the
  original plans and their preprocessed data stay as they were.

Refused with one line naming the file: a checkpoint pre-trained on CT for a dataset with a
non-CT channel (or on MRI for a CT channel); a checkpoint without a swinssl plan (the official
Swin UNETR release, MONAI or SwinMM files), whose normalisation is unknown, unless
``keep_normalization`` keeps nnU-Net's; 2D and cascade configurations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from swinssl import __version__
from swinssl.config import ModelConfig, PreprocessConfig, legacy_model_fields
from swinssl.data.discover import read_json_object
from swinssl.errors import CheckpointError, ConfigError, DataError
from swinssl.nn.build import build_network
from swinssl.checkpoint import read_checkpoint
from swinssl.nn.load import renamed_state
from swinssl.plan import architecture_of, input_of
from swinssl.runs import resolve_checkpoint
from swinssl.utils import atomic_write_text

SCHEME = "SwinsslNormalization"  # the class nnU-Net looks up (swinssl.nnunet.normalization)
DEFAULT_PLANS_NAME = "nnUNetPlans_swinssl"


@dataclass
class Pretraining:
    """What a pre-trained checkpoint says about its encoder and its input."""

    source: str
    architecture: dict[str, Any]  # ModelConfig fields of the encoder
    inputs: dict[str, Any] | None  # the plan's INPUT_FIELDS; None: no swinssl plan (normalisation unknown)
    modality: str | None  # CT, MRI, or None (mixed, e.g. SwinFUSE, or unknown)


def read_pretraining(model: str | Path) -> Pretraining:
    """The encoder and input of a checkpoint (or run directory) that ``load_pretrained`` reads."""
    path = resolve_checkpoint(model)
    ckpt = read_checkpoint(path)
    plan = ckpt.get("plan") if isinstance(ckpt.get("plan"), Mapping) else None
    architecture = architecture_of(plan, str(path)) if plan else {}
    if "feature_size" not in architecture:  # a foreign file: read the encoder's sizes from its weights
        architecture = {**encoder_sizes(ckpt, str(path)), **architecture}
    inputs, modality = input_of(plan, str(path)) if plan and isinstance(plan.get("preprocess"), Mapping) else (None, None)
    if plan is not None and modality is None and isinstance(plan.get("modality"), str):
        modality = plan["modality"]
    return Pretraining(str(path), architecture, inputs, modality)


def encoder_sizes(ckpt: Mapping, source: str) -> dict[str, Any]:
    """Feature size, depths and heads of the Swin encoder in a checkpoint without a swinssl plan,
    read from its tensors' shapes (patch embedding, blocks per stage, relative-bias heads)."""
    state = renamed_state(ckpt, source)
    stem = state.get("swinViT.patch_embed.proj.weight")
    if stem is None:
        raise CheckpointError(f"{source}: no Swin encoder weights found (no swinViT.patch_embed.proj.weight)")
    depths, heads = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"swinViT\.layers{stage}\.0\.blocks\.(\d+)\.", k))}
        table = state.get(f"swinViT.layers{stage}.0.blocks.0.attn.relative_position_bias_table")
        if not blocks or table is None:
            raise CheckpointError(f"{source}: the Swin encoder's stage {stage} has no blocks")
        depths.append(max(blocks) + 1)
        heads.append(int(table.shape[1]))
    return {"feature_size": int(stem.shape[0]), "depths": tuple(depths), "num_heads": tuple(heads)}


def channel_modality(name: str) -> str:
    """nnU-Net's channel names: ``CT`` (any case) is CT; every other channel (T1, T2, FLAIR, ADC,
    MRI, ...) is normalised as MRI."""
    return "CT" if name.casefold() == "ct" else "MRI"


def check_modality(pretraining: Pretraining, channel_names: Mapping[str, str], dataset_json: Path | str) -> None:
    """Refuse an encoder pre-trained on one modality for a dataset channel of the other; a mixed
    (or unknown) pre-training fits any channel."""
    if pretraining.modality not in ("CT", "MRI"):
        return
    for index, name in sorted(channel_names.items()):
        if channel_modality(name) != pretraining.modality:
            other = "not CT" if pretraining.modality == "CT" else "CT"
            raise CheckpointError(f"{pretraining.source}: the encoder was pre-trained on {pretraining.modality}, but "
                                  f"channel {index} of {dataset_json} is {name!r} ({other}); use an encoder pre-trained "
                                  "on this modality or on both (SwinFUSE)")


def normalization_record(inputs: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """The per-channel setting ``SwinsslNormalization`` reads from the plans: the pre-training's
    normalisation of ``modality``."""
    cfg = dataclasses.replace(PreprocessConfig(), **{k: v for k, v in inputs.items()
                                                     if k in ("ct_window", "mri_percentiles", "mri_normalization")})
    if modality == "CT":
        return {"modality": "CT", "ct_window": list(cfg.ct_window)}
    if cfg.mri_normalization == "percentile":
        return {"modality": "MRI", "mri_normalization": "percentile", "mri_percentiles": list(cfg.mri_percentiles)}
    return {"modality": "MRI", "mri_normalization": "zscore"}


def normalization_setting(record: Mapping[str, Any]) -> tuple[PreprocessConfig, str]:
    """A recorded setting (``normalization_record``) back as swinssl's config and the modality."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k != "modality"}
    return dataclasses.replace(PreprocessConfig(), **fields), record["modality"]


def describe(record: Mapping[str, Any]) -> str:
    if record["modality"] == "CT":
        low, high = record["ct_window"]
        return f"CT window [{low:g}, {high:g}] HU -> [0, 1], clipped"
    if record["mri_normalization"] == "percentile":
        low, high = record["mri_percentiles"]
        return f"MRI percentiles {low:g}-{high:g} -> [0, 1], clipped"
    return "MRI z-score on non-zero voxels"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object (``data.discover.read_json_object``), saying which file is missing."""
    if not Path(path).is_file():
        raise DataError(f"{path}: {what} not found")
    return read_json_object(Path(path))


def read_plans(plans_file: str | Path, configuration: str) -> tuple[dict, dict, Path]:
    """nnU-Net's plans, the named configuration (inheritance resolved) and the dataset.json beside them."""
    plans_file = Path(plans_file)
    plans = read_json(plans_file, "nnU-Net plans")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or "foreground_intensity_properties_per_channel" not in plans:
        raise DataError(f"{plans_file}: not an nnU-Net v2 plans file (no configurations or intensity properties)")
    if configuration not in configurations:
        raise ConfigError(f"{plans_file}: no configuration {configuration!r}; it has {', '.join(configurations)}")
    config = resolved_configuration(configurations, configuration)
    if len(config.get("patch_size", ())) != 3:
        raise ConfigError(f"{plans_file}: configuration {configuration!r} is not 3D; SwinUNETR needs a 3D one "
                          "(3d_fullres or 3d_lowres)")
    if config.get("previous_stage"):
        raise ConfigError(f"{plans_file}: configuration {configuration!r} is a cascade stage; the bridge supports "
                          "single-stage 3D configurations (3d_fullres, 3d_lowres)")
    return plans, config, plans_file.with_name("dataset.json")


def resolved_configuration(configurations: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A configuration with what it ``inherits_from`` filled in (nnU-Net's plans may inherit)."""
    config = copy.deepcopy(dict(configurations[name]))
    parent = config.pop("inherits_from", None)
    if parent is None:
        return config
    return {**resolved_configuration(configurations, parent), **config}


def write_swinssl_plans(plans_file: str | Path, model: str | Path, configuration: str = "3d_fullres",
                        plans_name: str = DEFAULT_PLANS_NAME, keep_normalization: bool = False) -> tuple[Path, list[str]]:
    """Write ``<plans_name>.json`` beside ``plans_file`` (see the module docstring); returns the
    file and lines that say what it holds."""
    plans, config, dataset_json = read_plans(plans_file, configuration)
    channel_names = read_json(dataset_json, "dataset.json").get("channel_names") or {}
    if not channel_names:
        raise DataError(f"{dataset_json}: no channel_names")
    pretraining = read_pretraining(model)
    check_modality(pretraining, channel_names, dataset_json)
    if pretraining.inputs is None and not keep_normalization:
        raise CheckpointError(f"{pretraining.source}: the checkpoint carries no swinssl plan, so the normalisation its "
                              "encoder was pre-trained with is unknown; pass --keep-normalization to keep nnU-Net's")

    said = [f"network: SwinUNETR {_plain(pretraining.architecture)} (from {pretraining.source})"]
    new = copy.deepcopy(plans)
    record: dict[str, Any] = {"network": _plain(pretraining.architecture), "pretrained": pretraining.source,
                              "modality": pretraining.modality, "package_version": __version__}
    if keep_normalization:
        said.append(f"normalisation: nnU-Net's {', '.join(config['normalization_schemes'])} (kept; the encoder was "
                    "pre-trained on other input)")
    else:
        records = {}
        for index, name in sorted(channel_names.items(), key=lambda kv: int(kv[0])):
            records[index] = normalization_record(pretraining.inputs, channel_modality(name))
            new["foreground_intensity_properties_per_channel"].setdefault(index, {})["swinssl"] = records[index]
            said.append(f"normalisation of channel {index} ({name}): {SCHEME}, {describe(records[index])}, as in "
                        "pre-training")
        config["normalization_schemes"] = [SCHEME] * len(records)
        config["use_mask_for_norm"] = [False] * len(records)  # SwinsslNormalization masks nothing
        record["normalization"] = records
    said += _input_notes(pretraining, config)

    config.pop("next_stage", None)  # the cascade's later stage is not in these plans
    config["data_identifier"] = f"{plans_name}_{configuration}"
    config["swinssl"] = record
    new.update(plans_name=plans_name, configurations={configuration: config})
    out = Path(plans_file).with_name(f"{plans_name}.json")
    atomic_write_text(out, json.dumps(new, indent=4) + "\n")
    return out, said


def _input_notes(pretraining: Pretraining, config: Mapping[str, Any]) -> list[str]:
    """The geometry nnU-Net keeps its own: said, so that a difference is known."""
    spacing = (pretraining.inputs or {}).get("spacing")
    if spacing is None:
        return []
    return [f"note: pre-trained at spacing {list(spacing)} mm (x, y, z after reorienting to "
            f"{pretraining.inputs.get('orientation', 'RAS')}); nnU-Net resamples to {config.get('spacing')} mm in "
            "its own axis order and keeps its geometry"]


def _plain(architecture: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in architecture.items()}


def network_fields(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of the network a configuration records (defaults where it records none)."""
    recorded = legacy_model_fields((configuration.get("swinssl") or {}).get("network") or {})
    return {**dataclasses.asdict(ModelConfig()), **recorded}


def network_from_configuration(configuration: Mapping[str, Any], in_channels: int, out_channels: int):
    """The SwinUNETR a configuration records, for nnU-Net's input channels and outputs (the trainer's
    network, in training and prediction, and the one ``swinssl nnunet export`` fills)."""
    fields = network_fields(configuration)
    if fields.get("multiview"):
        raise ConfigError("the nnU-Net trainer builds a single-view SwinUNETR; SwinMM's multi-view network is not "
                          "supported inside nnU-Net")
    return build_network({**fields, "in_channels": in_channels}, out_channels=out_channels)
