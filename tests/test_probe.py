"""The frozen-encoder probe: no path from the image to its output, deterministic per seed, a random
baseline beside every checkpoint (tiny phantoms, CPU)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.config import load_config
from swinssl.engine.probe import probe
from swinssl.nn.heads import FrozenEncoderProbe
from swinssl.nn import build_encoder

TINY = ["model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1", "train.val_fraction=0.25",
        "train.lr=1e-2", "finetune.overlap=0"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from swinssl.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, cases=6, size=32, seed=3)
    return out / "dataset.json"


class ConstantEncoder(torch.nn.Module):
    """Feature maps that ignore the image (a learnable map, so the probe has something to freeze)."""

    def __init__(self, feature_size: int = 12):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.feature_size = feature_size

    def forward(self, x, normalize=True):
        b, _, d, h, w = x.shape
        return [self.weight * torch.ones(b, self.feature_size * 2**i, d // 2 ** (i + 1), h // 2 ** (i + 1),
                                         w // 2 ** (i + 1)) for i in range(5)]


def test_the_probe_has_no_path_from_the_image_and_never_trains_the_encoder():
    model = FrozenEncoderProbe(ConstantEncoder(), feature_size=12, num_classes=3).train()
    a, b = torch.rand(1, 1, 40, 32, 20), torch.rand(1, 1, 40, 32, 20) * 5
    out_a = model(a)
    assert out_a.shape == (1, 3, 40, 32, 20)  # padded to 64x32x32 inside, cropped back
    torch.testing.assert_close(out_a, model(b))  # the image reaches the output only through the encoder
    out_a.sum().backward()
    assert model.encoder.weight.grad is None and not model.encoder.training
    assert all(p.grad is not None for p in model.head.parameters())


def test_probe_is_deterministic_per_seed(phantoms, tmp_path):
    cfg = load_config("finetune/tiny", [f"data={phantoms}", f"train.out={tmp_path}", *TINY])
    first, again = (probe("random", cfg, steps=30, seed=0) for _ in range(2))
    assert first == again and 0.0 <= first.dice <= 1.0
    # Even random features separate the liver by its intensity, once crops and labels are paired right.
    assert first.per_class["liver"] > 0.3, first.per_class
    assert set(first.per_class) == {"liver", "kidney", "spleen", "lesion"}
    assert not set(first.train_cases) & set(first.test_cases) and first.test_cases
    assert all("ts" not in c for c in first.test_cases)  # never the dataset's test split (imagesTs)


def test_cli_probes_a_checkpoint_beside_a_random_encoder_of_its_plan(phantoms, tmp_path):
    torch.manual_seed(5)
    encoder = build_encoder(load_config("finetune/tiny", TINY).model)
    checkpoint = tmp_path / "encoder.pt"
    torch.save({"state_dict": {f"swinViT.{k}": v for k, v in encoder.state_dict().items()}}, checkpoint)
    result = CliRunner().invoke(app, ["probe", str(checkpoint), "--data", str(phantoms), "--steps", "30", "-o",
                                      str(tmp_path / "probe"), f"train.out={tmp_path}", *TINY])
    assert result.exit_code == 0, result.output
    assert "mean Dice" in result.output and "random" in result.output and str(checkpoint) in result.output
    records = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert [r["source"] for r in records] == [str(checkpoint), "random"]
    assert records[0]["network"] == records[1]["network"] and records[0]["test_cases"] == records[1]["test_cases"]
    assert records[0]["per_class"] != records[1]["per_class"]  # the checkpoint's encoder, not a random one, was probed


@pytest.mark.slow
def test_an_encoder_whose_features_carry_the_label_probes_far_above_a_random_one(tmp_path):
    """An encoder trained end to end on the task (with a probe-shaped head, 300 steps) against a random one
    of the same plan, each probed with a fresh head: the trained one's features hold the organs."""
    import torch.nn.functional as F
    from monai.losses import DiceCELoss

    from swinssl.data.phantom import write_phantom_dataset
    from swinssl.engine.validate import ProbeTask, random_encoder
    from swinssl.nn.heads import ProbeHead

    write_phantom_dataset(tmp_path / "data", cases=8, size=64, seed=3)
    cfg = load_config("finetune/tiny", [f"data={tmp_path / 'data'}", f"train.out={tmp_path}", *TINY,
                                        "train.val_fraction=0.34"])
    task = ProbeTask(cfg, seed=0)
    encoder, head = random_encoder(cfg.model, seed=1), ProbeHead(12, len(task.classes))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-3)
    loss_fn, generator = DiceCELoss(to_onehot_y=True, softmax=True), torch.Generator().manual_seed(0)
    for _ in range(300):
        pick = torch.randint(0, len(task.images), (4,), generator=generator)
        x = task.images[pick]
        logits = F.interpolate(head(encoder(x, normalize=True)), size=x.shape[2:], mode="trilinear")
        loss = loss_fn(logits, task.labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained, _ = task.score(encoder, steps=100)
    random, _ = task.score(random_encoder(cfg.model, seed=0), steps=100)
    assert trained > random + 0.1, (trained, random)
