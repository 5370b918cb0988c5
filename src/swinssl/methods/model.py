"""The pre-training model shared by every method: the Swin encoder (``swinViT.*`` keys, as in
SwinUNETR, so the encoder loads into it) and the heads of the weighted tasks on its bottleneck.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from swinssl.config import MethodConfig, ModelConfig
from swinssl.nn.build import build_encoder

# Heads on the encoder's bottleneck (16C channels), built only for tasks with non-zero weight:
# name -> factory(bottleneck width, in_channels, method settings); the module is ``<name>_head``.
# Registered with the tasks (``methods.tasks``).
HEADS: dict[str, Callable[[int, int, MethodConfig], nn.Module]] = {}


class SSLModel(nn.Module):
    """Input: the two views concatenated, ``(2B, C, D, H, W)``; sample i of the first half and of
    the second half are two views of one crop. Output: ``{head: (2B, ...)}`` for the built heads
    (module ``<head>_head``; heads of tasks weighted 0 are not built, so every parameter gets a
    gradient, as DDP requires).

    With the domain-invariance module (SwinFUSE), the two halves are its two streams: each
    view's patch embedding is gated by its attention over its partner view's tokens, then each
    gated stream goes through the encoder on its own (the views keep their own outputs for the
    tasks); ``streams`` (the two DIM outputs) and ``gate`` (a preview panel) are added.

    Every per-sample output is ``(2B, ...)`` or a pair of ``(B, ...)``: the shapes that a run of
    several processes gathers across them (``methods.base.gather_views_output``).
    """

    def __init__(self, model: ModelConfig, method: MethodConfig, heads: Sequence[str]):
        super().__init__()
        width = 16 * model.feature_size  # bottleneck channels
        self.swinViT = build_encoder(model)
        self.two_streams = model.encoder == "domain_invariant_swin"  # the views co-attend in its module
        self.head_names = tuple(heads)
        for name in self.head_names:
            setattr(self, f"{name}_head", HEADS[name](width, model.in_channels, method))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder, out = self.swinViT, {}
        if not self.two_streams:
            hidden = encoder(x, normalize=True)
        else:
            if x.shape[0] % 2:
                raise ValueError(f"expected the two views concatenated (an even batch), got {x.shape[0]} samples")
            first, second = encoder.embed(x).chunk(2)
            gate_first, gate_second = encoder.invariance.gates(first, second)
            streams = (first * gate_first, second * gate_second)
            hidden = encoder.stages(torch.cat(streams), normalize=True)
            out["streams"] = streams
            out["gate"] = gate_first[:1].detach().mean(1)  # (1, d, h, w)
        bottleneck = hidden[4]
        out.update({name: getattr(self, f"{name}_head")(bottleneck) for name in self.head_names})
        return out
