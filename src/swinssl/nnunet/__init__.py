"""The nnU-Net v2 bridge: fine-tune a swinssl pre-trained Swin encoder inside nnU-Net.

nnU-Net keeps its own machinery (planning, preprocessing, augmentation, training loop, DDP,
prediction); swinssl adds what nnU-Net looks up by name and the files it reads:

- ``install``: shim modules inside nnU-Net's package folder (nnU-Net finds trainers and
  normalisation schemes only there, by class name), each importing from this package;
- ``plans``: a plans file whose configuration records the pre-trained network and normalises
  the images as in pre-training (``SwinsslNormalization``);
- ``export``: a ``-pretrained_weights`` file with the encoder loaded by swinssl's loader;
- ``trainer`` (``nnUNetTrainer_SwinUNETR``) and ``normalization``: the classes the shims import.

Only ``trainer``, ``normalization`` and ``export`` import ``nnunetv2`` (the ``swinssl[nnunet]``
extra); nothing outside this package does.
"""

# The nnU-Net versions the bridge was tested with (the pyproject's `nnunet` extra says the same).
TESTED_NNUNET = (2, 8)
TESTED_RANGE = ">=2.8,<2.9"
