"""Swin UNETR self-supervised pre-training (Tang et al., CVPR 2022, sec. 3.2).

Views ``cutout``: two independent rotations (k x 90 deg) of each crop, each then cut out
(noise boxes, then boxes copied from another crop of the step's batch). Tasks on the encoder's
bottleneck: ``inpaint`` (L1 of the reconstruction against the rotated, un-cut view),
``rotate`` (4-way cross-entropy on token 0), ``contrast`` (NT-Xent between the two views on
token 1, negatives: the step's whole batch, all processes' together); weights in the preset
(``configs/pretrain/swin_unetr.yaml``). Fine-tuning and inference: the plain SwinUNETR.
"""

from swinssl.methods.base import Method

METHOD = Method("swin_unetr", view_maker="cutout")
