import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import on_processes

from swinssl.ssl.losses import gather_rows, inpainting_l1, ntxent, rotation_ce, weighted_sum


def ntxent_by_loops(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """NT-Xent straight from the formula: positive in the denominator, only self excluded."""
    views = [list(map(float, row)) for row in torch.cat([z1, z2]).tolist()]
    views = [[v / math.sqrt(sum(a * a for a in row)) for v in row] for row in views]
    m = len(views)

    def sim(i, k):
        return sum(a * b for a, b in zip(views[i], views[k]))

    total = 0.0
    for i in range(m):
        positive = (i + m // 2) % m
        denominator = sum(math.exp(sim(i, k) / t) for k in range(m) if k != i)
        total += -math.log(math.exp(sim(i, positive) / t) / denominator)
    return total / m


# inpainting and rotation


def test_inpainting_l1_is_the_mean_absolute_error():
    reconstruction = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 1, 2, 2)
    assert inpainting_l1(reconstruction, torch.zeros_like(reconstruction)).item() == pytest.approx(1.5)
    assert inpainting_l1(-reconstruction, reconstruction).item() == pytest.approx(3.0)


def test_inpainting_l1_names_both_shapes_on_mismatch():
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4, 4\).*\(1, 1, 4, 4, 2\)"):
        inpainting_l1(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 2))


def test_rotation_ce_matches_a_hand_computed_log_softmax():
    logits = [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]]
    labels = [1, 3]
    expected = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels)) / 2
    loss = rotation_ce(torch.tensor(logits), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# NT-Xent


@pytest.mark.parametrize("n", [2, 3, 5])
def test_ntxent_of_collapsed_embeddings_is_log_of_2n_minus_1(n):
    z = torch.full((n, 8), 3.0)  # not unit length: normalisation must not matter
    assert ntxent(z, z.clone()).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0, 2.0])
def test_ntxent_equals_the_formula_written_as_loops(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert ntxent(z1, z2, temperature=t).item() == pytest.approx(ntxent_by_loops(z1, z2, t), rel=1e-9)


def test_ntxent_hand_case_with_orthogonal_unit_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # Pairs agree, samples orthogonal: each anchor sees exp(2) for its positive, 1 + 1 for negatives.
    agree = ntxent(torch.stack([e1, e2]), torch.stack([e1, e2]), temperature=0.5)
    assert agree.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    # Pairs orthogonal, each anchor equals one negative: -log(1 / (1 + 1 + exp(2))).
    swap = ntxent(torch.stack([e1, e2]), torch.stack([e2, e1]), temperature=0.5)
    assert swap.item() == pytest.approx(math.log(2 + math.exp(2)), rel=1e-6)


def test_ntxent_rejects_non_positive_temperature():
    z = torch.randn(2, 4)
    for t in (0.0, -0.5):
        with pytest.raises(ValueError, match="temperature"):
            ntxent(z, z, temperature=t)


def test_ntxent_gradient_reaches_both_views():
    z1, z2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    ntxent(z1, z2).backward()
    for z in (z1, z2):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_gather_rows_without_process_group_is_the_tensor_itself():
    z = torch.randn(3, 5)
    assert gather_rows(z) is z


# NT-Xent across two processes


WORLD = 2


def _ntxent_rank(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        rows = slice(rank * z1.shape[0] // WORLD, (rank + 1) * z1.shape[0] // WORLD)
        local1 = z1[rows].clone().requires_grad_(True)
        local2 = z2[rows].clone().requires_grad_(True)
        loss = ntxent(gather_rows(local1), gather_rows(local2), temperature=0.5)
        loss.backward()
        queue.put((rank, loss.item(), local1.grad.tolist(), local2.grad.tolist()))
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_ntxent_gathered_over_two_processes_equals_the_single_process_loss_and_gradient():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    z2 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ref1, ref2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    reference = ntxent(ref1, ref2, temperature=0.5)
    reference.backward()

    results = on_processes(_ntxent_rank, WORLD, z1, z2, timeout=60.0)

    n = z1.shape[0] // WORLD
    for rank, loss, grad1, grad2 in results:
        # Every rank computes the loss of the whole concatenated batch.
        assert loss == pytest.approx(reference.item(), abs=1e-6)
        # The gather's backward sums the W identical losses' gradients: W x the true
        # gradient, which DDP's average over W ranks turns back into the true one.
        rows = slice(rank * n, (rank + 1) * n)
        torch.testing.assert_close(torch.tensor(grad1, dtype=torch.float64), WORLD * ref1.grad[rows], atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(torch.tensor(grad2, dtype=torch.float64), WORLD * ref2.grad[rows], atol=1e-9, rtol=1e-7)


# weighted sum


def test_weighted_sum_weights_only_the_named_losses():
    losses = {"inpaint": torch.tensor(1.0), "rotation": torch.tensor(2.0), "contrast": torch.tensor(5.0)}
    total = weighted_sum(losses, {"inpaint": 0.5, "rotation": 2.0})
    assert total.item() == pytest.approx(4.5)


def test_weighted_sum_names_a_missing_loss():
    with pytest.raises(ValueError, match="contrast"):
        weighted_sum({"inpaint": torch.tensor(1.0)}, {"inpaint": 1.0, "contrast": 1.0})
