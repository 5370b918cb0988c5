"""``swinssl nnunet export``: a ``-pretrained_weights`` file for ``nnUNetTrainer_SwinUNETR``.

nnU-Net 2.8's ``-pretrained_weights FILE`` is read by ``nnunetv2.run.load_pretrained_weights``, a
function of nnU-Net's training script (no trainer hook): it takes ``FILE["network_weights"]`` and
requires every tensor of the network but the ``.seg_layers.`` to be there with the same name and
shape. It cannot rename keys, adapt a 1-channel stem, fill a decoder a pre-training lacks, or say
what loaded. So the export does that, for the network the trainer will build:

1. the plans written by ``swinssl nnunet plans`` give the architecture, nnU-Net gives the input
   channels and segmentation outputs (its own functions, as the trainer gets them);
2. swinssl's ``load_pretrained`` loads the checkpoint into that network (any layout it reads),
   adapts a 1-channel stem to the plan's channels and reports loaded / missing / adapted /
   mismatched tensors; no encoder tensor loaded, another feature size than the plans', or another
   modality than the dataset's channels are refused with one line naming the file;
3. the complete state dict is written as ``{"network_weights": ..., "swinssl": {report}}``:
   what the checkpoint lacks (the decoder of a pre-training) is the network's own seeded
   initialisation, as a fresh trainer would have it. nnU-Net's loader then loads every tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from swinssl.errors import CheckpointError
from swinssl.nn.load import LoadReport, load_pretrained
from swinssl.nnunet.plans import check_modality, network_fields, network_from_configuration, read_json, read_plans, \
    read_pretraining
from swinssl.plan import ARCHITECTURE
from swinssl.utils import atomic_path, writable_dir


def nnunet_channels(plans: dict, configuration: str, dataset_json: dict) -> tuple[int, int]:
    """(input channels, segmentation outputs) of the network nnU-Net's trainer builds for these plans."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    return (determine_num_input_channels(manager, config, dataset_json),
            manager.get_label_manager(dataset_json).num_segmentation_heads)


def export_for_nnunet(model: str | Path, plans_file: str | Path, out: str | Path, configuration: str = "3d_fullres",
                      seed: int = 0) -> tuple[Path, LoadReport]:
    """Write ``out`` for ``nnUNetv2_train ... -tr nnUNetTrainer_SwinUNETR -p <plans> -pretrained_weights out``
    (see the module docstring); returns it and the load report."""
    plans, config, dataset_json_path = read_plans(plans_file, configuration)
    if not config.get("swinssl"):
        raise CheckpointError(f"{plans_file}: configuration {configuration!r} records no swinssl network; write the "
                              f"plans with swinssl nnunet plans {plans_file} --pretrained {model} and export for those")
    dataset_json = read_json(dataset_json_path, "dataset.json")
    pretraining = read_pretraining(model)
    check_modality(pretraining, dataset_json.get("channel_names") or {}, dataset_json_path)
    _check_architecture(pretraining.source, pretraining.architecture, network_fields(config), plans_file)

    in_channels, out_channels = nnunet_channels(plans, configuration, dataset_json)
    torch.manual_seed(seed)  # the tensors the checkpoint lacks: a reproducible fresh initialisation
    network = network_from_configuration(config, in_channels, out_channels)
    report = load_pretrained(network, pretraining.source)
    out = Path(out)
    writable_dir(out.parent)
    with atomic_path(out, suffix=out.suffix or ".pth") as tmp:
        torch.save({"network_weights": network.state_dict(), "swinssl": _provenance(report, plans_file, configuration)},
                   tmp)
    return out, report


def _check_architecture(source: str, theirs: dict[str, Any], plans_network: dict[str, Any], plans_file) -> None:
    """The checkpoint's encoder must be the one the plans build (else nnU-Net's loader fails later, deep
    in an assertion): feature size first, then the other architecture fields."""
    for key in ("feature_size", *[k for k in ARCHITECTURE if k != "feature_size"]):
        if key in theirs and _plain(theirs[key]) != _plain(plans_network.get(key)):
            raise CheckpointError(f"{source}: {key.replace('_', ' ')} {_plain(theirs[key])}, but the network of "
                                  f"{plans_file} has {_plain(plans_network.get(key))}; write the plans from this "
                                  "checkpoint (swinssl nnunet plans ... --pretrained)")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _provenance(report: LoadReport, plans_file, configuration: str) -> dict[str, Any]:
    return {"source": report.source, "layout": report.layout, "plans": str(plans_file), "configuration": configuration,
            "loaded": report.loaded, "missing": report.missing, "adapted": report.adapted,
            "mismatched": report.mismatched, "unexpected": report.unexpected}
