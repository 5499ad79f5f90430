"""SDXL against an independent implementation on shared random weights: diffusers' UNet (with its
``text_time`` added embedding), transformers' CLIP text models (CLIP-L hidden layer 11; bigG
penultimate layer and projected pooled output) and diffusers' VAE, each loaded with our state dict
converted by diffusers' own single-file conversion functions. The tiny size (the fixture's
architecture) always runs; the full SDXL base size is ``slow`` (about 14 GB of memory, minutes)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import rel_err
from tests.test_diffusers_unet import random_state_dict
from tests.test_sdxl import BASE_YAML, one_thread, tiny_config  # noqa: F401  (one_thread: autouse fixture)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SIZES = ["tiny", pytest.param("full", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def fx(spec_dir) -> dict:
    return torch.load(spec_dir / "fixtures" / "sdxl-tiny-parity.pt", weights_only=True)


def _config(size, fx):
    return tiny_config(fx) if size == "tiny" else OmegaConf.load(BASE_YAML)


def _built(node, seed: int):
    """Our module of ``node`` with random weights (built on meta, then assigned): ``(module, state dict)``."""
    from ldm.checkpoint import instantiate_on_meta

    module = instantiate_on_meta(node)
    sd = random_state_dict(module, seed)
    module.load_state_dict(sd, assign=True)
    return module.eval(), sd


@pytest.mark.parametrize("size", SIZES)
def test_unet_matches_diffusers(fx, size):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    from sgm.modules.encoders.modules import ConcatTimestepEmbedderND

    config = _config(size, fx)
    ours, sd = _built(config.model.params.network_config, seed=1)
    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}
    dconfig = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config, resolve=True), ckpt)
    dconfig.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)  # SDXL's
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dconfig)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dconfig), strict=True, assign=True)
    theirs.eval()
    del ckpt, sd

    g = torch.Generator().manual_seed(3)
    p = config.model.params.network_config.params
    pooled_dim = p.adm_in_channels - 6 * 256
    x = torch.randn(2, 4, 16, 24, generator=g)
    t = torch.tensor([981, 17])
    context = torch.randn(2, 77, p.context_dim, generator=g)
    pooled = torch.randn(2, pooled_dim, generator=g)
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [896, 1152, 24, 48, 768, 1344]])
    y = torch.cat([pooled, ConcatTimestepEmbedderND(256)(time_ids)], dim=1)
    with torch.no_grad():
        a = ours(x, timesteps=t, context=context, y=y)
        b = theirs(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.float()}).sample
    assert rel_err(a, b) < 1e-4
    assert a.std() > 0.01


def _hf_keys(model, sd: dict) -> dict:
    """``sd`` in the key names of this transformers version (5 dropped the ``text_model.`` level)."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.replace("text_model.", "", 1): v for k, v in sd.items()}


@pytest.mark.parametrize("size", SIZES)
def test_text_encoders_match_transformers(fx, size):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = _config(size, fx)
    cond, sd = _built(config.model.params.conditioner_config, seed=2)
    clip_l, big_g = cond.embedders[0], cond.embedders[1]
    prompts = ["a photograph of an astronaut riding a horse", ""]
    ids_l = clip_l.tokenize(prompts).input_ids
    ids_g = big_g.tokenize(prompts).input_ids

    lc = clip_l.transformer.config
    hf_l = CLIPTextModel(CLIPTextConfig(vocab_size=lc.vocab_size, hidden_size=lc.hidden_size,
                                        intermediate_size=lc.intermediate_size, num_hidden_layers=lc.num_hidden_layers,
                                        num_attention_heads=lc.num_attention_heads, hidden_act="quick_gelu",
                                        max_position_embeddings=77, eos_token_id=49407)).eval()
    prefix = "0.transformer."
    missing, unexpected = hf_l.load_state_dict(_hf_keys(hf_l, {k[len("embedders.") + len(prefix):]: v for k, v in
                                                               sd.items() if k.startswith("embedders." + prefix)}),
                                               strict=False)
    assert all("position_ids" in k for k in missing + unexpected)  # a buffer in some transformers versions

    gc = big_g.model.config
    hf_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=gc.vocab_size, hidden_size=gc.width, intermediate_size=gc.mlp_width, num_hidden_layers=gc.layers,
        num_attention_heads=gc.heads, hidden_act="gelu", projection_dim=gc.embed_dim, max_position_embeddings=77,
        eos_token_id=49407)).eval()
    converted = convert_open_clip_checkpoint(hf_g, {"m." + k[len("embedders.1.model."):]: v for k, v in sd.items()
                                                    if k.startswith("embedders.1.model.")}, prefix="m.")
    missing, unexpected = hf_g.load_state_dict(_hf_keys(hf_g, converted), strict=False)
    assert all("position_ids" in k for k in missing + unexpected)  # a buffer in some transformers versions

    with torch.no_grad():
        ours_l = clip_l(prompts)
        ours_g, ours_pooled = big_g(prompts)
        theirs_l = hf_l(ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = hf_g(ids_g, output_hidden_states=True)
    assert rel_err(ours_l, theirs_l) < 1e-4
    assert rel_err(ours_g, out_g.hidden_states[-2]) < 1e-4
    assert rel_err(ours_pooled, out_g.text_embeds) < 1e-4


@pytest.mark.parametrize("size", SIZES)
def test_vae_matches_diffusers(fx, size):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = _config(size, fx)
    ours, sd = _built(config.model.params.first_stage_config, seed=4)
    ckpt = {"first_stage_model." + k: v for k, v in sd.items()}
    original = OmegaConf.to_container(config, resolve=True)
    dconfig = create_vae_diffusers_config_from_ldm(original, ckpt, scaling_factor=0.13025)
    with torch.device("meta"):
        theirs = AutoencoderKL(**dconfig)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dconfig), strict=True, assign=True)
    theirs.eval()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 16, 16, generator=g)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours.decode(z), theirs.decode(z).sample) < 1e-4
        assert rel_err(ours.encode(x).mean, theirs.encode(x).latent_dist.mean) < 1e-4
