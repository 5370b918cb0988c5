"""Finding volumes: a folder, an MSD ``dataset.json``, or an nnU-Net raw dataset.

Every layout becomes a ``Dataset`` of ``Case`` records: the image file(s) of a
case (one per channel for nnU-Net, one file otherwise), its label if any, its
modality tag (``CT``/``MRI``, or ``None`` when nothing says) and its split.
Nothing is decoded here; ``swinssl.data.io`` reads and checks the files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from swinssl.errors import DataError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_TOKENS = {"label", "labels", "seg", "segmentation", "mask", "labelmap"}
IMAGE_TOKENS = {"image", "img", "0000"}  # stripped from an image's name before pairing it with a label
CT_TOKENS = {"ct"}
MRI_TOKENS = {"mri", "mr", "t1", "t1c", "t1w", "t1ce", "t2", "t2w", "flair", "dwi", "adc", "pd"}


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one path per channel file (a DICOM series is a folder)
    label: Path | None = None
    modality: str | None = None  # "CT", "MRI", or None: decided from intensities when loaded
    split: str = "training"  # training | validation | test


@dataclass
class Dataset:
    root: Path
    layout: str  # folder | msd | nnunet
    cases: list[Case]
    labels: dict[int, str] = field(default_factory=dict)  # class index -> name; empty when unknown
    channel_names: list[str] = field(default_factory=list)

    def split(self, *names: str) -> list[Case]:
        return [c for c in self.cases if c.split in names]

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]


def find_dataset(path: str | Path, modality: str = "auto") -> Dataset:
    """Discover the volumes under ``path`` (folder, dataset.json, or nnU-Net raw folder).

    ``modality`` (CT, MRI or auto) tags cases that the layout itself does not tag.
    Raises ``DataError`` naming the path for empty folders, malformed dataset files
    and entries pointing to missing files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".json":
        dataset = _from_dataset_json(path)
    elif path.is_dir() and (path / "dataset.json").is_file():
        dataset = _from_dataset_json(path / "dataset.json")
    elif path.is_file():
        if not is_volume_file(path):
            raise DataError(f"{path}: not a volume file (expected one of {', '.join(VOLUME_SUFFIXES)}) or a dataset.json")
        dataset = Dataset(path.parent, "folder", [Case(_case_id(path), (path,), None, _modality_hint(path, path.parent))])
    else:
        dataset = _from_folder(path)
    if not dataset.cases:
        raise DataError(f"{path}: no volumes found (looked for {', '.join(VOLUME_SUFFIXES)} files and DICOM series)")
    if modality != "auto":
        dataset.cases = [c if c.modality else replace(c, modality=modality) for c in dataset.cases]
    return dataset


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(VOLUME_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    if path.name.startswith("."):  # hidden files (e.g. macOS ._ resource forks) are never data
        return False
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"  # DICOM part 10 preamble
    except OSError:
        return False


# --- folder of volumes --------------------------------------------------------------------------


def _from_folder(root: Path) -> Dataset:
    volumes: list[Path] = []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())
        volumes += [p for p in files if is_volume_file(p)]
        if any(is_dicom_file(p) for p in files):
            volumes.append(folder)  # a DICOM series: the folder is the volume
    images, labels = [], []
    for vol in volumes:
        (labels if _is_label_name(vol) else images).append(vol)
    pairs = _pair_labels(images, labels)
    unmatched = [lab for lab in labels if lab not in pairs.values()]
    cases = [Case(_case_id(img), (img,), pairs.get(img), _modality_hint(img, root)) for img in images + unmatched]
    return Dataset(root, "folder", sorted(cases, key=lambda c: str(c.images[0])))


def _tokens(path: Path) -> list[str]:
    return [t for t in re.split(r"[_\-. ]+", volume_stem(path).lower()) if t]


