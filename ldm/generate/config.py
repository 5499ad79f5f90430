"""Reading a model config: the file itself, its geometry and its family (:mod:`ldm.families`),
without building a model. :func:`describe_config` and :func:`describe_model` give the one
:class:`ModelSpec` that the scripts, the CLI checks and the pipeline all read."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ldm.errors import UserInputError
from ldm.families import Family, facts_from_config, facts_from_model, family_of
from ldm.util import config_get

__all__ = ["load_config", "config_get", "config_needs_safety_checker", "ModelGeometry", "model_geometry",
           "ModelSpec", "describe_config", "describe_model", "check_image_size"]

PathLike = Union[str, "os.PathLike[str]"]


def load_config(path: PathLike):
    """Read a model YAML config.

    :returns: an OmegaConf ``DictConfig`` with a ``model`` node.
    :raises UserInputError: one line for a missing, unreadable or malformed file.
    """
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"config {p}: file not found; pass --config with the YAML file that matches the "
                             "checkpoint (e.g. configs/stable-diffusion/v1-inference.yaml)")
    try:
        config = OmegaConf.load(p)
    except Exception as exc:  # yaml.YAMLError, OmegaConf errors, UnicodeDecodeError: all mean "bad file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"config {p} cannot be read as YAML ({first}); pass a model config file") from None
    if not hasattr(config, "get") or config.get("model") is None or "target" not in config.model:
        raise UserInputError(f"config {p} has no 'model: {{target: ..., params: ...}}' section; "
                             "pass a model config such as configs/stable-diffusion/v1-inference.yaml")
    return config


def config_needs_safety_checker(config: Mapping[str, Any]) -> bool:
    """Whether images of this model go through the safety checker: the family's default, unless the
    config declares otherwise in a top-level section beside ``model:`` (the bundled demo model)::

        demo:
          safety_checker: false
    """
    return describe_config(config).safety_checker


@dataclass(frozen=True)
class ModelGeometry:
    """Image and latent sizes of a model, and how the pipeline conditions it.

    :ivar kind: the family's kind (:attr:`ldm.families.Family.kind`): ``"txt2img"``,
        ``"sd-inpaint"``, ``"ldm-inpaint"``, ``"upscale"``, ``"unclip"``, ``"depth"``, ``"sdxl"``,
        ``"uncond"``, ``"class"``, ``"superres"`` or ``"other"``.
    :ivar latent_channels: ``C`` of the latents.
    :ivar factor: pixels per latent position (``f``: 8 for SD's VAE, 4 for the VQ-f4 model).
    :ivar unet_multiple: the UNet needs latent sides that are multiples of this
        (``2 ** (len(channel_mult) - 1)``); other sizes are padded inside each model call.
    """

    kind: str
    latent_channels: int
    factor: int
    unet_multiple: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything decided about a model before it runs: its family, its geometry, and the defaults
    that follow from both (a config's ``demo:`` section overrides the family's size and safety
    checker, as for the bundled demo model).

    :ivar height, width: default image size in pixels.
    :ivar safety_checker: whether its images go through the safety checker unless turned off.
    """

    family: Family
    geometry: ModelGeometry
    height: int
    width: int
    safety_checker: bool

    @property
    def kind(self) -> str:
        return self.family.kind


def model_geometry(config: Mapping[str, Any]) -> ModelGeometry:
    """Read :class:`ModelGeometry` from a config (the whole YAML or its ``model`` node)."""
    return describe_config(config).geometry


def describe_config(config: Mapping[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` of a config (the whole YAML or its ``model`` node)."""
    node = config.get("model", config) if hasattr(config, "get") else config
    params = config_get(node, "params", default={})
    facts = facts_from_config(node)
    family = family_of(facts)
    ch_mult = config_get(params, "first_stage_config", "params", "ddconfig", "ch_mult", default=[1, 2, 4, 4])
    unet_mult = config_get(params, "unet_config", "params", "channel_mult",
                           default=config_get(params, "network_config", "params", "channel_mult", default=[1, 2, 4, 4]))
    geometry = ModelGeometry(family.kind, facts.latent_channels, 2 ** (len(ch_mult) - 1), 2 ** (len(unet_mult) - 1))
    demo = config_get(config, "demo", default=None) if node is not config else None
    return ModelSpec(family, geometry,
                     height=int(config_get(demo, "height", default=family.size[0])),
                     width=int(config_get(demo, "width", default=family.size[1])),
                     safety_checker=bool(config_get(demo, "safety_checker", default=family.safety_checker)))


def describe_model(model) -> ModelSpec:
    """The :class:`ModelSpec` of a built model, when no config is at hand (family defaults)."""
    family = family_of(facts_from_model(model))
    levels = len(model.model.diffusion_model.channel_mult)
    geometry = ModelGeometry(family.kind, int(model.channels), int(model.first_stage_model.downsample_factor),
                             2 ** (levels - 1))
    return ModelSpec(family, geometry, height=family.size[0], width=family.size[1],
                     safety_checker=family.safety_checker)


def check_image_size(factor: int, width: Optional[int], height: Optional[int],
                     names: Sequence[str] = ("width", "height")) -> None:
    """Each given side must be a positive multiple of ``factor``.

    :param names: how the sides are called in the message (``("--W", "--H")`` for the CLI).
    :raises UserInputError: naming the side, its value and a valid one.
    """
    for name, value in zip(names, (width, height)):
        if value is None or (value >= factor and value % factor == 0):
            continue
        fix = max(factor, value - value % factor)
        raise UserInputError(f"{name} {value} is not a multiple of {factor}; use {name} {fix} or another multiple "
                             f"of {factor} (image sides must be multiples of {factor} for this model)")


def checkpoint_family_hint(ckpt: PathLike, spec: ModelSpec) -> str:
    """For a checkpoint that did not load with its config: which family the file looks like (from
    its keys and shapes, :func:`ldm.families.facts_from_state_dict`) and the config that fits it;
    ``""`` when that is the config's own family or cannot be told. The SD 2 512-base and 768-v
    files have the same keys, so they are named together."""
    from ldm.checkpoint import CheckpointError, read_checkpoint
    from ldm.families import facts_from_state_dict

    try:
        state_dict = read_checkpoint(ckpt).state_dict
    except CheckpointError:
        return ""
    facts = facts_from_state_dict({k: tuple(v.shape) for k, v in state_dict.items()})
    if facts is None:
        return ""
    found = family_of(facts)
    if found.name == spec.family.name == "sd-v2-unclip":  # H and L differ in the image embedding's width
        adm = state_dict.get("model.diffusion_model.label_emb.0.0.weight")
        which = {1536: ("L", "l"), 2048: ("H", "h")}.get(int(adm.shape[1]) if adm is not None else 0)
        return (f"the checkpoint is Stable unCLIP-{which[0]} (image embedding and noise level {adm.shape[1]} wide): "
                f"its config is configs/stable-diffusion/v2-1-stable-unclip-{which[1]}-inference.yaml") if which else ""
    same = {found.name, spec.family.name} <= {"sd-v2", "sd-v2-v"} or found.name == spec.family.name
    if same or found.name == "unknown":
        return ""
    if found.name == "sd-v2":
        return (f"the checkpoint is a Stable Diffusion 2 text-to-image model: pass --config {found.config} "
                "(configs/stable-diffusion/v2-inference-v.yaml for the 768-v files)")
    return f"the checkpoint is {found.title}: pass --config {found.config}"
