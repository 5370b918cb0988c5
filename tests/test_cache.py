"""The preprocessing cache: same crops as without it, rebuilt when a file or a setting changes."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, body_volume, write_nifti

import swinssl.data.cache as cache_module
import swinssl.data.checksums as checksums_module
from swinssl.config import PreprocessConfig
from swinssl.data.cache import CachedPrefixd, from_json, to_json
from swinssl.data.transforms import crop_with_padding, finetune_transforms, inference_transforms, invert, pretrain_transforms
from swinssl.errors import DataError

CFG = PreprocessConfig(roi_size=(16, 16, 16), num_crops=2, spacing=(2.0, 2.0, 2.0))


def item(image, label=None, modality="CT"):
    return {"image": str(image), "label": str(label) if label else None, "modality": modality, "case_id": "x"}


def crops_of(pipeline, data, seed):
    pipeline.set_random_state(seed=seed)
    return [c["image"] for c in pipeline(dict(data))]


def entries(root):
    return sorted(p.name for p in (root / "entries").iterdir()) if (root / "entries").exists() else []


def cached_head(pipeline) -> CachedPrefixd:
    return next(t for t in pipeline.transforms if isinstance(t, CachedPrefixd))


def test_cached_pretrain_crops_equal_uncached_crops_on_build_and_on_reuse(ct_case, tmp_path):
    root = tmp_path / "cache"
    plain, fast = pretrain_transforms(CFG), pretrain_transforms(CFG, cache=root)
    data = item(ct_case[0])
    for seed in (0, 1, 7):  # the first call builds the entry, the others read it
        expected = crops_of(plain, data, seed)
        got = crops_of(fast, data, seed)
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(expected, got))
    assert len(entries(root)) == 1
    head = cached_head(fast)(dict(data))
    assert isinstance(head["image"], np.memmap) and head["modality"] == "CT"  # crops read only their voxels


def test_cached_finetune_crops_and_whole_volumes_equal_uncached(ct_case, tmp_path):
    root = tmp_path / "cache"
    data = item(*ct_case)
    for train in (True, False):
        plain = finetune_transforms(CFG, classes=[0, 1, 2], train=train)
        fast = finetune_transforms(CFG, classes=[0, 1, 2], train=train, cache=root)
        for seed in (3, 4):
            plain.set_random_state(seed=seed)
            fast.set_random_state(seed=seed)
            a, b = plain(dict(data)), fast(dict(data))
            a, b = (a, b) if train else ([a], [b])
            for x, y in zip(a, b):
                for key in ("image", "label"):
                    assert x[key].dtype == y[key].dtype and torch.equal(x[key].as_tensor(), y[key].as_tensor())
                assert torch.allclose(x["image"].affine, y["image"].affine)
    assert len(entries(root)) == 1  # train crops and whole volumes share the head


def test_changed_file_rebuilds_the_entry(tmp_path):
    root = tmp_path / "cache"
    path = tmp_path / "vol.nii.gz"
    image, _ = body_volume(modality="CT")
    write_nifti(path, image)
    fast, plain = pretrain_transforms(CFG, cache=root), pretrain_transforms(CFG)
    crops_of(fast, item(path), 0)
    first = entries(root)
    write_nifti(path, image + 300.0)  # new content under the same name
    assert all(torch.equal(a, b) for a, b in zip(crops_of(fast, item(path), 0), crops_of(plain, item(path), 0)))
    second = entries(root)
    assert len(first) == 1 and len(second) == 2 and set(first) < set(second)


def test_changed_head_setting_rebuilds_and_changed_crop_setting_reuses(ct_case, tmp_path):
    root = tmp_path / "cache"
    data = item(ct_case[0])
    crops_of(pretrain_transforms(CFG, cache=root), data, 0)
    crops_of(pretrain_transforms(PreprocessConfig(roi_size=(8, 8, 8), num_crops=3, spacing=(2.0, 2.0, 2.0)),
                                 cache=root), data, 0)
    assert len(entries(root)) == 1  # crop size and count are not part of the head
    crops_of(pretrain_transforms(PreprocessConfig(roi_size=(16, 16, 16), spacing=(3.0, 3.0, 3.0)), cache=root), data, 0)
    crops_of(pretrain_transforms(PreprocessConfig(roi_size=(16, 16, 16), spacing=(2.0, 2.0, 2.0),
                                                  ct_window=(-500.0, 500.0)), cache=root), data, 0)
    assert len(entries(root)) == 3


def test_unchanged_files_are_hashed_once(ct_case, tmp_path, monkeypatch):
    calls = []
    real = checksums_module.sha256_file
    monkeypatch.setattr(checksums_module, "sha256_file", lambda path: calls.append(str(path)) or real(path))
    root = tmp_path / "cache"
    for seed in range(3):  # fresh pipelines, as separate runs would build
        crops_of(pretrain_transforms(CFG, cache=root), item(ct_case[0]), seed)
    assert calls == [str(ct_case[0])]


def test_bad_file_raises_and_leaves_no_entry(tmp_path):
    root = tmp_path / "cache"
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="bad.nii.gz"):
        pretrain_transforms(CFG, cache=root)(item(bad))
    assert not (root / "entries").exists() or not any((root / "entries").iterdir())  # no entry, no temporary


def test_leftover_temporary_folder_is_not_an_entry(ct_case, tmp_path):
    root = tmp_path / "cache"
    fast = pretrain_transforms(CFG, cache=root)
    key = cached_head(fast).key(item(ct_case[0]))
    half = root / "entries" / f".{key}.killed"  # what a run killed while writing leaves
    half.mkdir(parents=True)
    (half / "image.npy").write_bytes(b"partial")
    assert all(torch.equal(a, b) for a, b in zip(crops_of(fast, item(ct_case[0]), 0),
                                                 crops_of(pretrain_transforms(CFG), item(ct_case[0]), 0)))
    meta = json.loads((root / "entries" / key / "meta.json").read_text())
    assert meta["modality"] == "CT"


def test_unusable_cache_folder_falls_back_to_reading_files(ct_case, tmp_path, caplog):
    root = tmp_path / "not_a_folder"
    root.write_text("a file where the cache folder should be")
    got = crops_of(pretrain_transforms(CFG, cache=root), item(ct_case[0]), 0)
    expected = crops_of(pretrain_transforms(CFG), item(ct_case[0]), 0)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert "not usable" in caplog.text


def test_read_only_cache_is_still_read(ct_case, tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    data = item(ct_case[0])
    expected = crops_of(pretrain_transforms(CFG, cache=root), data, 0)  # builds the entry
    (root / "checksums").rename(tmp_path / "old_checksums")  # the checksum memo must be written again...

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(checksums_module, "atomic_write_text", read_only)  # ...and cannot be
    monkeypatch.setattr(cache_module.np, "save", read_only)
    fast = pretrain_transforms(CFG, cache=root)
    head = cached_head(fast)
    monkeypatch.setattr(head, "head", lambda d: pytest.fail("the head ran: the entry was not read"))
    assert all(torch.equal(a, b) for a, b in zip(crops_of(fast, data, 0), expected))
    assert head.usable and "not usable" not in caplog.text


def test_crop_with_padding_cuts_inside_and_pads_short_axes_centred():
    volume = torch.arange(1 * 6 * 5 * 3, dtype=torch.float32).reshape(1, 6, 5, 3)
    block = crop_with_padding(volume.numpy(), (1, 2, 0), (4, 3, 6))  # the last axis (3) is shorter than 6
    assert block.shape == (1, 4, 3, 6)
    assert torch.equal(block[:, :, :, 1:4], volume[:, 1:5, 2:5, :])
    assert torch.all(block[:, :, :, :1] == 0) and torch.all(block[:, :, :, 4:] == 0)
    assert torch.equal(crop_with_padding(volume, (1, 2, 0), (4, 3, 6)), block)  # tensor and array agree


# --- prediction: cached volumes invert to the file's grid exactly as freshly read ones ---------


def test_metadata_and_trace_values_come_back_with_their_types():
    value = {
        "affine": torch.tensor([[1.5, 0, 0, -99.6], [0, 0.78125, 0, 3.0], [0, 0, 2.0, 1e-9], [0, 0, 0, 1]],
                               dtype=torch.float64),
        "spatial_shape": np.array([256, 256, 25]),
        "pixdim": np.array([1.0, 0.1, 1 / 3], dtype=np.float32),
        "scalar": np.float32(0.1), "flag": np.bool_(True), "count": np.int16(-3),
        "original_channel_dim": float("nan"),
        "padded": ((0, 0), (1, 2)), "cropped": [0, (2, 3)], "descrip": b"\x00ab",
        "nested": {"orig_size": (134, 134, 79), 7: "a key that is not text", "__numpy__": "a key like a tag"},
    }
    back = from_json(json.loads(json.dumps(to_json(value))))
    assert back["affine"].dtype == torch.float64 and torch.equal(back["affine"], value["affine"])
    for key in ("spatial_shape", "pixdim"):
        assert type(back[key]) is np.ndarray and back[key].dtype == value[key].dtype
        assert np.array_equal(back[key], value[key])
    for key in ("scalar", "flag", "count"):
        assert type(back[key]) is type(value[key]) and back[key] == value[key]
    assert math.isnan(back["original_channel_dim"])
    assert back["padded"] == ((0, 0), (1, 2)) and type(back["padded"][1]) is tuple
    assert back["cropped"] == [0, (2, 3)] and back["descrip"] == b"\x00ab"
    assert back["nested"] == value["nested"]
    with pytest.raises(TypeError, match="object"):
        to_json({"reader": object()})


# Left-posterior-superior at 1.5 x 1.5 x 2 mm, resampled to 2 mm: reorientation, resampling and
# foreground cropping all act, and random labels put nearest-neighbour ties everywhere.
@pytest.mark.parametrize("built_by", ["inference", "pretraining"])
def test_cached_inference_volume_inverts_exactly_as_the_uncached_one(ct_case, tmp_path, built_by):
    root = tmp_path / "cache"
    data = item(ct_case[0])
    plain = inference_transforms(CFG)
    expected_item = plain(dict(data))
    labels = torch.randint(0, 3, (1, *expected_item["image"].shape[1:]), generator=torch.Generator().manual_seed(0))
    expected = invert(plain, expected_item, labels.float())
    assert expected.shape[1:] == (40, 36, 28)
    if built_by == "pretraining":  # the heads are the same: inference reads pre-training's entry
        crops_of(pretrain_transforms(CFG, cache=root), data, 0)
    for visit in ("first", "second"):
        fast = inference_transforms(CFG, cache=root)  # a fresh pipeline, as a new process would build
        got_item = fast(dict(data))
        assert torch.equal(got_item["image"].as_tensor(), expected_item["image"].as_tensor()), visit
        assert [op["class"] for op in got_item["image"].applied_operations] == \
            [op["class"] for op in expected_item["image"].applied_operations] == \
            ["Orientation", "SeparableNearestResample", "CropForeground"]
        got = invert(fast, got_item, labels.float())
        assert torch.equal(got.as_tensor(), expected.as_tensor()), visit
        assert torch.equal(got.affine, expected.affine)
        assert np.array_equal(got.meta["spatial_shape"], expected.meta["spatial_shape"])
    assert len(entries(root)) == 1


def test_real_volumes_cached_for_prediction_invert_exactly_as_uncached(tmp_path):
    """NRRD and NIfTI headers of scanners and atlases (../shared/data): their metadata and traces
    survive the entry, so nearest-neighbour inversion of random labels is bitwise the same."""
    volumes = sorted(p for p in SHARED_DATA.rglob("*") if p.name.endswith((".nrrd", ".nii.gz"))
                     and not any(w in p.name for w in ("label", "seg", "prob")))
    if not volumes:
        pytest.skip(f"real sample volumes not found at {SHARED_DATA}")
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 2.0))
    for path in volumes:
        data = item(path, modality="CT" if path.parent.name == "ct" else "MRI")
        plain, fast = inference_transforms(cfg), inference_transforms(cfg, cache=tmp_path / "cache")
        fast(dict(data))  # builds the entry
        expected_item, got_item = plain(dict(data)), inference_transforms(cfg, cache=tmp_path / "cache")(dict(data))
        labels = torch.randint(0, 3, (1, *expected_item["image"].shape[1:]), generator=torch.Generator().manual_seed(1))
        expected, got = invert(plain, expected_item, labels.float()), invert(fast, got_item, labels.float())
        assert torch.equal(got.as_tensor(), expected.as_tensor()), path.name
        assert torch.equal(got.affine, expected.affine), path.name
