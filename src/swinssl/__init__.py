"""swinssl: self-supervised pre-training and fine-tuning of 3D Swin transformers for CT and MRI."""

__version__ = "0.1.0"
