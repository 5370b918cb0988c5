"""Loading pre-trained weights from every published layout into our ``SwinUNETR``.

``load_pretrained(model, source)`` reads a file with ``torch.load(weights_only=True)``
(a checkpoint never runs code), recognises its layout, renames its keys with that
layout's filter, adapts a 1-channel stem to k input channels, loads what fits and
returns a ``LoadReport`` (loaded / missing / unexpected / shape-mismatched keys). It
raises ``CheckpointError`` when nothing of the encoder loaded -- the trap of a
``strict=False`` load that matches nothing.

Layouts (one filter each):

- ``monai``: a ``monai.networks.nets.SwinUNETR`` state dict (``swinViT.*``, ``encoder1``...),
  bare or under ``state_dict`` / ``model``.
- ``ssl-official``: the Swin UNETR self-supervised release (``model_swinvit.pt``): under
  ``state_dict``, encoder-only keys with ``module.`` (or ``swin_vit.``/``swinViT.``) prefixes,
  MLP layers named ``fc1``/``fc2``, and a final ``norm.*`` that SwinUNETR lacks (ignored).
- ``swinmm``: a SwinMM pre-training checkpoint: ``state_dict`` with ``module.swinViT.*``
  plus pre-training heads (reported as unexpected).
- ``swinssl``: our own checkpoints (``{"format": "swinssl", "model": ..., "plan": ...}``).

``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are removed everywhere.
The neighbour order of patch merging cannot be read from weights: foreign checkpoints are
assumed to use the ``merging`` order of the released weights (MONAI's default); our own
checkpoints carry their network config and a mismatch raises.
"""

from __future__ import annotations


import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from swinssl.checkpoint import read_checkpoint
from swinssl.errors import CheckpointError
from swinssl.plan import architecture_of

log = logging.getLogger(__name__)

ENCODER_PREFIX = "swinViT."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Weights whose input-channel axis follows the image channels (adapted from 1 to k channels).
STEM_KEYS = ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight")


@dataclass
class LoadReport:
    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, other shape (not loaded)
    adapted: list[str] = field(default_factory=list)  # 1-channel stem repeated to k channels
    ignored: list[str] = field(default_factory=list)  # known extras of the layout (e.g. final norm)

    encoder_loaded: int = 0  # learned encoder tensors loaded (buffers such as position indices not counted)

    def summary(self) -> str:
        parts = [
            f"{self.source} ({self.layout} layout): loaded {len(self.loaded)} tensors "
            f"({self.encoder_loaded} of the encoder)",
            f"missing {len(self.missing)}",
            f"unexpected {len(self.unexpected)}",
            f"shape-mismatched {len(self.mismatched)}",
        ]
        if self.adapted:
            parts.append(f"channel-adapted {len(self.adapted)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)}")
        return ", ".join(parts)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def filter_monai(key: str) -> str | None:
    key = _strip_wrappers(key)
    return ENCODER_PREFIX + key[len("swin_vit.") :] if key.startswith("swin_vit.") else key


def filter_ssl_official(key: str) -> str | None:
    key = _strip_wrappers(key)
    for prefix in ("swin_vit.", ENCODER_PREFIX):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key.startswith("norm."):
        return None  # the release's final LayerNorm; SwinUNETR normalises without parameters
    key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    return ENCODER_PREFIX + key


def filter_swinmm(key: str) -> str | None:
    key = _strip_wrappers(key)
    return key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def filter_swinssl(key: str) -> str | None:
    # Checkpoints written before the domain-invariant encoder was a variant of its own kept its module as ``dim``.
    return _strip_wrappers(key).replace("swinViT.dim.", "swinViT.invariance.")


FILTERS: dict[str, Callable[[str], str | None]] = {
    "monai": filter_monai,
    "ssl-official": filter_ssl_official,
    "swinmm": filter_swinmm,
    "swinssl": filter_swinssl,
}


