"""Pre-training methods as data: registered view makers and proxy tasks (``methods.tasks``),
and one ``Method`` per paper (``swin_unetr``, ``swinmm``, ``swinfuse``) naming its view maker,
its checks and its fine-tuning and inference hooks. See ``methods.base`` for the interface."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from swinssl.config import MethodConfig
from swinssl.errors import ConfigError
from swinssl.methods import tasks  # noqa: F401 (registers the heads, view makers and tasks)
from swinssl.methods.base import TASKS, VIEW_MAKERS, Method, TaskInput, check_task_names, register_task
from swinssl.methods.swin_unetr import METHOD as SWIN_UNETR
from swinssl.methods.swinfuse import METHOD as SWINFUSE
from swinssl.methods.swinmm import METHOD as SWINMM

METHODS: dict[str, Method] = {m.name: m for m in (SWIN_UNETR, SWINMM, SWINFUSE)}

__all__ = ["METHODS", "TASKS", "VIEW_MAKERS", "Method", "TaskInput", "check_method_keys", "check_task_names", "get_method", "network_method",
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


def network_method(network: Mapping[str, Any]) -> Method:
    """The method whose fine-tuning and inference hooks apply to a network (a model config's or
    a plan's fields): the one that owns it, else the default method's plain hooks."""
    owner = next((m for m in METHODS.values() if m.owns(network)), None)
    return owner or METHODS[MethodConfig().name]


def view_choices() -> list[str]:
    """Every ``views`` choice of inference: ``auto`` (the network's method decides), then each
    method's choices."""
    return list(dict.fromkeys(["auto", *(v for m in METHODS.values() for v in m.views)]))


def window_predictor(model: nn.Module, network: Mapping[str, Any],
                     views: str = "auto") -> tuple[Callable, str]:
    """(the function sliding windows call, the views choice it makes) for ``model``, whose fields
    are ``network``. ``auto``: the network's method's default; otherwise the first method, the
    network's own first, that understands ``views``."""
    owner = network_method(network)
    chosen = owner.default_views(network) if views == "auto" else views
    for method in (owner, *METHODS.values()):
        if chosen in method.views:
            return method.window_predictor(model, chosen), chosen
    raise ConfigError(f"views {views!r}: choose one of {', '.join(view_choices())}")
