"""The one checkpoint loader used by the scripts, the tests and the Python API.

* Reads ``.ckpt``/``.pt``/``.pth`` pickles and ``.safetensors``, with or without the
  Lightning ``{"state_dict": ...}`` wrapper.
* Never runs code from a file: pickles go through torch's weights-only unpickler, extended by an
  allow-list of the few non-tensor globals found in Lightning-era checkpoints (stubbed, never
  imported). Anything else is refused with an error naming the global.
* Checks keys strictly. Only the known benign differences of the official files are tolerated
  (see :data:`BENIGN` and docs/architecture.md); any other missing, unexpected or wrongly shaped key
  is a :class:`CheckpointError` listing the first few keys.
* Builds the model on the ``meta`` device and assigns the file's tensors, so no time or memory goes
  into random init of a billion parameters; can cast straight to fp16/bf16.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ldm.ops import release_mapped_range

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

ORIGINAL_CKPT_PATH = "models/ldm/stable-diffusion-v1/model.ckpt"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
EMA_PREFIX = "model_ema."
UNET_PREFIX = "model."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the problem and the fix."""


# ----------------------------------------------------------------------------- reading files
class _LightningStub:
    """Stand-in for classes pickled into Lightning checkpoints (callbacks): holds their state, runs nothing."""

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def _stub(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[1], (_LightningStub,), {"__module__": qualname.rsplit(".", 1)[0]})


# Globals that real Lightning-era checkpoints (PL 1.x, the SD v1 and LDM releases) contain besides
# tensors. Each maps to a harmless stub or a pure data constructor.
_LIGHTNING_GLOBALS = [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
]


