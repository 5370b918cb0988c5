"""The torch-free predictor a bundle carries (this package imports nothing of swinssl, torch or MONAI).

``windows``: sliding windows with MONAI's Gaussian blending; ``geometry``: reorientation and back, the
resampled grid and linear resampling onto it (MONAI's ``Orientation`` and ``Spacing``); ``intensity``: the
modality's normalisation, its guess, and the foreground box.
"""
