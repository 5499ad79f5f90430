"""Each config builds exactly the keys and shapes (in order) of the official checkpoint layouts,
on the meta device: no weights, no memory."""
import pytest
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_on_meta
from tests.helpers import REPO, read_manifest

LAYOUTS = [
    ("sd-v1.tsv", "configs/stable-diffusion/v1-inference.yaml", {}),
    ("sd-v1-ema.tsv", "configs/stable-diffusion/v1-inference.yaml", {"model.params.use_ema": True}),
    ("sd-v1-inpainting.tsv", "configs/stable-diffusion/v1-inpainting-inference.yaml", {}),
    ("ldm-inpainting-big.tsv", "models/ldm/inpainting_big/config.yaml", {}),
    # SD 2: the base and 768-v layouts are identical (eps vs v is not in the file)
    ("sd-v2.tsv", "configs/stable-diffusion/v2-inference.yaml", {}),
    ("sd-v2-v.tsv", "configs/stable-diffusion/v2-inference-v.yaml", {}),
    ("sd-v2-inpainting.tsv", "configs/stable-diffusion/v2-inpainting-inference.yaml", {}),
]


def _missing_class(config) -> str:
    """Why the config's cond stage cannot be built ("" when it can)."""
    from ldm.modules.encoders import modules

    target = config.model.params.get("cond_stage_config", {})
    name = target.get("target", "") if hasattr(target, "get") else ""
    if name.startswith("ldm.modules.encoders.modules."):
        cls = getattr(modules, name.rsplit(".", 1)[1], None)
        if cls is None or issubclass(cls, getattr(modules, "_NotProvided", ())):
            return f"{name} is not provided yet"
    return ""


@pytest.mark.parametrize("manifest,config,overrides", LAYOUTS, ids=[m for m, _, _ in LAYOUTS])
def test_config_builds_official_layout(spec_dir, manifest, config, overrides):
    cfg = OmegaConf.load(REPO / config)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    if _missing_class(cfg):
        pytest.skip(_missing_class(cfg))
    model = instantiate_on_meta(cfg.model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / manifest)
    assert len(ours) == len(expected)
    mismatches = [(o, e) for o, e in zip(ours, expected) if o != e]
    assert not mismatches, mismatches[:5]
    # built on meta: nothing was allocated for the networks
    assert all(p.is_meta for p in model.parameters())
