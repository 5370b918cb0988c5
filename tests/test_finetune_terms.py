"""Fine-tuning settings that a one-line change could drop without any other test noticing: the
layer-wise LR decay must reach the optimizer, and the DiceCE weights the loss (tiny phantoms, CPU)."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from swinssl.config import load_config
from swinssl.engine import finetune as engine
from swinssl.engine.checkpoint import load_checkpoint

TINY = ["model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1", "train.num_workers=0",
        "train.warmup_steps=1", "finetune.overlap=0", "train.val_fraction=0.34"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from swinssl.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(out, cases=4, size=32, seed=2)


def config(data, out, *extra):
    return load_config("finetune/tiny", [f"data={data}", f"train.out={out}", *TINY, *extra])


def test_layer_decay_reaches_the_optimizer(phantoms, tmp_path):
    """Patch embedding (depth 0), the four stages and the decoder (depth 5) at lr * 0.5^(5 - depth)."""
    cfg = config(phantoms, tmp_path, "train.name=decay", "train.steps=1", "train.lr=1e-3", "finetune.layer_decay=0.5",
                 "train.val_every=1", "train.checkpoint_every=1")
    run = engine.finetune(cfg, progress=False)
    groups = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx(sorted(1e-3 * 0.5 ** (5 - d) for d in range(6)))


def test_dice_and_ce_weights_reach_the_loss(phantoms, tmp_path):
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 8, 8, 8), torch.randint(0, 5, (2, 1, 8, 8, 8))
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, labels)
    ce = F.cross_entropy(logits, labels[:, 0])
    for dice_weight, ce_weight in ((1.0, 0.0), (0.3, 2.0)):
        stage = engine.FinetuneStage(config(phantoms, tmp_path, f"finetune.dice_weight={dice_weight}",
                                            f"finetune.ce_weight={ce_weight}"))
        torch.testing.assert_close(stage.segmentation_loss(logits, labels), dice_weight * dice + ce_weight * ce)
