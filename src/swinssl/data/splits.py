"""Which cases train, validate, stay unlabelled or are held out: the split policy of every stage.

Pure functions of a ``Dataset``, a config section and a seed (the same seed, the same split on
every process and every re-run). Fine-tuning, the probe, the estimate and the studies call them;
a dataset's test split is never among the cases they return for training or validation.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

from swinssl.config import FinetuneConfig
from swinssl.data.discover import Case, Dataset, find_dataset
from swinssl.data.io import read_volume
from swinssl.errors import ConfigError, DataError


REST = "rest"  # finetune.unlabeled: the dataset's own training cases left out of training and validation


def check_fold(ft: FinetuneConfig) -> None:
    """One line naming the key for fold settings that cannot work, before any data is read."""
    if ft.folds < 0 or ft.folds == 1:
        raise ConfigError(f"finetune.folds must be 0 (no k-fold split) or at least 2, got {ft.folds}")
    if ft.fold == "all":
        if not ft.folds:
            raise ConfigError("finetune.fold=all trains every fold: set finetune.folds too, e.g. finetune.folds=5")
    elif not ft.folds and ft.fold != 0:
        raise ConfigError(f"finetune.fold {ft.fold}: hold out a fold of a k-fold split, so set finetune.folds too")
    elif ft.folds and not 0 <= ft.fold < ft.folds:
        raise ConfigError(f"finetune.fold {ft.fold} / finetune.folds {ft.folds}: need 0 <= fold < folds, or fold=all")


def class_indices(dataset: Dataset, num_classes: int = 0) -> list[int]:
    """Classes 0..K-1: from the config, the dataset's label names, or the values in its label files."""
    if num_classes:
        return list(range(num_classes))
    if dataset.labels:
        found = sorted(dataset.labels)
    else:
        values: set[int] = set()
        for case in dataset.labelled:
            values |= set(np.unique(read_volume(case.label).numpy()).astype(int).tolist())
        found = sorted(values)
    if not found or found[-1] < 1:
        raise DataError(f"{dataset.root}: labels hold no foreground class")
    return list(range(found[-1] + 1))


def finetune_split(dataset: Dataset, ft: FinetuneConfig, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(training, validation) labelled cases; never the dataset's test split."""
    check_fold(ft)
    if ft.fold == "all":  # a bug of the caller: finetune() trains each fold as a run of its own
        raise ConfigError("finetune.fold=all: one run holds out one fold; engine.finetune.finetune trains them all")
    labelled = [c for c in dataset.split("training", "validation") if c.label is not None]
    if not labelled:
        raise DataError(f"{dataset.root}: no labelled training cases (fine-tuning needs image + label pairs)")
    if ft.folds:
        if ft.folds > len(labelled):
            raise ConfigError(f"finetune.folds {ft.folds}: more folds than the {len(labelled)} labelled "
                              "training cases; every fold needs a case to validate on")
        order = np.random.default_rng([seed, 12]).permutation(len(labelled))
        held = set(np.array_split(order, ft.folds)[ft.fold].tolist())
        train = [c for i, c in enumerate(labelled) if i not in held]
        val = [c for i, c in enumerate(labelled) if i in held]
    elif any(c.split == "validation" for c in labelled):
        train = [c for c in labelled if c.split == "training"]
        val = [c for c in labelled if c.split == "validation"]
    else:
        train, val = split_cases(labelled, val_fraction, seed)
    return label_subset(train, ft, seed), val


def label_subset(cases: list[Case], ft: FinetuneConfig, seed: int) -> list[Case]:
    """The training cases actually used: ``finetune.cases`` by id, else a seeded ``label_ratio`` share."""
    if ft.cases:
        by_id = {c.case_id: c for c in cases}
        unknown = [c for c in ft.cases if c not in by_id]
        if unknown:
            raise ConfigError(f"finetune.cases: {unknown} are not labelled training cases; "
                              f"available: {', '.join(sorted(by_id))}")
        return [by_id[c] for c in ft.cases]
    if not 0 < ft.label_ratio <= 1:
        raise ConfigError(f"finetune.label_ratio must be in (0, 1], got {ft.label_ratio}")
    n = max(1, round(len(cases) * ft.label_ratio))
    # Nested subsets: the 10% cases are among the 30% cases for one seed, as in data-efficiency studies.
    order = np.random.default_rng([seed, 13]).permutation(len(cases))[:n]
    return [cases[i] for i in sorted(order.tolist())]


def unlabeled_cases(source: str, modality: str, dataset: Dataset, used: list[Case]) -> list[Case]:
    """The training volumes of ``source`` with their labels dropped: semi-supervised training never reads them.

    ``source`` ``rest`` (``REST``): those of ``dataset`` not in ``used`` (the cases that train and
    validate), e.g. the 90% a label ratio of 0.1 leaves out; none left (a ratio of 1) trains on the
    labelled cases alone, with a warning. Otherwise a folder, dataset.json or nnU-Net raw folder.
    """
    if source == REST:
        taken = {c.images for c in used}
        cases = [replace(c, label=None) for c in dataset.split("training", "validation") if c.images not in taken]
        if not cases:
            warnings.warn("finetune.unlabeled=rest: every training case trains or validates; none is left "
                          "unlabelled, so only the labelled cases train", stacklevel=2)
        return cases
    cases = [replace(c, label=None) for c in find_dataset(source, modality).split("training", "validation")]
    if not cases:
        raise DataError(f"{source}: no unlabelled training volumes")
    return cases


def check_modality(pretrained: str | None, cases: str | None, ft: FinetuneConfig) -> None:
    """Refuse an encoder pre-trained on one modality for cases of another, unless allowed."""
    if pretrained and cases and pretrained != cases and not ft.allow_modality_change:
        raise ConfigError(f"finetune.pretrained {ft.pretrained}: pre-trained on {pretrained}, the fine-tuning cases "
                          f"are {cases}; pass finetune.allow_modality_change=true to fine-tune across modalities")


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Held-out volumes for the validation loss: a seeded subset, at least one when asked and possible."""
    if val_fraction <= 0 or len(cases) < 2:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    order = np.random.default_rng([seed, 11]).permutation(len(cases))
    val = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]
