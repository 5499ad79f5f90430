"""Small helpers shared by the tests."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "v1-tiny.yaml"
DEMO_WEIGHTS = REPO / "models" / "demo" / "demo.safetensors"
DEMO_CONFIG = REPO / "configs" / "demo" / "demo-txt2img.yaml"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def read_manifest(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) rows of a spec manifest, in state_dict order."""
    rows = []
    for line in path.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t", 2)
        dims = shape.strip("[]")
        rows.append((key, tuple(int(d) for d in dims.split(",")) if dims else ()))
    return rows


def load_config(path=TINY_CONFIG, **overrides):
    cfg = OmegaConf.load(path)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def unet_block_outputs(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y=None) -> dict:
    """One UNet call's intermediate tensors by the names the parity fixtures use: ``unet_input``,
    ``time_embed``, ``input_blocks.i``, ``middle_block``, ``output_blocks.i``, and the sinusoidal
    timestep embedding ``t_emb_sinusoidal``; with a vector ``y`` (SDXL) also ``label_emb``."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    got = {}
    hooks = [unet.time_embed.register_forward_hook(lambda m, i, o: got.__setitem__("time_embed", o)),
             unet.middle_block.register_forward_hook(lambda m, i, o: got.__setitem__("middle_block", o)),
             unet.register_forward_pre_hook(lambda m, i: got.__setitem__("unet_input", i[0]))]
    if y is not None:
        hooks.append(unet.label_emb.register_forward_hook(lambda m, i, o: got.__setitem__("label_emb", o)))
    for group in ("input_blocks", "output_blocks"):
        for i, block in enumerate(getattr(unet, group)):
            hooks.append(block.register_forward_hook(lambda m, inp, o, n=f"{group}.{i}": got.__setitem__(n, o)))
    try:
        with torch.no_grad():
            unet(x, t, context=context, **({} if y is None else {"y": y}))
    finally:
        for h in hooks:
            h.remove()
    got["t_emb_sinusoidal"] = timestep_embedding(t, unet.model_channels)
    return got


def unet_and_diffusers_outputs(ours, theirs, context_dim: int) -> tuple:
    """``(ours, theirs, ours at t + 0.5, theirs at t + 0.5)`` of one call on shared random inputs
    (latent 2x4x16x16, timesteps 981 and 1, a random context of width ``context_dim``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981, 1])
    context = torch.randn(2, 77, context_dim, generator=g)
    with torch.no_grad():
        return (ours(x, t, context=context), theirs(x, t, encoder_hidden_states=context).sample,
                ours(x, t.float() + 0.5, context=context), theirs(x, t.float() + 0.5, encoder_hidden_states=context).sample)


class Recorder:
    """A model whose ``apply_model`` calls are recorded (everything else is the model's)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply_model(self, x, t, cond):
        out = self.model.apply_model(x, t, cond)
        self.calls.append((x.clone(), t.clone(), out.clone()))
        return out


def help_entries(text: str) -> dict:
    """``--help`` output -> ``{first flag name: its whole entry on one line}`` (option entries
    start with two spaces and a dash; their continuation lines are indented further)."""
    entries, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def register_tiny_openclip(fixtures: Path) -> None:
    """Register the SD 2 fixtures' tiny open_clip arch (``ldmtest-tiny-ViT-H-14``, in ``fixtures``)."""
    import json

    from ldm.modules.encoders.open_clip import register_open_clip_arch

    register_open_clip_arch("ldmtest-tiny-ViT-H-14", json.loads((fixtures / "ldmtest-tiny-ViT-H-14.json").read_text()))


def delta_state_dict(delta: Path, base: Path) -> dict:
    """The full state dict of a delta checkpoint of the SD 2 fixtures (sd2.md, "Delta checkpoints"):
    its own tensors, the rest from ``base``, in its ``key_order``."""
    base_sd = torch.load(base, weights_only=True)["state_dict"]
    ck = torch.load(delta, weights_only=True)
    assert ck["base_checkpoint"] == base.name
    return {k: ck["state_dict"][k] if k in ck["state_dict"] else base_sd[k]
            for k in ck["key_order"] if k in ck["state_dict"] or k in ck["keys_from_base"]}