def volume_stem(path: Path) -> str:
    """The file name without its volume suffix (``.nii.gz`` is one suffix); nothing else is stripped."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_label_name(path: Path) -> bool:
    tokens = _tokens(path)
    in_label_dir = any(part.lower().startswith(("labels", "masks", "segmentations")) for part in path.parent.parts[-1:])
    return in_label_dir or bool(tokens and tokens[-1] in LABEL_TOKENS)


def _pair_labels(images: list[Path], labels: list[Path]) -> dict[Path, Path]:
    """Match each label to the image whose name is the longest prefix of the label's name.

    ``lung1_label`` pairs with ``lung1_image``, ``itk_t1_tissue_seg`` with ``itk_t1``,
    ``labels/case_01`` with ``images/case_01``.
    """
    # Images by their first name token: a label's match starts with the label's first token, so each
    # label compares with a handful of images, not all of a corpus's.
    by_first: dict[str, list[tuple[Path, list[str]]]] = {}
    for img in images:
        img_tokens = [t for t in _tokens(img) if t not in IMAGE_TOKENS]
        if img_tokens:
            by_first.setdefault(img_tokens[0], []).append((img, img_tokens))
    pairs: dict[Path, Path] = {}
    for lab in labels:
        lab_tokens = _tokens(lab)
        if lab_tokens and lab_tokens[-1] in LABEL_TOKENS:
            lab_tokens = lab_tokens[:-1]
        best, best_len = None, 0
        for img, img_tokens in by_first.get(lab_tokens[0], []) if lab_tokens else []:
            if img in pairs or not _same_place(img, lab):
                continue
            n = len(img_tokens)
            if n and lab_tokens[:n] == img_tokens and n > best_len:
                best, best_len = img, n
        if best is not None:
            pairs[best] = lab
    return pairs


def _same_place(image: Path, label: Path) -> bool:
    """Same folder, or sibling folders such as images*/x with labels*/x (or masks*/x)."""
    return image.parent == label.parent or image.parent.parent == label.parent.parent


def _case_id(path: Path) -> str:
    tokens = re.split(r"[_]+", volume_stem(path))
    if tokens and tokens[-1].lower() in IMAGE_TOKENS and len(tokens) > 1:
        tokens = tokens[:-1]
    return "_".join(tokens)


def _modality_hint(path: Path, root: Path) -> str | None:
    """CT or MRI when the file or one of its folders inside ``root`` says so by name; else None."""
    words = set(_tokens(path))
    for part in path.parent.relative_to(root).parts:  # folders above the dataset say nothing about it
        words |= set(re.split(r"[_\-. ]+", part.lower()))
    is_ct, is_mri = bool(words & CT_TOKENS), bool(words & MRI_TOKENS)
    if is_ct != is_mri:
        return "CT" if is_ct else "MRI"
    return None


# --- dataset.json: MSD and nnU-Net --------------------------------------------------------------


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def _from_dataset_json(path: Path) -> Dataset:
    data = read_json_object(path)
    if "channel_names" in data:
        return _from_nnunet(path, data)
    if "training" in data or "test" in data or "validation" in data:
        return _from_msd(path, data)
    raise DataError(
        f"{path}: not an MSD dataset.json (needs 'training') nor an nnU-Net one (needs 'channel_names')"
    )


def _modality_of(names: list[str]) -> str | None:
    """Dataset-level modality from channel names: all CT -> CT; any MR sequence -> MRI."""
    upper = [n.upper() for n in names]
    if upper and all(n == "CT" for n in upper):
        return "CT"
    if upper and not any(n == "CT" for n in upper):
        return "MRI"
    return None  # mixed CT + MR channels: left for the config to say


def _labels_msd(path: Path, labels: object) -> dict[int, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise DataError(f"{path}: 'labels' must map class indices to names")
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise DataError(f"{path}: 'labels' keys must be class indices like \"0\", got {list(labels)}") from None


def _resolve(root: Path, entry: object, path: Path, where: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{path}: {where} must be a file path, got {entry!r}")
    file = (root / entry).resolve() if not Path(entry).is_absolute() else Path(entry)
    if not Path(entry).is_absolute() and not file.is_relative_to(root.resolve()):
        raise DataError(f"{path}: {where} '{entry}' points outside the dataset folder {root}")
    if not file.exists():
        raise DataError(f"{path}: {where} '{entry}' does not exist ({file})")
    return file


def _from_msd(path: Path, data: dict) -> Dataset:
    root = path.parent
    modalities = data.get("modality", {})
    if not isinstance(modalities, dict):
        raise DataError(f"{path}: 'modality' must map channel indices to names, e.g. {{\"0\": \"CT\"}}")
    channel_names = [str(modalities[k]) for k in sorted(modalities, key=lambda k: int(k))] if modalities else []
    modality = _modality_of(channel_names)
    cases = []
    for split in ("training", "validation", "test"):
        entries = data.get(split, [])
        if not isinstance(entries, list):
            raise DataError(f"{path}: '{split}' must be a list")
        for i, entry in enumerate(entries):
            where = f"{split}[{i}]"
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or "image" not in entry:
                raise DataError(f"{path}: {where} must have an 'image' key")
            images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            files = tuple(_resolve(root, img, path, f"{where}.image") for img in images)
            label = _resolve(root, entry["label"], path, f"{where}.label") if entry.get("label") else None
            if split == "training" and label is None:
                raise DataError(f"{path}: {where} has no 'label' (training entries need one)")
            tag = entry.get("modality", modality)
            if tag is not None and str(tag).upper() not in ("CT", "MRI", "MR"):
                tag = _modality_of([str(tag)])
            tag = "MRI" if tag and str(tag).upper() == "MR" else (str(tag).upper() if tag else None)
            cases.append(Case(_case_id(files[0]), files, label, tag, split))
    return Dataset(root, "msd", cases, _labels_msd(path, data.get("labels")), channel_names)


def _from_nnunet(path: Path, data: dict) -> Dataset:
    root = path.parent
    names = data["channel_names"]
    if not isinstance(names, dict) or not names:
        raise DataError(f"{path}: 'channel_names' must map channel indices to names, e.g. {{\"0\": \"CT\"}}")
    channel_names = [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
    ending = data.get("file_ending", ".nii.gz")
    labels = data.get("labels", {})
    if not isinstance(labels, dict):
        raise DataError(f"{path}: 'labels' must map names to class indices")
    try:
        label_map = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' values must be class indices (region-based labels are not supported)") from None
    modality = _modality_of(channel_names)
    cases = []
    for images_dir, labels_dir, split in (("imagesTr", "labelsTr", "training"), ("imagesTs", "labelsTs", "test")):
        folder = root / images_dir
        if not folder.is_dir():
            if split == "training":
                raise DataError(f"{path}: nnU-Net dataset has no {images_dir}/ folder")
            continue
        ids = sorted({f.name[: -len(ending) - 5] for f in folder.glob(f"*_0000{ending}")})
        for case_id in ids:
            files = tuple(folder / f"{case_id}_{c:04d}{ending}" for c in range(len(channel_names)))
            for f in files:
                if not f.exists():
                    raise DataError(f"{f}: missing channel file ({len(channel_names)} channels declared in {path})")
            label = root / labels_dir / f"{case_id}{ending}"
            if split == "training" and not label.exists():
                raise DataError(f"{label}: missing label for training case {case_id}")
            cases.append(Case(case_id, files, label if label.exists() else None, modality, split))
    expected = data.get("numTraining")
    found = sum(c.split == "training" for c in cases)
    if isinstance(expected, int) and expected != found:
        raise DataError(f"{path}: numTraining is {expected} but {found} training cases were found in imagesTr/")
    return Dataset(root, "nnunet", cases, label_map, channel_names)
