"""Deployment bundles: the predictor of a fine-tuned model without torch or MONAI (issue 36, in progress).

``runtime/`` is the bundle's own code, copied into every bundle as it is: it imports numpy (and, as the
bundle grows, scipy, nibabel and onnxruntime) and nothing of swinssl, torch or MONAI. Each step it
reimplements is tested against swinssl's torch/MONAI path on the same input.
"""