def _allowed_globals() -> list:
    import numpy as np

    allowed: list = [(_stub(name), name) for name in _LIGHTNING_GLOBALS]
    # numpy scalars and dtypes (e.g. a best_model_score stored as a numpy float)
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return allowed


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found in a file."""

    state_dict: dict
    global_step: Optional[int]
    path: Path


def read_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None) -> Checkpoint:
    """Read a checkpoint file safely.

    :param path: ``.ckpt``/``.pt``/``.pth`` (torch pickle, zip or legacy format) or ``.safetensors``.
    :param device: where tensors land (memory-mapped on the CPU where the format allows).
    :param dtype: the float dtype the caller will cast the networks to. A ``.safetensors`` file
        whose floats are stored in another dtype is then read tensor by tensor and each one cast
        as it is read (top-level keys, the noise schedule, stay as stored), so peak memory is the
        model in ``dtype`` plus one tensor, not the whole file besides it.
    :raises CheckpointError: for a missing, unreadable, truncated or code-carrying file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass --ckpt PATH; the original scripts "
                              f"expected it at {ORIGINAL_CKPT_PATH})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    global_step = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = _read_safetensors_cast(path, dtype) if dtype is not None else None
            if obj is None:
                obj = load_file(str(path), device=str(device))
            elif str(device) != "cpu":
                obj = {k: v.to(device) for k, v in obj.items()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({_first_line(e)})") from None
    else:
        obj = load_pickle(path, device)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        step = obj.get("global_step")
        global_step = int(step) if isinstance(step, (int, torch.Tensor)) else None
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict (found {type(obj).__name__})")
    state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [k for k in obj if k not in state_dict]
    if skipped:
        log.warning("ignoring %d non-tensor entries in %s (first: %s)", len(skipped), path, skipped[:3])
    if global_step is not None:
        log.info("Global Step: %d", global_step)
    return Checkpoint(state_dict, global_step, path)


#: safetensors dtype names (the format's header) -> torch dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_safetensors_cast(path: Path, dtype: torch.dtype) -> Optional[dict]:
    """The tensors of a ``.safetensors`` file with every float tensor below the top level cast to
    ``dtype`` as it is read, or None when no tensor needs a cast (the caller then memory-maps the
    file: nothing is read until it is used).

    The file is mapped read-only and walked in file order; each tensor is cast (or copied) out of
    the mapping and the pages it occupied are then released (:func:`ldm.ops.release_mapped_range`),
    so the process never holds much more than the model in ``dtype``.

    Format: 8 bytes little-endian header length N, N bytes of JSON ``{key: {dtype, shape,
    data_offsets: [begin, end]}}`` (offsets from the end of the header), then the data."""
    import json
    import mmap
    import warnings

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = []
        for key, info in header.items():
            src = _ST_DTYPES.get(info["dtype"])
            if src is None:
                raise ValueError(f"tensor {key} has the unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            if 8 + n + end > size or end - begin != src.itemsize * math.prod(info["shape"]):
                raise ValueError(f"tensor {key} lies past the end of the file or has the wrong size")
            entries.append((begin, end, key, src, info["shape"]))
        def cast(key: str, src: torch.dtype) -> bool:  # the networks' floats; the schedule and sgm's levels stay
            return src.is_floating_point and src != dtype and "." in key and key != "denoiser.sigmas"

        if not any(cast(key, src) for _, _, key, src, _ in entries):
            return None
        out = {}
        base = 8 + n
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for begin, end, key, src, shape in sorted(entries):  # file order
                if end == begin:
                    out[key] = torch.empty(shape, dtype=src)
                    continue
                with warnings.catch_warnings():  # frombuffer warns that the mapping is read-only; it is only read
                    warnings.simplefilter("ignore", UserWarning)
                    view = torch.frombuffer(mm, dtype=src, count=(end - begin) // src.itemsize, offset=base + begin)
                out[key] = (view.to(dtype) if cast(key, src) else view.clone()).reshape(shape)
                del view
                release_mapped_range(mm, base + begin, base + end)
    return out


def load_pickle(path: Path, device) -> Any:  # a pickled .ckpt/.pt, weights only, whole (also nested dicts)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        if found:
            name = found.group(1).rstrip(".")
            raise CheckpointError(f"refusing to load {path}: it pickles the global {name!r}, which could run code "
                                  f"on load; convert the file to .safetensors in a trusted environment") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); "
                              f"download it again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- matching keys
def ema_key(param_name: str) -> str:
    """Checkpoint key of the EMA shadow of ``model.<param_name>``: dots removed."""
    return EMA_PREFIX + param_name[len(UNET_PREFIX):].replace(".", "")


BENIGN = """\
- cond_stage_model...embeddings.position_ids: present in files written with transformers < 4.31
  (all official SD v1 files), absent from newer ones; always reset to arange(77).
- model_ema.decay / model_ema.num_updates / model_ema.* shadows in a file whose config has
  use_ema False (the official sd-v1-*.ckpt files): ignored, as the reference did.
- model_ema.* absent while the config has use_ema True (e.g. the SD inpainting release): the
  shadows start as copies of the loaded weights, so ema_scope() changes nothing.
- the 12 noise-schedule buffers absent (some community conversions): the values computed from
  the config are kept. (The model names such keys in its ``optional_checkpoint_keys``.)
"""


def resolve_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], use_ema: Optional[bool] = None,
                       ignore_keys=(), path: Any = "checkpoint") -> dict:
    """Match a file's state dict to ``model``'s keys.

    :param use_ema: ``None``: what the reference does with the config's ``use_ema`` (shadows are
        loaded into ``model_ema`` when the model has one, else ignored). ``True``: run the EMA
        weights (copied from ``model_ema.*`` into ``model.diffusion_model.*``). ``False``: run the
        non-EMA weights and ignore the shadows.
    :returns: the state dict to assign; keys the model has but the file lacks are left out when
        they are benign (see :data:`BENIGN`).
    :raises CheckpointError: listing the first mismatching keys.
    """
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_keys)}
    expected = model.state_dict(keep_vars=True)
    has_ema_module = hasattr(model, "model_ema") and getattr(model, "use_ema", False)

    if use_ema:
        unet_keys = [k for k in expected if k.startswith(UNET_PREFIX)]
        missing_shadows = [k for k in unet_keys if ema_key(k) not in sd]
        if missing_shadows:
            raise CheckpointError(f"{path} has no EMA weights (model_ema.* missing, e.g. {ema_key(missing_shadows[0])}); "
                                  "load it without the EMA option (EMA-only releases already hold EMA weights)")
        for k in unet_keys:
            sd[k] = sd[ema_key(k)]
    if not has_ema_module or use_ema is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}

    unexpected = [k for k in sd if k not in expected]
    # model_ema.* may be absent: shadows are then copied (use_ema None) or the module is dropped.
    optional = frozenset(getattr(model, "optional_checkpoint_keys", ()))
    missing = [k for k in expected if k not in sd and not _benign_missing(k, optional, has_ema_module)]
    wrong_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in sd
                   if k in expected and sd[k].shape != expected[k].shape]
    if missing and not unexpected and not wrong_shape and (lacks := [w for p, w in getattr(  # a whole part absent
            model, "checkpoint_parts", {}).items() if all(k.startswith(p) for k in missing)]):
        raise CheckpointError(f"{path} lacks {lacks[0]} ({len(missing)} tensors missing, e.g. {missing[0]})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys of the wrong shape ({'; '.join(wrong_shape[:3])})")
    if problems:
        raise CheckpointError(f"{path} does not match the model config: {'; '.join(problems)}; the config probably "
                              "does not match the checkpoint (pass the config it was trained with, e.g. "
                              "v1-inpainting-inference.yaml for an inpainting checkpoint)")
    return sd


