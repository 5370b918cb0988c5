"""Losses of Swin UNETR self-supervised pre-training (Tang et al., CVPR 2022, sec. 3.2).

Inpainting (L1), rotation prediction (cross entropy over 4 quarter turns) and
contrastive coding (NT-Xent, Chen et al., ICML 2020), combined by a weighted sum.
Pure functions of tensors, and ``gather_rows``, the all-gather with gradients through which a
run of several processes computes them on the step's whole batch (``methods.base.Method.compute_losses``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def inpainting_l1(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all voxels: ``(B, C, D, H, W)`` x2 -> scalar."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction shape {tuple(reconstruction.shape)} differs from target shape {tuple(target.shape)}"
        )
    return F.l1_loss(reconstruction, target)


def rotation_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of quarter-turn logits ``(N, 4)`` against int64 labels ``(N,)`` -> scalar."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, 4) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits, labels)


class _GatherRows(torch.autograd.Function):
    """All-gather with gradients: ``(N, ...)`` on each of W ranks -> ``(W N, ...)`` in rank order.

    Backward sums the gathered gradient over the ranks (every rank's loss depends on
    every rank's rows) and keeps this rank's rows: a reduce-scatter written with
    ``all_reduce``, which every backend has. (``torch.distributed.nn.functional.all_gather``
    does the same but is deprecated.) All ranks must hold the same N.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), z.shape[0]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(z: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``z`` in rank order (``(N, ...)`` -> ``(W N, ...)``), with gradients; ``z``
    itself outside a process group of several ranks.

    If every rank then computes the same loss L of the gathered rows, the backward gives each rank
    W * dL/dz_local; DDP averages parameter gradients over the W ranks, which divides that W out
    again: the parameters receive exactly dL/dtheta of the whole batch's loss.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherRows.apply(z)
    return z


def ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent loss of two views' embeddings, as the Swin UNETR reference ``Contrast`` loss.

    z1, z2: ``(N, E)``, row i of each is one view of sample i. The 2N embeddings
    ``z = cat(z1, z2)`` are L2-normalised and ``logits = z @ z.T / temperature``. Anchor
    i's positive is its other view, ``(i + N) mod 2N``; every other embedding is a
    negative. Only the self-similarity is excluded from the denominator; the positive
    stays in it:

        loss_i = -log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) )

    The result is the mean over all 2N anchors. Collapsed embeddings (all equal) give
    ``log(2N - 1)``. In a run of several processes, z1 and z2 hold every process's rows
    (``gather_rows``), so the negatives are the step's whole batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected z1 and z2 of the same shape (N, E), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], 0), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    positives = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, positives)


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum(weights[k] * losses[k] for k in weights)``; losses not in ``weights`` are ignored."""
    missing = sorted(set(weights) - set(losses))
    if missing:
        raise ValueError(f"weighted losses {missing} are missing; got losses {sorted(losses)}")
    if not weights:
        raise ValueError("weights is empty: nothing to sum")
    return sum(weight * losses[name] for name, weight in weights.items())


# --- SwinMM (Wang et al., MICCAI 2023) ------------------------------------------------------------


def masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels (all channels): ``(B, C, ...)`` x2, bool mask ``(B, 1, ...)``.

    0 when nothing is masked (there is nothing to reconstruct).
    """
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction shape {tuple(reconstruction.shape)} differs from target shape {tuple(target.shape)}"
        )
    weight = mask.expand_as(target).to(reconstruction.dtype)
    return ((reconstruction - target) ** 2 * weight).sum() / weight.sum().clamp_min(1)


