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
]


@pytest.mark.parametrize("manifest,config,overrides", LAYOUTS, ids=[m for m, _, _ in LAYOUTS])
def test_config_builds_official_layout(spec_dir, manifest, config, overrides):
    cfg = OmegaConf.load(REPO / config)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    model = instantiate_on_meta(cfg.model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / manifest)
    assert len(ours) == len(expected)
    mismatches = [(o, e) for o, e in zip(ours, expected) if o != e]
    assert not mismatches, mismatches[:5]
    # built on meta: nothing was allocated for the networks
    assert all(p.is_meta for p in model.parameters())