def _benign_missing(key: str, optional: frozenset, ema_allowed_missing: bool) -> bool:
    return (key == POSITION_IDS or key in optional or key in EMA_COUNTERS
            or (ema_allowed_missing and key.startswith(EMA_PREFIX)))


def load_weights_into(model: nn.Module, source: Union[PathLike, Mapping[str, torch.Tensor]],
                      use_ema: Optional[bool] = None, ignore_keys=(), only_model: bool = False,
                      assign: bool = False, dtype: Optional[torch.dtype] = None) -> Optional[int]:
    """Load a checkpoint (path or state dict) into ``model`` strictly; returns the global step.

    :param assign: take the file's tensors as the parameters (for a model built on ``meta``);
        otherwise copy into the existing ones.
    :param only_model: load only the UNet (``model.*`` keys), as the reference's ``load_only_unet``.
    :param dtype: the dtype the networks will be cast to (see :func:`read_checkpoint`).
    """
    global_step = None
    path: Any = "state dict"
    if not isinstance(source, Mapping):
        ckpt = read_checkpoint(source, dtype=dtype)
        source, global_step, path = ckpt.state_dict, ckpt.global_step, ckpt.path
    elif assign:
        # The model will own these tensors (and may write to them, e.g. ema_scope): copy the
        # caller's. A path loads without the copy.
        source = {k: v.clone() for k, v in source.items()}
    if only_model:
        source = {k: v for k, v in source.items() if k.startswith(UNET_PREFIX)}
        model = _DiffusionModelOnly(model)
    sd = resolve_state_dict(model, source, use_ema=use_ema, ignore_keys=ignore_keys, path=path)
    model.load_state_dict(sd, strict=False, assign=assign)
    _finish_load(model, sd, use_ema)
    return global_step


class _DiffusionModelOnly(nn.Module):
    """A diffusion model with only its ``.model`` (the UNet wrapper) as child, so a UNet-only file
    (``only_model``) is checked strictly against the ``model.*`` keys and loaded into them."""

    def __init__(self, full: nn.Module):
        super().__init__()
        self.model = full.model


