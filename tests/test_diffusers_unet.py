"""Full SD v1 UNet on random weights against an independent implementation: diffusers'
UNet2DConditionModel loaded with our state dict converted by diffusers' own single-file
conversion functions. (VAE and CLIP have their own such tests.)"""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_on_meta, load_weights_into
from tests.helpers import REPO, rel_err, unet_and_diffusers_outputs

diffusers = pytest.importorskip("diffusers")


def random_state_dict(module: torch.nn.Module, seed: int = 0) -> dict:
    """Random weights for every tensor of ``module`` (built on meta), scaled like a trained net:
    norms ~1, other weights ~1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            sd[k] = torch.arange(v.shape[-1]).expand(v.shape).clone()
            continue
        r = torch.randn(v.shape, generator=g)
        if "norm" in k and k.endswith("weight"):
            r = 1 + 0.1 * r
        elif v.dim() >= 2:
            r = r / (v[0].numel() ** 0.5)
        else:
            r = 0.1 * r
        sd[k] = r
    return sd


@pytest.fixture(scope="module")
def full_models():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml")
    unet_node = config.model.params.unet_config
    ours = instantiate_on_meta(unet_node)
    sd = random_state_dict(ours)
    ours.load_state_dict(sd, assign=True)
    ours.eval()

    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}
    original = OmegaConf.to_container(config, resolve=True)
    dconfig = create_unet_diffusers_config_from_ldm(original, ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, dconfig)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dconfig)
    missing, unexpected = theirs.load_state_dict(converted, strict=True, assign=True)
    theirs.eval()
    return ours, theirs


def test_full_unet_matches_diffusers(full_models):
    ours, theirs = full_models
    a, b, a_frac, b_frac = unet_and_diffusers_outputs(ours, theirs, 768)
    assert rel_err(a, b) < 1e-4
    assert rel_err(a_frac, b_frac) < 1e-4
    assert a.std() > 0.01 and rel_err(a, a_frac) > 1e-4  # a real signal that depends on t
