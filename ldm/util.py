"""The `target`/`params` factory used by every YAML config, and small shared helpers."""
from __future__ import annotations

import importlib
from typing import Any, Mapping


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import and return the object named by a dotted path, e.g. ``"torch.nn.Identity"``.

    :param string: ``"package.module.Name"``.
    :param reload: re-import the module first (as the reference allowed).
    :raises ImportError: with the path in the message when the module or attribute is missing.
    """
    module, _, name = string.rpartition(".")
    if not module:
        raise ImportError(f"config target {string!r} is not a dotted path like 'package.module.Class'")
    mod = importlib.import_module(module)
    if reload:
        mod = importlib.reload(mod)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ImportError(f"config target {string!r}: module {module!r} has no attribute {name!r}") from None


def config_get(node: Any, *keys: str, default: Any = None) -> Any:
    """``node[keys[0]][keys[1]]...`` of a config (OmegaConf or dict), or ``default`` where missing."""
    for key in keys:
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key)
    return default if node is None else node


_SENTINELS = ("__is_first_stage__", "__is_unconditional__")


def instantiate_from_config(config: Mapping[str, Any] | str, **extra: Any) -> Any:
    """Build ``config["target"](**config["params"], **extra)``.

    Accepts a dict or an OmegaConf node. The reference's two sentinel strings
    ``"__is_first_stage__"`` and ``"__is_unconditional__"`` return ``None``: the caller decides
    what they mean (``LatentDiffusion`` reuses the first stage or has no text encoder).

    :raises KeyError: when the node has no ``target``.
    """
    if isinstance(config, str):
        if config in _SENTINELS:
            return None
        raise KeyError(f"config node {config!r} is neither {{target: ..., params: ...}} nor one of {_SENTINELS}")
    if "target" not in config:
        raise KeyError("config node has no 'target' key; expected {target: package.Class, params: {...}}")
    params = config.get("params", None) or {}
    if not isinstance(params, dict):
        from omegaconf import OmegaConf

        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(config["target"])(**params, **extra)


def count_params(model, verbose: bool = False) -> int:
    """Number of parameters of ``model``; prints it in millions when ``verbose``."""
    n = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {n * 1.e-6:.2f} M params.")
    return n


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` unless it is None, else ``d`` (called first when it is a function)."""
    if val is not None:
        return val
    return d() if callable(d) else d