def _finish_load(model: nn.Module, sd: Mapping[str, torch.Tensor], use_ema: Optional[bool]) -> None:
    """Fix up what a file legitimately lacks (see :data:`BENIGN`) and apply the EMA choice."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    if POSITION_IDS in tensors:
        pos = tensors[POSITION_IDS]
        expected = torch.arange(pos.shape[-1], device="cpu").expand(pos.shape)
        if POSITION_IDS in sd and not pos.is_meta and not torch.equal(pos.cpu().long(), expected):
            log.warning("position_ids in the checkpoint are not 0..%d (a known fault of some merged files); "
                        "reset to arange", pos.shape[-1] - 1)
        _set_tensor(model, POSITION_IDS, expected.clone())
    ema = getattr(model, "model_ema", None)
    if ema is not None:
        if use_ema is not None:
            # The choice was made at load time: the UNet holds the weights to run; drop the shadows.
            del model.model_ema
            model.use_ema = False
        else:
            for name, s_name in ema.m_name2s_name.items():
                if EMA_PREFIX + s_name not in sd:
                    _set_tensor(ema, s_name, tensors[UNET_PREFIX + name].detach().clone())
            for counter in ("decay", "num_updates"):
                if getattr(ema, counter).is_meta:
                    _set_tensor(ema, counter, torch.tensor(0.9999 if counter == "decay" else 0,
                                                           dtype=torch.float32 if counter == "decay" else torch.int))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal error: {len(left)} tensors were not loaded ({', '.join(left[:4])})")


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    module_path, _, name = dotted.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = value


# ----------------------------------------------------------------------------- building models
def instantiate_on_meta(config) -> nn.Module:
    """Build ``config`` (a ``{target, params}`` node) on the meta device: no memory, no init.

    The ``torch.nn.init`` initialisers are no-ops meanwhile: on meta they compute nothing, and
    ``normal_`` (``nn.Embedding``'s init) would import ``torch._dynamo`` on the way, about a
    second of every model load. (Not thread-safe: another thread initialising modules at the
    same moment would skip its init too.)"""
    from ldm.util import instantiate_from_config

    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, _no_init)
        with torch.device("meta"):
            return instantiate_from_config(config)
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _no_init(tensor, *args, **kwargs):
    return tensor


def cast_model(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Cast the networks to ``dtype``; the noise-schedule buffers stay float32 and integer
    buffers stay integers."""
    if dtype is None:
        return model
    for child in model.children():
        child.to(dtype)
    return model


def load_model_from_config(config, ckpt: Union[PathLike, Mapping[str, torch.Tensor]],
                           device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                           use_ema: Optional[bool] = None) -> nn.Module:
    """Build the model of ``config`` and load ``ckpt`` into it, ready for inference.

    :param config: the whole YAML (with a ``model`` node) or the model node itself.
    :param dtype: None keeps float32; torch.float16/bfloat16 cast the networks (not the schedule).
    :param use_ema: see :func:`resolve_state_dict`.
    :returns: the model in eval mode on ``device``.
    """
    node = config["model"] if "model" in config else config
    model = instantiate_on_meta(node)
    float_dtype = dtype or torch.float32
    load_weights_into(model, ckpt, use_ema=use_ema, assign=True, dtype=float_dtype)
    cast_model(model, float_dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def save_checkpoint(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], path: PathLike,
                    global_step: Optional[int] = None) -> Path:
    """Write a checkpoint in the official layout: ``.safetensors``, or a ``.ckpt`` pickle with
    the ``{"state_dict": ..., "global_step": ...}`` wrapper. Refuses to overwrite a file."""
    path = Path(path)
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else dict(model_or_state_dict)
    sd = {k: v.detach() for k, v in sd.items()}
    if path.exists():
        raise CheckpointError(f"{path} exists; choose another name (checkpoints are never overwritten)")
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        seen: set = set()
        unique = {}
        for k, v in sd.items():  # safetensors refuses shared storage (e.g. aliased first/cond stage)
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), v.shape)
            unique[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
            seen.add(ptr)
        save_file(unique, str(tmp), metadata={"global_step": str(global_step)} if global_step is not None else None)
    else:
        torch.save({"state_dict": sd, "global_step": global_step}, tmp)
    os.replace(tmp, path)
    return path
