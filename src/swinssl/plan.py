"""The plan a checkpoint carries: everything needed to use its weights again.

Written by the training stages, read by fine-tuning (adopting a pre-trained network),
prediction and weight loading; this module is the only one that knows its layout. In a
checkpoint it is plain data (``Plan.to_dict``)::

    {"network": {<ModelConfig fields>, "out_channels": K, "patch_size": 2},
     "preprocess": {<PreprocessConfig fields>},
     "method": {<MethodConfig fields>} (pre-training),
     "finetune_method": "swin_unetr" | "swinmm" | "swinfuse" (fine-tuning: whose hooks predict),
     "labels": {"0": "background", "1": "liver", ...} (fine-tuning),
     "channel_names": [...], "modality": "CT" | "MRI" | None,
     "overlap": float | None (fine-tuning: its sliding-window overlap, prediction's default),
     "cache": str | None, "pretrained": str | None,
     "manifest_sha256": str | None, "package_version": str}

``Plan.from_dict`` validates every section (``CheckpointError`` naming the file and key) and
reads the plans of older checkpoints (missing fields get their defaults; their
``network.out_channels`` is the plan's ``out_channels``). ``architecture_of`` reads only the
architecture a pre-trained plan holds, for adopting it or checking weights against a model.
``plan_difference`` finds where two plans would predict differently (an ensemble needs none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import swinssl
from swinssl.config import MethodConfig, ModelConfig, PreprocessConfig, from_dict, legacy_model_fields, to_dict
from swinssl.errors import CheckpointError, ConfigError

# Architecture fields a pre-trained plan fixes: the encoder's weights only fit this shape. Not the
# input channels: those are the data's, and load_pretrained adapts a pre-trained stem to them.
ARCHITECTURE = ("feature_size", "depths", "num_heads", "window_size", "use_v2", "downsample",
                "encoder", "invariance_heads", "invariance_pool")
# Preprocessing fields that make what a pre-trained encoder saw: its input's grid and intensities.
INPUT_FIELDS = ("orientation", "spacing", "ct_window", "mri_percentiles", "mri_normalization")

# Plan keys that say where a model came from, not what it computes: models that differ only in
# these predict alike (the folds of a cross-validation differ in their data manifests).
PROVENANCE = ("cache", "pretrained", "manifest_sha256", "package_version")
TRAINING_ONLY = ("network.use_checkpoint", "network.dropout_path_rate")  # memory and regularisation in training


@dataclass
class Plan:
    """A checkpoint's plan; see the module docstring for its sections."""

    network: ModelConfig
    preprocess: PreprocessConfig
    out_channels: int | None = None  # classes incl. background of a fine-tuned network
    patch_size: int = 2
    method: MethodConfig | None = None  # the pre-training method
    finetune_method: str | None = None  # whose fine-tuning and inference hooks (swinssl.methods.method_of)
    labels: dict[str, str] = field(default_factory=dict)  # class index (as text) -> name
    channel_names: list[str] = field(default_factory=list)
    modality: str | None = None  # the one modality trained on, else None (mixed or unknown)
    overlap: float | None = None  # fine-tuning's validation sliding-window overlap: prediction's default
    cache: str | None = None  # the preprocessing cache folder of the training
    pretrained: str | None = None  # where a fine-tuning's start weights came from
    manifest_sha256: str | None = None  # of the run's data manifest
    package_version: str = swinssl.__version__

    def network_fields(self) -> dict[str, Any]:
        """The network's constructor fields (``nn.build_network``; method hooks read ``multiview``)."""
        fields = {**to_dict(self.network), "patch_size": self.patch_size}
        if self.out_channels is not None:
            fields["out_channels"] = self.out_channels
        return fields

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"network": self.network_fields(), "preprocess": to_dict(self.preprocess)}
        if self.method is not None:
            out["method"] = to_dict(self.method)
        out.update(finetune_method=self.finetune_method, labels=dict(self.labels),
                   channel_names=list(self.channel_names), modality=self.modality,
                   overlap=self.overlap, cache=self.cache, pretrained=self.pretrained, manifest_sha256=self.manifest_sha256,
                   package_version=self.package_version)
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "checkpoint", needs: tuple[str, ...] = ("network", "preprocess")) -> Plan:
        """A validated plan from a checkpoint's ``plan`` (``CheckpointError`` naming ``source``).

        ``needs``: the sections that must be there (adopting a pre-trained network needs only
        ``network``; missing sections get their defaults)."""
        if not isinstance(raw, Mapping) or not all(isinstance(raw.get(k), Mapping) for k in needs):
            raise CheckpointError(f"{source}: the checkpoint's plan lacks its {' or '.join(map(repr, needs))} section")
        network = dict(raw.get("network") or {})
        out_channels, patch_size = network.pop("out_channels", None), network.pop("patch_size", 2)
        if out_channels is not None:
            # A segmentation network trained before the key existed was trained padding to 64.
            network.setdefault("single_voxel_bottleneck", "pad")
        try:
            model = from_dict(ModelConfig, network, source=source, prefix="plan.network.")
            preprocess = from_dict(PreprocessConfig, dict(raw.get("preprocess") or {}), source=source,
                                   prefix="plan.preprocess.")
            method = (from_dict(MethodConfig, dict(raw["method"]), source=source, prefix="plan.method.")
                      if isinstance(raw.get("method"), Mapping) else None)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        known = {f.name for f in dataclasses.fields(cls)} - {"network", "preprocess", "method", "out_channels",
                                                             "patch_size"}
        extra = {k: raw[k] for k in known if raw.get(k) is not None}
        for key, kind in (("labels", dict), ("channel_names", list)):
            if key in extra and not isinstance(extra[key], kind):
                raise CheckpointError(f"{source}: plan.{key} must be a {kind.__name__}, got {extra[key]!r}")
        if "overlap" in extra and not (isinstance(extra["overlap"], (int, float)) and 0 <= extra["overlap"] < 1):
            raise CheckpointError(f"{source}: plan.overlap must be a number in [0, 1), got {extra['overlap']!r}")
        if "labels" in extra:
            extra["labels"] = {str(k): str(v) for k, v in extra["labels"].items()}
        return cls(network=model, preprocess=preprocess, out_channels=None if out_channels is None else int(out_channels),
                   patch_size=int(patch_size), method=method, **extra)


