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
