"""Hooks of the user's own on a model's modules: finding them, naming them, keeping them out of
torch.fx traces and carrying them over to rewritten modules.

``gate_`` and ``prune`` register hooks of their own (gatedprune's gate hooks, subclasses of
:class:`GateHook`); every other forward, forward pre-, backward or backward pre-hook on a module
is the user's (a logger, a feature capture, an activation clip, ``nn.utils.weight_norm``'s
pre-hook). A user hook sees its module's inputs and outputs, so ``gate_`` keeps those
channels whole and ``prune`` keeps the module called as a module (see the README, *Hooks of
your own*).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .base import GateHook

__all__ = [
    "computed_weight_memo",
    "copy_hooks",
    "describe_hooks",
    "global_hooks",
    "hook_keys",
    "hook_name",
    "hooks_detached",
    "only_weight_hooks",
    "user_hooks",
]

# the hook dictionaries of a module, and what a hook in each is called
_KINDS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)
# torch.nn.modules.module's hooks that run on every module
_GLOBAL_KINDS = (
    ("_global_forward_pre_hooks", "global forward pre-hook"),
    ("_global_forward_hooks", "global forward hook"),
    ("_global_backward_pre_hooks", "global backward pre-hook"),
    ("_global_backward_hooks", "global backward hook"),
)
# the flags a hook's key has in a module's other dictionaries (with_kwargs, always_call, ...)
_FLAG_DICTS = (
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def user_hooks(m: nn.Module) -> list[tuple[str, object]]:
    """``(kind, hook)`` for each hook on ``m`` that is not gatedprune's own, in the order each
    kind runs (forward pre-hooks, forward hooks, backward pre-hooks, backward hooks).

    >>> lin = nn.Linear(2, 2)
    >>> _ = lin.register_forward_hook(lambda mod, args, out: None)
    >>> [kind for kind, _ in user_hooks(lin)]
    ['forward hook']
    """
    found: list[tuple[str, object]] = []
    for attr, kind in _KINDS:
        hooks: dict[int, Any] = getattr(m, attr, None) or {}
        found.extend((kind, h) for h in hooks.values() if not isinstance(h, GateHook))
    return found


# torch's own forward pre-hooks computing a weight from others before each call (the old
# nn.utils.weight_norm and spectral_norm, nn.utils.prune's masks)
WEIGHT_HOOKS: tuple[type, ...] = (WeightNorm, SpectralNorm, BasePruningMethod)


def only_weight_hooks(m: nn.Module) -> bool:
    """Whether ``m``'s user hooks are all torch's weight-computing pre-hooks (None of them:
    False).

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", FutureWarning)
    ...     only_weight_hooks(nn.utils.weight_norm(nn.Linear(2, 2)))
    True
    """
    hooks = user_hooks(m)
    return bool(hooks) and all(isinstance(h, WEIGHT_HOOKS) for _, h in hooks)


def computed_weight_memo(model: nn.Module) -> dict[int, Tensor]:
    """A ``copy.deepcopy`` memo giving the copy of ``model`` a detached copy (same values) of
    each weight that one of torch's weight-computing pre-hooks (the old ``nn.utils.weight_norm``
    / ``spectral_norm``, ``nn.utils.prune``'s masks) left on a module with autograd history:
    torch's deep copy refuses such a tensor (a bare ``RuntimeError`` from ``gatedprune.prune``
    after any training step before 2026-12-07 22:10 UTC). The model itself is left as it is,
    and the copy's hook computes the weight again on its next call.

    >>> import copy, warnings, torch
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", FutureWarning)
    ...     lin = nn.utils.weight_norm(nn.Linear(2, 2))
    >>> _ = lin(torch.ones(1, 2))  # with autograd on: lin.weight is not a leaf
    >>> copied = copy.deepcopy(lin, computed_weight_memo(lin))
    >>> torch.equal(copied.weight, lin.weight), lin.weight.grad_fn is not None
    (True, True)
    """
    memo: dict[int, Tensor] = {}
    for m in model.modules():
        for _, hook in user_hooks(m):
            if isinstance(hook, WeightNorm | SpectralNorm):
                name = str(hook.name)
            elif isinstance(hook, BasePruningMethod):
                name = str(hook._tensor_name)
            else:
                continue
            t = m.__dict__.get(name)
            if isinstance(t, Tensor) and t.grad_fn is not None:
                memo[id(t)] = t.detach().clone()
    return memo


def hook_keys(m: nn.Module) -> list[int]:
    """The keys (handle ids) of ``m``'s hooks that are not gatedprune's own, sorted.

    >>> lin = nn.Linear(2, 2)
    >>> handle = lin.register_forward_hook(lambda mod, args, out: None)
    >>> hook_keys(lin) == [handle.id]
    True
    """
    keys: list[int] = []
    for attr, _ in _KINDS:
        hooks: dict[int, Any] = getattr(m, attr, None) or {}
        keys.extend(k for k, h in hooks.items() if not isinstance(h, GateHook))
    return sorted(keys)


def hook_name(h: object) -> str:
    """A readable name of hook ``h``: its qualified name; for a lambda or a function defined
    inside another one, its own name with its file and line.

    >>> def clip(mod, args, out):
    ...     return out.clamp(-1, 1)
    >>> hook_name(clip), hook_name(functools.partial(clip))
    ('clip', 'partial(clip)')
    """
    if isinstance(h, functools.partial):
        return f"partial({hook_name(h.func)})"
    name = getattr(h, "__qualname__", None)
    if not isinstance(name, str):
        return type(h).__qualname__
    code = getattr(h, "__code__", None)
    if "<" in name and code is not None:
        where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
        name = f"{code.co_name} ({where})"  # (f.<locals>.clip: clip)
    return name


def describe_hooks(m: nn.Module) -> str | None:
    """``"carries a forward hook f"`` (every user hook of ``m``, by kind and name), or None
    if ``m`` has none.

    >>> def log(mod, args, out):
    ...     pass
    >>> lin = nn.Linear(2, 2)
    >>> _ = lin.register_forward_hook(log)
    >>> describe_hooks(lin)
    'carries a forward hook log'
    """
    parts = [f"a {kind} {hook_name(h)}" for kind, h in user_hooks(m)]
    if not parts:
        return None
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"carries {listed}"


def global_hooks() -> list[tuple[str, object]]:
    """``(kind, hook)`` for each hook registered for every module
    (``torch.nn.modules.module.register_module_forward_hook`` and its siblings).

    >>> global_hooks()
    []
    """
    registry = nn.modules.module
    found: list[tuple[str, object]] = []
    for attr, kind in _GLOBAL_KINDS:
        hooks: dict[int, Any] = getattr(registry, attr, None) or {}
        found.extend((kind, h) for h in hooks.values())
    return found


@contextlib.contextmanager
def hooks_detached(model: nn.Module) -> Iterator[set[int]]:
    """Take the user hooks off every module of ``model``, and the global module hooks off
    torch, for the duration (torch.fx runs the hooks of the modules it traces through on
    Proxies: a hook reading ``out.shape`` or ``.item()`` would fail, and one changing the
    output would be baked into the traced code). Yields the ids of the modules that carried
    hooks. Each hook dictionary is restored in place (the same object, the same order), so
    the hooks' handles still remove them; gatedprune's own hooks stay.

    >>> lin = nn.Linear(2, 2)
    >>> _ = lin.register_forward_hook(lambda mod, args, out: None)
    >>> with hooks_detached(nn.Sequential(lin)) as hooked:
    ...     len(lin._forward_hooks), id(lin) in hooked
    (0, True)
    >>> len(lin._forward_hooks)
    1
    """
    saved: list[tuple[dict[int, Any], list[tuple[int, Any]]]] = []
    hooked: set[int] = set()
    try:
        for m in model.modules():
            for attr, _ in _KINDS:
                hooks: dict[int, Any] | None = getattr(m, attr, None)
                if not hooks or all(isinstance(h, GateHook) for h in hooks.values()):
                    continue
                items = list(hooks.items())
                saved.append((hooks, items))
                hooked.add(id(m))
                for k, h in items:
                    if not isinstance(h, GateHook):
                        del hooks[k]
        registry = nn.modules.module
        for attr, _ in _GLOBAL_KINDS:
            ghooks: dict[int, Any] | None = getattr(registry, attr, None)
            if ghooks:
                saved.append((ghooks, list(ghooks.items())))
                ghooks.clear()
        yield hooked
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


def copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give module ``dst`` (a rewritten copy of ``src``) ``src``'s user hooks, in their order,
    with their flags (``with_kwargs``, ``always_call``, full backward hooks) and keys.

    >>> src, dst = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> _ = src.register_forward_hook(lambda mod, args, out: out + 1, always_call=True)
    >>> copy_hooks(src, dst)
    >>> len(dst._forward_hooks), len(dst._forward_hooks_always_called)
    (1, 1)
    """
    for attr, _ in _KINDS:
        hooks: dict[int, Any] = getattr(src, attr, None) or {}
        mine = [(k, h) for k, h in hooks.items() if not isinstance(h, GateHook)]
        if not mine:
            continue
        target: OrderedDict[int, Any] = getattr(dst, attr)
        target.update(mine)
        for flags in _FLAG_DICTS:
            have: dict[int, Any] = getattr(src, flags, None) or {}
            for k, _ in mine:
                if k in have:
                    getattr(dst, flags)[k] = have[k]
    if getattr(src, "_is_full_backward_hook", None) is not None and src._backward_hooks:
        dst._is_full_backward_hook = src._is_full_backward_hook
