"""The nnU-Net v2 bridge: fine-tune a swinssl pre-trained Swin encoder inside nnU-Net.

nnU-Net keeps its own machinery (planning, preprocessing, augmentation, training loop, DDP,
prediction); swinssl adds what nnU-Net looks up by name and the files it reads:

- ``install``: shim modules inside nnU-Net's package folder (nnU-Net finds trainers and
  normalisation schemes only there, by class name), each importing from this package;
- ``plans``: a plans file whose configuration records the pre-trained network and normalises
  the images as in pre-training (``SwinsslNormalization``);
- ``export``: a ``-pretrained_weights`` file with the encoder loaded by swinssl's loader;
- ``trainer`` (``nnUNetTrainer_SwinUNETR``) and ``normalization``: the classes the shims import;
- ``arm``: the control arm of swinssl's studies, nnU-Net's own plans, network and trainer
  (``nnUNetTrainer_short``: nnU-Net's trainer on a CPU-sized schedule) trained on the cases swinssl
  chose, each step one of nnU-Net's commands in a subprocess.

Only ``trainer``, ``normalization`` and ``export`` import ``nnunetv2`` (the ``swinssl[nnunet]``
extra); nothing outside this package does.
"""

# The nnU-Net versions the bridge was tested with (the pyproject's `nnunet` extra says the same).
TESTED_NNUNET = (2, 8)
TESTED_RANGE = ">=2.8,<2.9"

# nnUNetTrainer_short's schedule (trainer attribute -> environment variable) and its CPU-sized default:
# 250 training iterations in all. On two CPU cores and 64^3 phantoms (nnU-Net plans 64^3 patches at
# batch 2) a training iteration takes about 6 s, so an epoch about 2.5 minutes, the run about 25.
SHORT_SCHEDULE_ENV = {"num_epochs": "SWINSSL_NNUNET_EPOCHS", "num_iterations_per_epoch": "SWINSSL_NNUNET_ITERATIONS",
                      "num_val_iterations_per_epoch": "SWINSSL_NNUNET_VAL_ITERATIONS"}
SHORT_SCHEDULE = {"num_epochs": 10, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 5}