def zscore(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each sample of ``(B, C, ...)`` normalised to mean 0 and std 1 over its voxels and channels."""
    dims = tuple(range(1, x.ndim))
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + eps)


def mutual_loss(reconstructions: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """SwinMM's mutual learning term: the reconstructions of the permuted views, mapped back to the
    common frame, must agree with the un-permuted view's (``reconstructions[0]``) on the masked
    voxels: mean over the permuted views of ``masked_mse(r_i, stop_gradient(r_0))``.

    The un-permuted reconstruction is the reference and gets no gradient from this term (only
    from its own reconstruction loss). With gradients on both sides, the easiest way to agree is
    an output that ignores the input: on real CT/MRI that drove the encoder to collapse (rotation
    at chance, NT-Xent at log(2N - 1)) within 40 steps; with the reference held it does not.
    0 for identical reconstructions."""
    if len(reconstructions) < 2:
        raise ValueError(f"the mutual loss compares at least two views, got {len(reconstructions)}")
    reference = reconstructions[0].detach()
    return sum(masked_mse(r, reference, mask) for r in reconstructions[1:]) / (len(reconstructions) - 1)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Multi-view consistency of two segmentations ``(B, K, ...)`` (logits, same frame): the mean
    of the two directions of the KL divergence,

        (KL(p_a || p_b) + KL(p_b || p_a)) / 2 = sum_k (p_a - p_b) (log p_a - log p_b) / 2

    with ``p = softmax`` over the K classes, summed over classes and averaged over the
    batch's voxels. 0 when the two agree; both views get gradients (nothing detached). The
    SwinMM code averages over classes too (``KLDivLoss(reduction="mean")``), i.e. 1/K of this.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"view outputs differ in shape: {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    log_a, log_b = F.log_softmax(logits_a.float(), 1), F.log_softmax(logits_b.float(), 1)
    return ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(1).mean() / 2


def cosine_consistency(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Multi-view consistency by cosine (SwinMM Table 7, "Cosine"): two segmentations ``(B, K, ...)``
    (logits, same frame) -> scalar

        mean over the batch's voxels of  1 - cos(p_a, p_b),   cos = <p_a, p_b> / (|p_a| |p_b|)

    with ``p = softmax`` over the K classes, the cosine taken between the two K-vectors of each voxel.
    In [0, 1] (probabilities are non-negative): 0 when the views agree, 1 when they put their mass
    on different classes. Symmetric; both views get gradients. The paper does not define the term;
    the SwinMM code names it only in a comment, ``CosineSimilarity(dim=1)`` (over the classes,
    per voxel), which is a similarity: ``1 - cos`` makes it a loss, and both sides are
    probabilities (the comment's call site would compare log-probabilities with probabilities).
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"view outputs differ in shape: {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    p_a, p_b = torch.softmax(logits_a.float(), 1), torch.softmax(logits_b.float(), 1)
    return (1 - F.cosine_similarity(p_a, p_b, dim=1)).mean()


# --- SwinFUSE (Talasila et al., 2024) -------------------------------------------------------------


def nn_bandwidth(points: torch.Tensor) -> torch.Tensor:
    """Kernel bandwidth of a point set ``(N, D)``: the mean distance of each point to its nearest
    other point (detached: the bandwidth is a rule, not something to optimise)."""
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"the bandwidth rule needs at least two points (N, D), got {tuple(points.shape)}")
    with torch.no_grad():
        dist = torch.cdist(points.float(), points.float())
        dist.fill_diagonal_(float("inf"))
        return dist.min(1).values.mean().clamp_min(1e-6)


def _kde_log_density(at: torch.Tensor, points: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """Log of a Gaussian KDE of ``points`` ``(N, D)`` at ``at`` ``(M, D)``, up to a constant:
    ``logsumexp_j(-|x - p_j|^2 / (2 h^2)) - D log h`` (the normalisation over evaluation points
    in ``kde_jsd`` removes the rest)."""
    sq = torch.cdist(at.float(), points.float()).pow(2)
    return torch.logsumexp(-sq / (2 * bandwidth**2), dim=1) - points.shape[1] * torch.log(bandwidth)


def kde_jsd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between Gaussian kernel density estimates of two point sets.

    a, b: ``(N, D)`` and ``(M, D)`` features. Each set gets its own KDE with the bandwidth of
    ``nn_bandwidth``. Both densities are evaluated on the union of the points and normalised
    over it into distributions P and Q; the result is
    ``JSD = (KL(P || M) + KL(Q || M)) / 2`` with ``M = (P + Q) / 2``, in nats: 0 for identical
    sets, approaching log 2 for well-separated ones. All in log space (log-sum-exp), so far-apart
    points cannot underflow into 0/0.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two point sets (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    union = torch.cat([a, b])
    log_p = _kde_log_density(union, a, nn_bandwidth(a))
    log_q = _kde_log_density(union, b, nn_bandwidth(b))
    log_p = log_p - torch.logsumexp(log_p, 0)
    log_q = log_q - torch.logsumexp(log_q, 0)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    return 0.5 * (log_p.exp() * (log_p - log_m)).sum() + 0.5 * (log_q.exp() * (log_q - log_m)).sum()


def sample_tokens(features: list[torch.Tensor], count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The same ``count`` token positions (drawn without replacement over all samples' tokens; all
    of them when there are fewer) of each ``(B, C, ...)`` map, as ``(count, C)`` feature vectors."""
    tokens = [f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]) for f in features]
    index = torch.randperm(tokens[0].shape[0], generator=generator)[:count].to(tokens[0].device)
    return [t[index] for t in tokens]
