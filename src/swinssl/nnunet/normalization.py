"""``SwinsslNormalization``: nnU-Net's normalisation scheme that reproduces swinssl's pre-training input.

nnU-Net builds a scheme per channel with that channel's entry of the plans'
``foreground_intensity_properties_per_channel``; ``swinssl nnunet plans`` records the pre-training's
setting there under ``swinssl`` (``plans.normalization_record``). The scaling itself is swinssl's
own transform (``swinssl.data.transforms.intensity_normalizer``), so nnU-Net's preprocessed
channel is what swinssl's pipeline gives for the same voxels.

Where nnU-Net differs: it normalises after cropping to the non-zero bounding box and before
resampling (swinssl resamples first). A CT window is voxel-wise, so only the interpolation of the
resampling differs; MRI percentiles and z-scores are statistics of the cropped volume (equal to
swinssl's when the volume has no all-zero border).
"""

from __future__ import annotations

import numpy as np
from monai.utils import convert_to_numpy
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization

from swinssl.data.transforms import intensity_normalizer
from swinssl.nnunet.plans import normalization_setting


class SwinsslNormalization(ImageNormalization):
    # Every voxel is scaled (nothing is masked), so nnU-Net must not assume a zero outside its mask.
    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

    def run(self, image: np.ndarray, seg: np.ndarray | None = None) -> np.ndarray:
        """One channel ``(X, Y, Z)`` scaled as in pre-training."""
        record = self.intensityproperties.get("swinssl")
        if not isinstance(record, dict):
            raise RuntimeError("SwinsslNormalization: the plans record no swinssl setting for this channel "
                               "(foreground_intensity_properties_per_channel[c]['swinssl']); write the plans with "
                               "swinssl nnunet plans")
        cfg, modality = normalization_setting(record)
        scaled = intensity_normalizer(cfg, modality)(image[None].astype(np.float32, copy=False))[0]
        return convert_to_numpy(scaled).astype(self.target_dtype, copy=False)
