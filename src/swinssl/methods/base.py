"""The method interface: view makers, proxy tasks and methods, each registered once.

A pre-training method is data: a view maker (how a batch of crops becomes two network
inputs), a set of proxy tasks with weights (``method.weights`` in the config), and checks.
A proxy task is registered once, with the head it reads and the view fields it needs; any
task can be weighted in any method whose views provide those fields, and a combination
that cannot work is refused with one line naming the task and what it lacks.

A method also owns what it changes after pre-training (SwinMM: its two-view fine-tuning
objective and its multi-view inference), through the hooks of ``Method``; the base class
gives the plain behaviour (one network output, DiceCE, one axis order). The engine and
inference call these hooks and know no method by name.

Adding a task::

    @register_task("toy", head="reconstruction", needs=("targets",))
    def toy(s: TaskInput) -> torch.Tensor:
        return (s.out["reconstruction"] - torch.cat(s.views["targets"])).abs().mean()

and ``method.weights: {..., toy: 1.0}`` in a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swinssl.config import Config, MethodConfig
from swinssl.errors import ConfigError
from swinssl.methods.model import HEADS, SSLModel
from swinssl.ssl.losses import gather_rows, weighted_sum

# --- view makers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewMaker:
    """Makes the two views of a batch of crops ``(B, C, D, H, W)``.

    ``make(x, generator, method)`` returns a dict with at least ``views`` (two network inputs
    of ``x``'s shape) and the fields in ``provides`` (see ``swinssl.ssl.views``). ``check``
    refuses crop sizes or settings the views cannot be made from. ``shown`` names the view
    in previews.
    """

    name: str
    make: Callable[[torch.Tensor, torch.Generator, MethodConfig], dict]
    provides: frozenset[str]
    check: Callable[[Config], None]
    shown: str


VIEW_MAKERS: dict[str, ViewMaker] = {}


def register_views(maker: ViewMaker) -> ViewMaker:
    if maker.name in VIEW_MAKERS:
        raise ValueError(f"view maker {maker.name!r} is registered twice")
    VIEW_MAKERS[maker.name] = maker
    return maker


# --- proxy tasks ---------------------------------------------------------------------------------


@dataclass
class TaskInput:
    """What a task's loss reads for one step.

    ``x``: the crops ``(B, C, D, H, W)``; ``views``: the view maker's dict; ``out``: the
    model's output for ``cat(views["views"])`` (2B samples: first views, then second views),
    one entry per built head (``rotation``, ``contrastive``, ``reconstruction``) plus, with the
    domain-invariance module, ``streams`` (the two streams' DIM outputs); ``method``: the
    method's settings; ``generator``: the step's CPU generator (for sampling).
    """

    x: torch.Tensor
    views: dict
    out: dict
    method: MethodConfig
    generator: torch.Generator

    @property
    def n(self) -> int:
        return self.x.shape[0]


# A task's loss: a scalar, or a dict holding the task's scalar under its name plus values only logged.
TaskLoss = Callable[[TaskInput], "torch.Tensor | dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class Task:
    """A proxy task: its loss, the head it reads (None: no head of its own), the view fields it
    needs, and an optional check of the config (e.g. a crop size it needs)."""

    name: str
    loss: TaskLoss
    head: str | None
    needs: frozenset[str]
    check: Callable[[Config], None] | None = None


TASKS: dict[str, Task] = {}


def register_task(name: str, head: str | None = None, needs: tuple[str, ...] = (),
                  check: Callable[[Config], None] | None = None) -> Callable[[TaskLoss], TaskLoss]:
    """Decorator registering a task's loss under ``name``; a name is registered once."""

    def register(loss: TaskLoss) -> TaskLoss:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        if head is not None and head not in HEADS:
            raise ValueError(f"task {name!r}: unknown head {head!r}; heads: {', '.join(HEADS)}")
        TASKS[name] = Task(name, loss, head, frozenset(needs), check)
        return loss

    return register


def check_task_names(method: MethodConfig) -> None:
    """ConfigError naming a ``method.weights`` key that is no registered task."""
    for name in method.weights:
        if name not in TASKS:
            raise ConfigError(f"method.weights: unknown task {name!r}; registered tasks: {', '.join(TASKS)}")


def weighted_tasks(method: MethodConfig) -> dict[str, float]:
    """The tasks with non-zero weight, in the config's order."""
    return {name: w for name, w in method.weights.items() if w}


# --- methods -------------------------------------------------------------------------------------


class Method:
    """A method: its default view maker, its checks, and its hooks after pre-training.

    Pre-training (shared by every method): ``check``, ``build_model``, ``compute_losses``; a
    method whose tasks need an encoder variant names it (``encoder``).
    Fine-tuning and inference hooks, looked up by the method's name (``finetune.method``, recorded
    in the plan): ``check_finetune``, ``finetune_losses``, ``views`` choices at inference,
    ``default_views`` and ``window_predictor``. ``network``: the model fields of the networks the
    hooks drive.
    """

    views: tuple[str, ...] = ("single",)  # inference choices this method's predictor understands
    # Model fields of the networks the fine-tuning hooks drive (base: a plain SwinUNETR).
    network: Mapping[str, Any] = {"multiview": False, "encoder": "swin"}

    def __init__(self, name: str, view_maker: str, encoder: str = "swin"):
        self.name, self.view_maker, self.encoder = name, view_maker, encoder

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- pre-training --

    def view_maker_of(self, method: MethodConfig) -> ViewMaker:
        name = method.views or self.view_maker
        if name not in VIEW_MAKERS:
            raise ConfigError(f"method.views {name!r}: unknown view maker; choose one of {', '.join(VIEW_MAKERS)}")
        return VIEW_MAKERS[name]

    def check(self, cfg: Config) -> None:
        """Refuse, in one line naming the key or task, a config this method cannot train."""
        if self.encoder != "swin" and cfg.model.encoder != self.encoder:
            raise ConfigError(f"method {self.name} needs model.encoder={self.encoder} (its presets set it)")
        maker = self.view_maker_of(cfg.method)
        maker.check(cfg)
        check_task_names(cfg.method)
        tasks = weighted_tasks(cfg.method)
        if not tasks:
            raise ConfigError(f"method.weights: no task has a non-zero weight; tasks: {', '.join(TASKS)}")
        for name in tasks:
            task = TASKS[name]
            missing = sorted(task.needs - maker.provides)
            if missing:
                givers = [m.name for m in VIEW_MAKERS.values() if task.needs <= m.provides]
                hint = f"method.views={givers[0]}" if givers else "a view maker that provides them"
                raise ConfigError(f"method.weights.{name}: task {name!r} needs view fields {missing}, which views "
                                  f"{maker.name!r} do not give; use {hint}")
            if task.check is not None:
                task.check(cfg)

    def build_model(self, cfg: Config) -> nn.Module:
        """The pre-training model: the Swin encoder and the heads of the weighted tasks."""
        needed = {TASKS[name].head for name in weighted_tasks(cfg.method)}
        # In the registry's order: the heads are initialised in it, so a seed gives the same weights.
        return SSLModel(cfg.model, cfg.method, [head for head in HEADS if head in needed])

    def compute_losses(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, method: MethodConfig,
                       rows: slice | None = None):
        """One step's losses for crops ``x`` (B, C, D, H, W) in [0, 1].

        Returns (weighted total, {task: loss, plus values only logged}, preview panels of the
        first crop). Both views go through the model in one pass: every layer normalises per
        sample, so this equals two passes.

        ``rows``: in a run of several processes, ``x`` is the step's whole batch (every process's
        crops in rank order) and this process runs the model on ``rows`` of it only. The views are
        made of the whole batch (every process draws them alike from the same generator), and the
        model's per-sample outputs are gathered back (``gather_views_output``), so every process
        computes the whole batch's losses: the losses and the gradient DDP averages are those of one
        process on the whole batch, whatever the number of processes.
        """
        maker = self.view_maker_of(method)
        views = maker.make(x, generator, method)
        inputs = list(views["views"]) if rows is None else [view[rows] for view in views["views"]]
        out = model(torch.cat(inputs))
        if rows is not None:
            out = gather_views_output(out, inputs[0].shape[0])
        weights = weighted_tasks(method)
        losses = task_losses(TaskInput(x, views, out, method, generator), weights)
        total = weighted_sum(losses, weights)
        return total, losses, previews(x, views, out, maker, method)

    # -- fine-tuning and inference hooks (base: a plain SwinUNETR) --

    def drives(self, network: Mapping[str, Any]) -> bool:
        """Whether the network (model fields, a config's or a plan's) has what ``network`` says the hooks need."""
        return all(network.get(key) == value for key, value in self.network.items())

    def check_finetune(self, cfg: Config) -> None:
        if cfg.finetune.unlabeled:
            raise ConfigError("finetune.unlabeled needs model.multiview=true: pseudo-labels come from the views' mean")

    def finetune_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, unlabeled: torch.Tensor | None,
                        seed: int, cfg: Config, segmentation_loss: Callable) -> tuple[torch.Tensor, dict]:
        """(weighted loss, {name: value to log}) of one fine-tuning micro-step; ``seed`` is the
        micro-step's own, for any random choice the objective makes."""
        return segmentation_loss(model(x), y), {}

    def default_views(self) -> str:
        return "single"

    def window_predictor(self, model: nn.Module, views: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function sliding windows call: a window's logits (or log-probabilities) in its frame."""
        return model

    def window_streams(self) -> int:
        """How many inputs' worth of activations one window holds at once in inference (the
        memory ``infer.volume.window_batch`` plans for)."""
        return 1


def gather_views_output(out: dict, local: int) -> dict:
    """The model's output for this process's ``local`` crops, as if for every process's: a
    per-sample output ``(2 local, ...)`` (first views, then second views) becomes ``(2 W local, ...)``,
    every process's first views then every process's second views; each tensor of a pair (the DIM's
    ``streams``, ``(local, ...)`` each) is gathered on its own; anything else (a preview panel) stays
    this process's."""
    gathered = {}
    for name, value in out.items():
        if isinstance(value, (tuple, list)):
            gathered[name] = type(value)(gather_rows(part) for part in value)
        elif value.shape[0] == 2 * local:
            gathered[name] = torch.cat([gather_rows(half) for half in value.split(local)])
        else:
            gathered[name] = value
    return gathered


def task_losses(step: TaskInput, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The losses of the tasks in ``weights`` (with the values they only log) for one step."""
    losses: dict[str, torch.Tensor] = {}
    for name in weights:
        value = TASKS[name].loss(step)
        losses.update(value if isinstance(value, dict) else {name: value})
    return losses


def previews(x: torch.Tensor, views: dict, out: dict, maker: ViewMaker, method: MethodConfig) -> dict:
    """Preview panels of the first crop: the crop, its first view, and where built the
    reconstruction, its target and the DIM's gate."""
    panels = {"crop": x[0], maker.shown: views["views"][0][0]}
    if "reconstruction" in out:
        recon = out["reconstruction"][0]
        panels["reconstruction"] = recon if method.zscore_target and "masks" in views else recon.clamp(0, 1)
        panels["target"] = views["targets"][0][0]
    if "gate" in out:
        gate = F.interpolate(out["gate"][None], size=tuple(x.shape[2:]), mode="nearest")[0, 0]
        panels["DIM gate (view 1)"] = gate / 2  # gates lie in (0, 2)
    return panels