def _tensor_dict(ckpt: Mapping, source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the state dict inside a checkpoint; returns it and the wrapper key."""
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), None
    for wrapper in ("state_dict", "model", "model_state_dict", "network_weights", "net"):
        inner = ckpt.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner), wrapper
    raise CheckpointError(f"{source}: no state dict found (top-level keys: {', '.join(map(str, list(ckpt)[:8]))})")


def detect_layout(ckpt: Mapping, state: Mapping[str, torch.Tensor]) -> str:
    if ckpt.get("format") == "swinssl":
        return "swinssl"
    keys = [_strip_wrappers(k) for k in state]
    if any(k.startswith(ENCODER_PREFIX) for k in keys) and any(".mlp.fc1." in k for k in keys):
        return "swinmm"
    if any(k.startswith(ENCODER_PREFIX) or k.startswith("swin_vit.") for k in keys):
        has_heads = any(k.startswith(("rotation_head", "contrastive_head", "conv.")) for k in keys)
        return "swinmm" if has_heads else "monai"
    if any(k.startswith(("patch_embed.", "layers1.")) for k in keys):
        return "ssl-official"
    return "monai"


def renamed_state(ckpt: Mapping, name: str = "<state dict>", layout: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under SwinUNETR's key names (its layout's filter applied, the layout's
    known extras dropped), without a model: for reading what a foreign checkpoint's encoder is."""
    state, _ = _tensor_dict(ckpt, name)
    layout = layout or detect_layout(ckpt, state)
    renamed = {}
    for key, value in state.items():
        new = FILTERS[layout](key)
        if new is not None:
            renamed[new] = value
    return renamed


def load_pretrained(model: nn.Module, source: str | Path | Mapping, layout: str | None = None) -> LoadReport:
    """Load ``source`` (a path or an already loaded dict) into ``model``; see the module docstring."""
    name = str(source) if isinstance(source, (str, Path)) else "<state dict>"
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name}: expected a dict of tensors, got {type(ckpt).__name__}")
    state, _ = _tensor_dict(ckpt, name)
    layout = layout or detect_layout(ckpt, state)
    if layout not in FILTERS:
        raise CheckpointError(f"{name}: unknown layout {layout!r}; known: {', '.join(FILTERS)}")
    _check_plan(ckpt, model, name)

    report = LoadReport(name, layout)
    target = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = FILTERS[layout](key)
        if new is None:
            report.ignored.append(key)
        elif new not in target:
            report.unexpected.append(key)
        else:
            renamed[new] = value

    width = _width_hint(renamed, model)
    if width:  # every stage would mismatch; only shape-agnostic tensors (bias tables) would "load"
        raise CheckpointError(f"{name}: {width}; build the model with the checkpoint's feature size")

    to_load = {}
    for key, value in renamed.items():
        want = target[key].shape
        if value.shape == want:
            to_load[key] = value
        elif key in STEM_KEYS and _adaptable(value.shape, want):
            # 1-channel weights for k channels: repeat the kernel and divide by k, so a volume
            # copied into k identical channels gives the same response.
            to_load[key] = value.repeat(1, want[1], *([1] * (value.ndim - 2))) / want[1]
            report.adapted.append(key)
        else:
            report.mismatched.append(f"{key} {tuple(value.shape)} -> {tuple(want)}")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(set(target) - set(to_load))
    parameters = {n for n, _ in model.named_parameters()}
    report.encoder_loaded = sum(k.startswith(ENCODER_PREFIX) and k in parameters for k in to_load)

    if report.encoder_loaded == 0:
        examples = ", ".join(list(state)[:3])
        raise CheckpointError(
            f"{name}: no encoder weights loaded ({layout} layout; {len(report.mismatched)} shape-mismatched, "
            f"{len(report.unexpected)} unexpected keys, e.g. {examples})"
        )
    log.info(report.summary())
    return report


def load_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], problem: str, hint: str = "") -> None:
    """Load ``state`` into ``model`` only if every tensor fits (names and shapes), else one
    ``CheckpointError`` line: ``problem`` with the counts and an example key, then ``hint``.
    For a model's own weights (prediction, resume): a half-loaded model runs and looks plausible."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        example = (mismatched or unexpected or missing)[0]
        raise CheckpointError(f"{problem} ({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                              f"{example}; {len(mismatched)} shape-mismatched)" + (f": {hint}" if hint else ""))
    model.load_state_dict(state)


def _adaptable(have: torch.Size, want: torch.Size) -> bool:
    return len(have) == len(want) and have[1] == 1 and have[0] == want[0] and have[2:] == want[2:]


def _width_hint(state: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    key = "swinViT.patch_embed.proj.weight"
    if key in state and key in model.state_dict():
        have, want = state[key].shape[0], model.state_dict()[key].shape[0]
        if have != want:
            return f"the checkpoint has feature size {have}, the model {want}"
    return ""


def _check_plan(ckpt: Mapping, model: nn.Module, name: str) -> None:
    """Our checkpoints say which patch-merging order they used; loading into the other is wrong silently."""
    ours = getattr(getattr(model, "swinViT", None), "merging", None)
    if not isinstance(ckpt.get("plan"), Mapping) or ours is None:
        return
    theirs = architecture_of(ckpt["plan"], name).get("downsample")
    if theirs and ours and theirs != ours:
        raise CheckpointError(f"{name}: weights use patch merging '{theirs}' but the model uses '{ours}'; build the model with downsample='{theirs}'")
