"""``nnUNetTrainer_SwinUNETR``: nnU-Net's trainer with swinssl's SwinUNETR as the network.

Everything but the network and its optimiser is nnU-Net's: planning, preprocessing, data loading
and augmentation, the training loop, DDP, validation and prediction. Changed:

- the network: swinssl's SwinUNETR with the architecture the plans record (``swinssl nnunet
  plans``), for the plan's input channels and segmentation outputs; any patch size (it pads);
- no deep supervision: SwinUNETR has one output, so ``enable_deep_supervision`` is off (nnU-Net
  then builds a plain Dice + CE loss and no downsampled targets) and switching it is a no-op;
- AdamW at 1e-4 (weight decay 1e-5), linear warm-up over 50 epochs then cosine decay to 0: the
  Swin UNETR fine-tuning recipe (and swinssl's finetune presets). nnU-Net's SGD at 1e-2 with
  momentum 0.99 is tuned for its conv nets and is known to suit Swin transformers poorly;
- ``torch.compile`` only when asked (``nnUNet_compile=1``): nnU-Net compiles by default on GPU,
  which the bridge is not tested with.

Pre-trained weights come through nnU-Net's own ``-pretrained_weights FILE`` with a file written
by ``swinssl nnunet export`` (see ``swinssl.nnunet.export``). ``nnUNetTrainer_SwinUNETR_smoke``
trains 2 iterations of 1 epoch, for checking an installation.
"""

from __future__ import annotations

import math
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from swinssl.nnunet.plans import SCHEME, Pretraining, check_modality, describe, network_from_configuration


def warmup_cosine_lr(base_lr: float, epoch: int, warmup_epochs: int, num_epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based): rising linearly to ``base_lr`` over ``warmup_epochs``,
    then half a cosine down to 0 at ``num_epochs``."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    progress = (epoch - warmup_epochs) / max(1, num_epochs - warmup_epochs)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupCosineLR:
    """Per-epoch schedule in nnU-Net's calling convention: the trainer calls ``step(epoch)`` at the
    start of each epoch (and stores no scheduler state: the epoch alone sets the rate on resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_epochs: int, num_epochs: int):
        self.optimizer, self.base_lr = optimizer, base_lr
        self.warmup_epochs, self.num_epochs = warmup_epochs, num_epochs
        self.step(0)

    def step(self, epoch: int) -> None:
        lr = warmup_cosine_lr(self.base_lr, epoch, self.warmup_epochs, self.num_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> list[float]:
        return self._last_lr


class nnUNetTrainer_SwinUNETR(nnUNetTrainer):
    """nnU-Net training of swinssl's SwinUNETR (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one output: plain loss and targets
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5
        self.warmup_epochs = 50

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # Called in training and by nnU-Net's predictor; deep supervision does not exist here.
        return network_from_configuration(configuration_manager.configuration, num_input_channels, num_output_channels)

    def initialize(self) -> None:
        record = self.configuration_manager.configuration.get("swinssl")
        if record:  # refuse before any work: an encoder of the other modality wastes the run
            check_modality(Pretraining(record.get("pretrained", "?"), record.get("network", {}), None,
                                       record.get("modality")), self.dataset_json.get("channel_names", {}),
                           "the dataset.json of these plans")
        super().initialize()
        for line in self.swinssl_status():
            self.print_to_log_file(line)

    def swinssl_status(self) -> list[str]:
        """What the plans say about the network and its input, as lines for the log."""
        record = self.configuration_manager.configuration.get("swinssl")
        if not record:
            return ["swinssl: these plans record no pre-trained network (default SwinUNETR, feature size 48) and keep "
                    "nnU-Net's normalisation; `swinssl nnunet plans` writes plans for a pre-trained encoder"]
        lines = [f"swinssl: SwinUNETR {record.get('network')} as pre-trained in {record.get('pretrained')}"]
        schemes = list(self.configuration_manager.normalization_schemes)
        pretrained_norm = record.get("normalization")
        if pretrained_norm and schemes == [SCHEME] * len(schemes):
            lines += [f"swinssl: channel {c} normalised as in pre-training: {describe(r)}"
                      for c, r in sorted(pretrained_norm.items())]
        else:
            lines.append(f"swinssl: warning: nnU-Net's normalisation ({', '.join(schemes)}), not the pre-training's")
        return lines

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # SwinUNETR has a single output; nnU-Net calls this around validation

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, self.warmup_epochs, self.num_epochs)

    def _do_i_compile(self) -> bool:
        asked = os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")
        return asked and super()._do_i_compile()


class nnUNetTrainer_SwinUNETR_smoke(nnUNetTrainer_SwinUNETR):
    """Two training iterations and one validation iteration of a single epoch: checks that an
    installation, plans and weights work together; trains no useful model."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.warmup_epochs = 0
