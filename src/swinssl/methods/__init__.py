"""Pre-training methods as data: registered view makers and proxy tasks (``methods.tasks``),
and one ``Method`` per paper (``swin_unetr``, ``swinmm``, ``swinfuse``) naming its view maker,
its checks and its fine-tuning and inference hooks. See ``methods.base`` for the interface."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from swinssl.config import MethodConfig
from swinssl.errors import ConfigError
from swinssl.plan import Plan
from swinssl.methods import tasks  # noqa: F401 (registers the heads, view makers and tasks)
from swinssl.methods.base import TASKS, VIEW_MAKERS, Method, TaskInput, check_task_names, register_task
from swinssl.methods.swin_unetr import METHOD as SWIN_UNETR
from swinssl.methods.swinfuse import METHOD as SWINFUSE
from swinssl.methods.swinmm import METHOD as SWINMM

METHODS: dict[str, Method] = {m.name: m for m in (SWIN_UNETR, SWINMM, SWINFUSE)}

__all__ = ["METHODS", "TASKS", "VIEW_MAKERS", "Method", "TaskInput", "check_method_keys", "check_task_names", "check_views", "finetune_method", "get_method",
           "method_of",
           "register_task", "view_choices", "window_predictor"]


def check_method_keys(method: MethodConfig) -> None:
    """The names a config gives the method registry (method.name, method.weights keys, method.views)
    are registered: what ``config show`` can check without knowing the stage."""
    get_method(method.name).view_maker_of(method)
    check_task_names(method)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r}: unknown method; choose one of {', '.join(METHODS)}")
    return METHODS[name]


AUTO = "auto"  # finetune.method: the registered method whose hooks drive the network the config describes


def finetune_method(name: str, network: Mapping[str, Any], key: str = "finetune.method") -> Method:
    """The fine-tuning and inference hooks named ``name`` for a network (its model fields), checked:
    the network must have what the method's hooks drive (``Method.network``). ``auto``: the method
    whose declared network it is (the most specific declaration that fits)."""
    if name == AUTO:
        fitting = [m for m in METHODS.values() if m.drives(network)]
        if not fitting:
            raise ConfigError(f"{key} auto: no registered method drives this network; name one "
                              f"({', '.join(METHODS)})")
        return max(fitting, key=lambda m: len(m.network))
    if name not in METHODS:
        raise ConfigError(f"{key} {name!r}: unknown method; choose one of {', '.join(map(repr, [AUTO, *METHODS]))}")
    method = METHODS[name]
    if not method.drives(network):
        wanted = " ".join(f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in method.network.items())
        raise ConfigError(f"{key} {name}: its fine-tuning and inference drive networks with {wanted}")
    return method


def method_of(plan: Plan) -> Method:
    """The fine-tuning and inference hooks of a fine-tuned model, by the name its plan records (plans
    written before it was recorded: ``auto`` on their network)."""
    return finetune_method(plan.finetune_method or AUTO, plan.network_fields(), "plan.finetune_method")


def view_choices() -> list[str]:
    """Every ``views`` choice of inference: ``auto`` (the network's method decides), then each
    method's choices."""
    return list(dict.fromkeys(["auto", *(v for m in METHODS.values() for v in m.views)]))


def window_predictor(model: nn.Module, method: Method | None = None, views: str = "auto") -> tuple[Callable, str]:
    """(the function sliding windows call, the views choice it makes) for ``model``, fine-tuned with
    ``method``'s hooks (None: the default method's, a plain network). ``auto``: that method's
    default; otherwise the first method, ``method`` first, that understands ``views``."""
    owner = method or METHODS[MethodConfig().name]
    chosen = owner.default_views() if views == "auto" else views
    for method in (owner, *METHODS.values()):
        if chosen in method.views:
            return method.window_predictor(model, chosen), chosen
    check_views(views)
    raise ConfigError(f"views {views!r}: no registered method predicts it")  # a registry bug: view_choices lists it


def check_views(views: str) -> None:
    """Refuse a views choice (``--views``) the registry does not know, naming the known ones."""
    if views not in view_choices():
        raise ConfigError(f"--views {views!r}: choose one of {', '.join(map(repr, view_choices()))}")
