"""Prediction: masks for new volumes, written in each input's own geometry.

``predict(model_source, inputs, out_dir)`` is what ``swinssl predict`` runs. Per case:

1. ``inference_transforms`` of the checkpoint's plan (reorient, resample, normalise by
   modality, crop the foreground) -- the same preprocessing the network was trained on --
   read from the preprocessing cache when the volume is in it (by default the cache the
   model was trained with; see ``prediction_cache``);
2. ``predict_volume``: sliding windows over the preprocessed volume (ROI = the training
   crop, overlap 0.5, Gaussian blending), optionally averaged over the 8 flips of the
   three spatial axes (test-time augmentation); for an ensemble (several models, or a
   cross-validation folder's folds: ``load_ensemble``), each model's softmax is averaged
   (``ensemble_probabilities``);
3. argmax, then ``invert`` (nearest-neighbour) back through the crop, the resampling and
   the reorientation, so the mask has the input file's shape and affine;
4. written atomically as ``<out_dir>/<case_id>.nii.gz`` (or ``.nrrd`` for NRRD inputs with
   ``output_format="same"``), uint8 (uint16 beyond 256 classes).

Modules: ``model`` (loading), ``volume`` (windows, flips, views), ``write`` (files),
``cases`` (options, one case, many cases), ``export`` and ``exported`` (a model's window network
as an ONNX or torch.export file with its plan in the metadata, written and read back: ``predict``
takes such a file for a checkpoint and runs the same steps 1-4 with it).

A bad input (unreadable, truncated, NaN voxels...) is reported on one line and skipped;
``DataError`` is raised only when no mask at all could be written. ``predictions.json``
in ``out_dir`` records input -> output, the model(s) and the options.

Checkpoints are the fine-tuning engine's: ``{"format": "swinssl", "kind": "finetune",
"model": state dict, "plan": swinssl.plan.Plan}``; a run directory stands for its
``checkpoints/best.pt`` (else ``last.pt``, ``swinssl.runs.resolve_checkpoint``).
"""

from swinssl.infer.model import load_ensemble, load_model
from swinssl.infer.exported import ExportedPredictor, is_exported, load_exported
from swinssl.infer.cases import (
    PredictOptions,
    collect_cases,
    ensemble_probabilities,
    inference_pipeline,
    output_names,
    predict,
    predict_case,
    prediction_cache,
)
from swinssl.infer.export import export_predictor
from swinssl.infer.volume import flip_view, flip_views, predict_volume
from swinssl.infer.write import output_suffix, write_mask

__all__ = ["ExportedPredictor", "PredictOptions", "collect_cases", "ensemble_probabilities", "export_predictor", "flip_view", "flip_views",
           "inference_pipeline", "is_exported", "load_ensemble", "load_exported", "load_model",
           "output_names", "output_suffix", "predict", "predict_case", "predict_volume", "prediction_cache",
           "write_mask"]