def plan_difference(a: Plan, b: Plan) -> tuple[str, Any, Any] | None:
    """The first key (dotted, e.g. ``preprocess.spacing``) where ``a`` and ``b`` differ, with its two
    values; None when they differ only in provenance (``PROVENANCE``) or training-only settings."""
    flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
    for key in dict.fromkeys([*flat_a, *flat_b]):
        if key.split(".")[0] in PROVENANCE or key in TRAINING_ONLY:
            continue
        if key == "finetune_method" and None in (flat_a.get(key), flat_b.get(key)):
            continue  # a plan written before the name was recorded: its hooks follow from its network, compared below
        if flat_a.get(key) != flat_b.get(key):
            return key, flat_a.get(key), flat_b.get(key)
    return None


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def architecture_of(raw: Any, source: str = "checkpoint") -> dict[str, Any]:
    """The architecture fields (``ARCHITECTURE``) that a checkpoint's ``plan`` holds, validated;
    fields it does not hold are left out (older or hand-made plans), other keys are ignored."""
    network = raw.get("network") if isinstance(raw, Mapping) else None
    if not isinstance(network, Mapping):
        return {}
    network = legacy_model_fields(dict(network))
    held = {k: network[k] for k in ARCHITECTURE if k in network}
    try:
        model = from_dict(ModelConfig, held, source=source, prefix="plan.network.")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return {k: getattr(model, k) for k in held}


def input_of(raw: Any, source: str = "checkpoint") -> tuple[dict[str, Any], str | None]:
    """(the ``INPUT_FIELDS`` a pre-trained plan's preprocessing holds, validated; its modality):
    what the encoder's input looked like. Empty and None for a checkpoint without a plan."""
    held = raw.get("preprocess") if isinstance(raw, Mapping) else None
    if not isinstance(held, Mapping):
        return {}, None
    held = {k: held[k] for k in INPUT_FIELDS if k in held}
    try:
        preprocess = from_dict(PreprocessConfig, held, source=source, prefix="plan.preprocess.")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    modality = raw.get("modality")
    return {k: getattr(preprocess, k) for k in held}, modality if isinstance(modality, str) else None


def adopt_input(preprocess: PreprocessConfig, pretrained: Mapping[str, Any], source: str,
                adopt: bool = True) -> PreprocessConfig:
    """``preprocess`` with a pre-trained plan's input fields (``input_of``) adopted, saying what
    changed; with ``adopt`` false, ``preprocess`` unchanged and the differences said instead."""
    changes = {k: v for k, v in pretrained.items() if v != getattr(preprocess, k)}
    if not changes:
        return preprocess
    said = ", ".join(f"preprocess.{k} {_plain(getattr(preprocess, k))} -> {_plain(v)}" for k, v in changes.items())
    if not adopt:
        print(f"warning: the encoder of {source} was pre-trained on other input; keeping this config's "
              f"(finetune.adopt_preprocessing=false): {said}")
        return preprocess
    print(f"adopting the preprocessing of the pre-trained plan {source}: {said} "
          "(finetune.adopt_preprocessing=false keeps this config's)")
    return dataclasses.replace(preprocess, **changes)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def adopt_architecture(model: ModelConfig, pretrained: Mapping[str, Any], source: str) -> ModelConfig:
    """``model`` with the architecture fields of a pre-trained plan (``architecture_of``), saying what changed."""
    changes = {k: v for k, v in pretrained.items() if v != getattr(model, k)}
    if changes:
        said = ", ".join(f"{k} {getattr(model, k)} -> {v}" for k, v in changes.items())
        print(f"adopting the network of the pre-trained plan {source}: {said}")
    return dataclasses.replace(model, **changes)
