"""nnU-Net trainers that swinssl adds: ``nnUNetTrainer_SwinUNETR`` (swinssl's SwinUNETR as the
network, its smoke variant) and ``nnUNetTrainer_short`` (nnU-Net's own trainer on a short schedule).

``nnUNetTrainer_SwinUNETR``: everything but the network and its optimiser is nnU-Net's: planning,
preprocessing, data loading and augmentation, the training loop, DDP, validation and prediction.
Changed:

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
by ``swinssl nnunet export`` (see ``swinssl.nnunet.export``); the log says how many encoder tensors
they set (``loaded N of M encoder tensors``). ``nnUNetTrainer_SwinUNETR_smoke`` checks an
installation in minutes: 2 iterations of 1 epoch at batch 1 on patches of at most
``SMOKE_PATCH`` voxels a side, no mirroring, and no final validation.

``nnUNetTrainer_short``: nnU-Net's default trainer (its network, deep-supervised Dice + CE loss, SGD
with the poly schedule, augmentation, final validation) with only the schedule shortened, read from
the environment (``SHORT_SCHEDULE_ENV``), for the nnU-Net control arm of swinssl's studies
(``swinssl.nnunet.arm``).
"""

from __future__ import annotations

import math
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from swinssl.errors import ConfigError
from swinssl.nnunet import SHORT_SCHEDULE, SHORT_SCHEDULE_ENV
from swinssl.nnunet.plans import SCHEME, Pretraining, check_modality, describe, network_from_configuration

SMOKE_PATCH = 64  # voxels a side at most for the smoke trainer (SwinUNETR pads to a multiple of 32)


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
        # The encoder as built: on_train_start tells what -pretrained_weights (loaded in between) changed.
        self.random_encoder = {k: v.detach().clone() for k, v in encoder_parameters(self.network).items()}

    def on_train_start(self) -> None:
        super().on_train_start()
        if getattr(self, "random_encoder", None) is not None:
            self.print_to_log_file(encoder_load_line(self.random_encoder, encoder_parameters(self.network)))
            self.random_encoder = None  # the copy is no longer needed

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


def encoder_parameters(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's (``swinViT.``) parameters of a network, unwrapped from DDP and ``torch.compile``."""
    module = getattr(network, "module", network)
    module = getattr(module, "_orig_mod", module)
    return {k: v for k, v in module.named_parameters() if k.startswith("swinViT.")}


def encoder_load_line(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> str:
    """How many encoder tensors hold other values than the network was built with: those nnU-Net's
    ``-pretrained_weights`` (or a checkpoint it resumed) set."""
    changed = sum(not torch.equal(before[k], v.detach().to(before[k].device)) for k, v in after.items())
    line = f"swinssl: loaded {changed} of {len(after)} encoder tensors"
    if not changed:
        line += " (none: no -pretrained_weights given, so the encoder starts at random)"
    return line


class nnUNetTrainer_SwinUNETR_smoke(nnUNetTrainer_SwinUNETR):
    """Checks that an installation, plans and weights work together, in minutes and little memory:
    two training iterations and one validation iteration of a single epoch, batch 1, patches of at
    most ``SMOKE_PATCH`` a side, no mirroring, no final validation. Trains no useful model. The
    plans saved with its output record the small patch, so nnU-Net's prediction uses it too."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.warmup_epochs = 0
        patch = [min(int(side), SMOKE_PATCH) for side in self.configuration_manager.patch_size]
        # The configuration the trainer reads, and the plans it saves beside its checkpoints (what
        # nnUNetv2_predict reads): a configuration may inherit its patch, so both are set explicitly.
        for planned in (self.configuration_manager.configuration, self.plans_manager.plans["configurations"][configuration]):
            planned["batch_size"] = 1
            planned["patch_size"] = patch

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch, None

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("swinssl smoke: nnU-Net's final validation skipped (train nnUNetTrainer_SwinUNETR "
                               "for a model worth validating)")


class nnUNetTrainer_short(nnUNetTrainer):
    """nnU-Net's default trainer with only its schedule shortened, so that nnU-Net runs on a CPU:
    nnU-Net's 1000 epochs x 250 iterations take days there. ``num_epochs``,
    ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` come from the environment
    variables ``SWINSSL_NNUNET_EPOCHS``, ``SWINSSL_NNUNET_ITERATIONS`` and
    ``SWINSSL_NNUNET_VAL_ITERATIONS`` (``SHORT_SCHEDULE_ENV``), each a positive integer, default
    ``SHORT_SCHEDULE`` (10 x 25, 5 validation iterations). The poly learning-rate schedule spans
    the shortened epochs, as nnU-Net's spans its 1000.

    Everything else is nnU-Net's: network, deep supervision, loss, SGD, augmentation, final
    validation. Only checkpointing follows the schedule: ``checkpoint_latest.pth`` every 5% of the
    epochs, at most every epoch (nnU-Net: every 50 of 1000), so that a stopped short run continues
    (``--c``) instead of starting over.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = short_schedule()
        self.num_epochs = schedule["num_epochs"]
        self.num_iterations_per_epoch = schedule["num_iterations_per_epoch"]
        self.num_val_iterations_per_epoch = schedule["num_val_iterations_per_epoch"]
        self.save_every = max(1, round(self.num_epochs * 50 / 1000))


def short_schedule(environ: dict[str, str] | None = None) -> dict[str, int]:
    """``nnUNetTrainer_short``'s schedule: ``SHORT_SCHEDULE`` overridden by the environment."""
    environ = os.environ if environ is None else environ
    schedule = dict(SHORT_SCHEDULE)
    for attribute, variable in SHORT_SCHEDULE_ENV.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        try:
            schedule[attribute] = int(text)
        except ValueError:
            schedule[attribute] = 0
        if schedule[attribute] < 1:
            raise ConfigError(f"{variable}={text!r}: expected a positive integer")
    return schedule
