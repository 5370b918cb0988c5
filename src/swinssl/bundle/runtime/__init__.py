"""The torch-free predictor a bundle carries (this package imports nothing of swinssl, torch or MONAI).

``windows``: sliding windows with MONAI's Gaussian blending; ``geometry``: reorientation and back, the
resampled grid and linear resampling onto it (MONAI's ``Orientation`` and ``Spacing``); ``intensity``: the
modality's normalisation, its guess, and the foreground box; ``geometry.resample_nearest``: a mask back onto
the file's grid, ties mostly broken as MONAI's float64 steps break them; ``predict.predict_array``: the
whole chain for one volume and a window network.
"""
