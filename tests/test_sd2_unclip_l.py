"""Stable unCLIP 2.1 L (``configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml``), proved
without a recorded fixture: the reference could not be recorded offline for L (its embedder is
``clip.load("ViT-L/14")`` of OpenAI's ``clip`` package), so every L-only part is checked against an
independent oracle instead; what L shares with unCLIP-H (text encoder, UNet with ``label_emb``,
DDIM, VAE) is pinned by the H fixture in ``tests/test_sd2_unclip.py``.

* The image tower (``ClipImageEmbedder``, openai CLIP ViT-L/14 ``encode_image``: ``visual.conv1``,
  ``class_embedding``, ``positional_embedding``, ``ln_pre``, pre-LN blocks with packed
  ``attn.in_proj_*`` and QuickGELU, ``ln_post`` of the class token ``@ visual.proj``) against
  ``transformers``' ``CLIPVisionModelWithProjection`` on shared random weights, mapped key by key
  here, at a tiny width and at full ViT-L/14 size (slow).
* The preprocessing (kornia 0.6's antialiased bicubic resize to 224x224, ``(x + 1) / 2``, CLIP
  mean/std) against a float64 NumPy computation of those documented steps written here, and
  against the kornia output recorded in the unCLIP-H fixture (the reference's L and H embedders run
  the same ``preprocess``); ``transformers``' ``CLIPImageProcessor`` (shortest side, centre crop)
  is a different operation, shown to give different pixels.
* The noise augmentor with a ``ViT-L-14_stats.th`` of random statistics against the formula
  ``z = unscale(sqrt(ā_l)·scale(e) + sqrt(1 − ā_l)·n)`` with ``squaredcos_cap_v2`` computed in
  float64, and the adm vector ``cat([z, timestep_embedding(l, 768)])``, 1536 = the L config's
  ``adm_in_channels``.
* A tiny model of the L layout (the project config with the H fixture's size overrides and a tiny
  openai CLIP) through ``StableDiffusion.variations`` (the ``c_adm`` reaching the UNet equals the
  oracle's) and ``scripts/variations.py``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ldm.modules.encoders.modules as encoder_modules
from ldm.checkpoint import instantiate_on_meta, load_model_from_config
from ldm.modules.encoders.open_clip import OPENAI_VIT_L14, OpenCLIPTextConfig, OpenCLIPVisionConfig
from tests.conftest import FIXTURES
from tests.helpers import REPO, delta_state_dict, register_tiny_openclip, rel_err

pytest.importorskip("transformers")  # the oracle (a test dependency, never used at run time)

UNCLIP_L_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-1-stable-unclip-l-inference.yaml"
H_TINY_CKPT = FIXTURES / "sd-v2-unclip-h-tiny-random.ckpt"
H_TINY_PARITY = FIXTURES / "sd-v2-unclip-h-tiny-parity.pt"
BASE_CKPT = FIXTURES / "sd-v2-v-tiny-random.ckpt"

#: a tiny openai CLIP (same structure as ViT-L/14: QuickGELU, patch 14 at 224, embedding width 48 =
#: the H fixture's, so that its UNet ``label_emb`` [.., 96] fits)
TINY_OPENAI_CLIP = (OpenCLIPTextConfig(width=32, heads=2, layers=2, embed_dim=48, act="quick_gelu"),
                    OpenCLIPVisionConfig(width=64, layers=2, head_width=32, output_dim=48, act="quick_gelu"))
#: the H fixture's size overrides (its meta.config_overrides) applied to the L config, plus the tiny text tower
TINY_L_OVERRIDES = {
    "model.params.unet_config.params.model_channels": 32,
    "model.params.unet_config.params.channel_mult": [1, 1, 2, 2],
    "model.params.unet_config.params.context_dim": 32,
    "model.params.unet_config.params.num_head_channels": 16,
    "model.params.unet_config.params.adm_in_channels": 96,
    "model.params.noise_aug_config.params.timestep_dim": 48,
    "model.params.first_stage_config.params.ddconfig.ch": 32,
    "model.params.first_stage_config.params.ddconfig.ch_mult": [1, 1, 2, 2],
    "model.params.first_stage_config.params.ddconfig.attn_type": "vanilla",
    "model.params.cond_stage_config.params.arch": "ldmtest-tiny-ViT-H-14",
    "model.params.cond_stage_config.params.version": None,
}


# ---------------------------------------------------------------------------------- oracles
def openai_visual_to_transformers(sd: dict, layers: int) -> dict:
    """openai ``clip`` image-tower names (``visual.*``) -> ``CLIPVisionModelWithProjection``'s.

    Every ``visual.*`` key is used exactly once (``KeyError`` / the final check otherwise)."""
    hf, used = "vision_model.", set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    out = {hf + "embeddings.patch_embedding.weight": take("visual.conv1.weight"),
           hf + "embeddings.class_embedding": take("visual.class_embedding"),
           hf + "embeddings.position_embedding.weight": take("visual.positional_embedding"),
           "visual_projection.weight": take("visual.proj").t()}  # x @ proj == Linear(weight=proj.T)
    for p in ("weight", "bias"):
        out[f"{hf}pre_layrnorm.{p}"] = take(f"visual.ln_pre.{p}")
        out[f"{hf}post_layernorm.{p}"] = take(f"visual.ln_post.{p}")
    for i in range(layers):
        ours, theirs = f"visual.transformer.resblocks.{i}.", f"{hf}encoder.layers.{i}."
        for p in ("weight", "bias"):
            q, k, v = take(f"{ours}attn.in_proj_{p}").chunk(3)  # nn.MultiheadAttention packs q, k, v rows
            out.update({f"{theirs}self_attn.q_proj.{p}": q, f"{theirs}self_attn.k_proj.{p}": k,
                        f"{theirs}self_attn.v_proj.{p}": v})
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{theirs}{b}.{p}"] = take(f"{ours}{a}.{p}")
    assert used == {k for k in sd if k.startswith("visual.")}
    return out


def transformers_vision_model(model: torch.nn.Module, vision: OpenCLIPVisionConfig):
    """``CLIPVisionModelWithProjection`` holding the weights of ``model.visual`` (an openai CLIP)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=vision.width, intermediate_size=vision.mlp_width,
                              num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
                              image_size=vision.image_size, patch_size=vision.patch_size,
                              projection_dim=vision.output_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              attn_implementation="eager")
    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(config).eval()
    sd = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    hf.load_state_dict(openai_visual_to_transformers(sd, vision.layers), strict=True, assign=True)
    for module in hf.modules():  # the non-persistent position_ids stay on meta
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
    return hf


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms too, so that a swapped or skipped norm shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if ".ln_" in f".{name}" or "ln_final" in name:
                p.copy_(1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif name.endswith("proj") or name.endswith("text_projection"):  # x @ proj: rows are inputs
                p.copy_(r / p.shape[0] ** 0.5)
            elif p.ndim >= 2 and "embedding" not in name:
                p.copy_(r / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * r if name.endswith("bias") else r)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """Keys' cubic convolution weights (a = −0.75, PyTorch's bicubic) of taps −1, 0, 1, 2 at offset t."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def reference_preprocess(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The documented steps of the reference's ``preprocess``, in float64 NumPy (sd2.md, "Stable
    unCLIP"): if an axis shrinks, a Gaussian blur per axis with σ = max(in/out, 1), kernel int(4σ)
    made odd, border reflect; bicubic (a = −0.75) with ``align_corners=True``, edge taps clamped;
    ``(x + 1) / 2``; CLIP mean/std. :param image: ``[B, 3, H, W]`` in [-1, 1]."""
    x = image.double().numpy()
    factors = (x.shape[2] / size, x.shape[3] / size)
    for axis, factor in zip((2, 3), factors) if max(factors) > 1 else ():  # no blur unless an axis shrinks
        sigma = max(factor, 1.0)
        k = int(4 * sigma)
        k += 1 - k % 2
        offsets = np.arange(k) - k // 2
        g = np.exp(-offsets**2 / (2 * sigma**2))
        g /= g.sum()
        pad = [(0, 0)] * 4
        pad[axis] = (k // 2, k // 2)
        padded, n = np.pad(x, pad, mode="reflect"), x.shape[axis]
        x = sum(g[j] * np.take(padded, np.arange(j, j + n), axis=axis) for j in range(k))
    for axis in (2, 3):
        n_in = x.shape[axis]
        # the source position in float32 as PyTorch computes it (scale · index): up to ~3e-5 of a pixel
        src = (np.float32((n_in - 1) / (size - 1)) * np.arange(size, dtype=np.float32)).astype(np.float64)
        base = np.floor(src).astype(int)
        shape = [1, 1, 1, 1]
        shape[axis] = size
        x = sum(w.reshape(shape) * np.take(x, np.clip(base + j - 1, 0, n_in - 1), axis=axis)
                for j, w in enumerate(_cubic_weights(src - base)))
    mean = np.array([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return torch.from_numpy(((x + 1) / 2 - mean) / std)


def squaredcos_alphas_cumprod(n: int = 1000) -> np.ndarray:
    """``squaredcos_cap_v2`` (float64): β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999), ᾱ(t) = cos²((t + 0.008)/1.008·π/2)."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    return np.cumprod(1.0 - betas)


def level_embedding(levels: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of integer levels, cos half first (float64)."""
    half = dim // 2
    # the arguments l·f in float32, as the reference's timestep_embedding (at l = 999 float64
    # arguments would move the result by ~5e-6)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = (levels.float()[:, None] * freqs[None]).double()
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def oracle_adm(embedding, levels, noise, mean, std) -> torch.Tensor:
    """``cat([unscale(sqrt(ā)·scale(e) + sqrt(1 − ā)·n), emb(l)])`` in float64."""
    ac = torch.from_numpy(squaredcos_alphas_cumprod())[levels][:, None]
    e, n, mean, std = (t.double() for t in (embedding, noise, mean, std))
    z = (ac.sqrt() * (e - mean) / std + (1 - ac).sqrt() * n) * std + mean
    return torch.cat([z, level_embedding(levels, e.shape[1])], dim=1)


def write_stats(path, dim: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``ViT-L-14_stats.th`` with random statistics: ``torch.save((mean [dim], std [dim]))``, as Karlo's."""
    g = torch.Generator().manual_seed(seed)
    mean, std = 0.3 * torch.randn(dim, generator=g), 0.2 + torch.rand(dim, generator=g)
    torch.save((mean, std), path)
    return mean, std


# ---------------------------------------------------------------------------------- the image tower
def tiny_embedder(monkeypatch):
    """A ``ClipImageEmbedder`` of the tiny openai CLIP, random: it builds "ViT-L/14" only, from
    ``OPENAI_VIT_L14``, which ``monkeypatch`` swaps for the tiny configs."""
    monkeypatch.setattr(encoder_modules, "OPENAI_VIT_L14", TINY_OPENAI_CLIP)
    embedder = encoder_modules.ClipImageEmbedder(model="ViT-L/14")
    randomize_(embedder, seed=11)
    return embedder


def test_tiny_image_tower_matches_transformers(monkeypatch):
    embedder = tiny_embedder(monkeypatch)
    assert not embedder.training and not any(p.requires_grad for p in embedder.parameters())
    from ldm.modules.encoders.clip import quick_gelu

    assert [m.act for m in embedder.modules() if hasattr(m, "c_fc")] == [quick_gelu] * 4  # text and image blocks
    hf = transformers_vision_model(embedder.model, TINY_OPENAI_CLIP[1])
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 320, 448, generator=g) * 2 - 1
    pixels = reference_preprocess(image).float()
    with torch.no_grad():
        tower = embedder.model.encode_image(pixels)
        theirs = hf(pixel_values=pixels).image_embeds
        ours = embedder(image)
    assert ours.shape == theirs.shape == (2, 48)
    assert rel_err(tower, theirs) < 1e-5  # measured 3.9e-7
    assert rel_err(ours, theirs) < 1e-5  # the whole embedder, its preprocessing included
    # the test can fail: one block's q and k swapped in the mapping gives another embedding
    sd = dict(embedder.model.state_dict())
    w = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    sd["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.cat([w.chunk(3)[i] for i in (1, 0, 2)])
    embedder.model.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(embedder.model.encode_image(pixels), theirs) > 1e-2


@pytest.mark.slow
def test_full_size_image_tower_matches_transformers():
    """ViT-L/14 at full size (303M image-tower weights, random; the unused text tower stays on meta)."""
    with torch.device("meta"):
        embedder = encoder_modules.ClipImageEmbedder(model="ViT-L/14")
    embedder.model.visual.to_empty(device="cpu")
    randomize_(embedder.model.visual, seed=12)
    vision = OPENAI_VIT_L14[1]
    assert (vision.width, vision.layers, vision.heads, vision.patch_size, vision.output_dim) == (1024, 24, 16, 14, 768)
    hf = transformers_vision_model(embedder.model, vision)
    image = torch.rand(1, 3, 300, 400, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ours = embedder(image)
        theirs = hf(pixel_values=reference_preprocess(image).float()).image_embeds
    assert ours.shape == (1, 768)
    assert rel_err(ours, theirs) < 1e-5  # measured 9.8e-7 (20 s on 2 cores)


# ---------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(320, 448), (180, 400), (225, 224), (97, 640), (100, 150)])
def test_preprocessing_is_the_documented_kornia_steps(monkeypatch, size):
    """Both axes shrinking, one growing (blur with σ 1 on it), one barely shrinking, both growing (no blur)."""
    embedder = tiny_embedder(monkeypatch)
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(sum(size))) * 2 - 1
    ours = embedder.preprocess(image)
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    assert rel_err(ours, reference_preprocess(image)) < 1e-6  # measured <= 2.8e-7


def test_preprocessing_reproduces_the_recorded_kornia_output(spec_dir, monkeypatch):
    """The reference's ClipImageEmbedder.preprocess is FrozenOpenCLIPImageEmbedder's, line for line:
    the unCLIP-H fixture's kornia output is the L embedder's too."""
    ref = torch.load(H_TINY_PARITY, weights_only=True)["image_embedding"]
    image = (2 * ref["image_uint8"].float() / 255 - 1).permute(2, 0, 1)[None]
    ours = tiny_embedder(monkeypatch).preprocess(image)
    assert rel_err(ours, ref["preprocessed_sample0"]) < 1e-6  # measured 1.4e-7
    assert rel_err(reference_preprocess(image), ref["preprocessed_sample0"]) < 1e-6  # measured 2.4e-7
    # transformers' image processor (shortest side to 224, centre crop) is another operation
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    from PIL import Image

    theirs = Processor()(images=Image.fromarray(ref["image_uint8"].numpy()), return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape and rel_err(theirs, ours) > 0.05


# ---------------------------------------------------------------------------------- noise augmentation, adm
def meta_l_model(stats_path):
    cfg = OmegaConf.load(UNCLIP_L_CONFIG)
    OmegaConf.update(cfg, "model.params.noise_aug_config.params.clip_stats_path", str(stats_path))
    return instantiate_on_meta(cfg.model)


def test_noise_augmentation_with_the_stats_file_is_the_formula(tmp_path):
    mean, std = write_stats(tmp_path / "ViT-L-14_stats.th", 768)
    model = meta_l_model(tmp_path / "ViT-L-14_stats.th")  # the project config, its augmentor on the CPU
    aug = model.noise_augmentor
    # the loaders build on meta; the statistics (never in a checkpoint) must still be real tensors
    assert aug.data_mean.device.type == aug.data_std.device.type == "cpu"
    assert torch.equal(aug.data_mean, mean[None]) and torch.equal(aug.data_std, std[None])
    ac = squaredcos_alphas_cumprod()
    assert rel_err(aug.alphas_cumprod, torch.from_numpy(ac)) < 1e-6
    assert rel_err(aug.sqrt_one_minus_alphas_cumprod, torch.from_numpy(np.sqrt(1 - ac))) < 1e-6
    g = torch.Generator().manual_seed(6)
    emb = mean + std * torch.randn(4, 768, generator=g)  # embeddings around the statistics
    noise = torch.randn(4, 768, generator=g)
    levels = torch.tensor([0, 1, 300, 999])
    expected = oracle_adm(emb, levels, noise, mean, std)
    with torch.no_grad():
        z, level_emb = aug(emb, noise_level=levels, noise=noise)
    assert rel_err(z, expected[:, :768]) < 1e-6  # measured 5.4e-8
    assert rel_err(level_emb, expected[:, 768:]) < 1e-6  # measured 1.7e-8
    # the statistics matter: without them (unCLIP-H's zeros/ones) level 300 gives another z
    plain = oracle_adm(emb, levels, noise, torch.zeros(768), torch.ones(768))[:, :768]
    assert rel_err(z[2], plain[2]) > 1e-2 and rel_err(z[0], emb[0]) < 1e-2


def test_adm_vector_layout_is_embedding_then_level_embedding(tmp_path):
    write_stats(tmp_path / "stats.th", 768)
    mean, std = torch.load(tmp_path / "stats.th", weights_only=True)
    model = meta_l_model(tmp_path / "stats.th")
    unet = model.model.diffusion_model
    assert model.model.conditioning_key == "crossattn-adm"
    assert unet.label_emb[0][0].in_features == 1536 == 768 + model.noise_augmentor.time_embed.dim
    assert model.embedder.model.visual.proj.shape == (1024, 768)  # encode_image's width: 768
    g = torch.Generator().manual_seed(7)
    emb, noise = torch.randn(2, 768, generator=g), torch.randn(2, 768, generator=g)
    adm = model.adm_conditioning(emb, 250, noise, weight=0.5)
    assert adm.shape == (2, 1536)
    expected = oracle_adm(emb, torch.tensor([250, 250]), noise, mean, std)
    assert rel_err(adm, 0.5 * expected) < 1e-6
    assert rel_err(adm[:, 768:], 0.5 * level_embedding(torch.tensor([250, 250]), 768)) < 1e-6


# ---------------------------------------------------------------------------------- a tiny unCLIP-L end to end
def tiny_l_config(stats_path):
    cfg = OmegaConf.load(UNCLIP_L_CONFIG)
    for key, value in {**TINY_L_OVERRIDES, "model.params.noise_aug_config.params.clip_stats_path": str(stats_path)
                       }.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def tiny_l(spec_dir, tmp_path_factory):
    """``(model, its state dict, config, stats)``: the L config at the H fixture's sizes; the H
    fixture's weights for everything but the embedder, a random tiny openai CLIP for ``embedder.*``."""
    register_tiny_openclip(FIXTURES)
    stats_path = tmp_path_factory.mktemp("unclip-l") / "ViT-L-14_stats.th"
    stats = write_stats(stats_path, 48)
    cfg = tiny_l_config(stats_path)
    with pytest.MonkeyPatch.context() as mp:
        embedder = tiny_embedder(mp)
        h_sd = delta_state_dict(H_TINY_CKPT, BASE_CKPT)
        sd = {k: v for k, v in h_sd.items() if not k.startswith("embedder.")}
        sd.update({f"embedder.{k}": v for k, v in embedder.state_dict().items()})
        model = load_model_from_config(cfg, sd).eval()
    return model, sd, cfg, stats


def fixture_image_uint8() -> np.ndarray:
    """The unCLIP-H fixture's conditioning image, ``[320, 448, 3]`` uint8."""
    return torch.load(H_TINY_PARITY, weights_only=True)["image_embedding"]["image_uint8"].numpy()


def test_tiny_l_model_has_the_l_layout(tiny_l, spec_dir):
    from ldm.modules.encoders.modules import ClipImageEmbedder

    model, sd, _, _ = tiny_l
    assert isinstance(model.embedder, ClipImageEmbedder) and model.model.conditioning_key == "crossattn-adm"
    # the openai layout: the whole CLIP, text transformer included, blocks in openai's order
    names = [k for k in model.state_dict() if k.startswith("embedder.")]
    assert "embedder.model.transformer.resblocks.1.mlp.c_proj.bias" in names
    assert names.index("embedder.model.visual.transformer.resblocks.0.attn.in_proj_weight") < names.index(
        "embedder.model.visual.transformer.resblocks.0.ln_1.weight")
    full = [k for k, _ in (line.split("\t", 1) for line in
                           (spec_dir / "sd-v2-unclip-l.tsv").read_text().splitlines()[1:])]
    full_embedder = [k for k in full if k.startswith("embedder.")]
    assert set(names) <= set(full_embedder)  # the same names (fewer blocks)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_tiny_l_is_the_unclip_family(tiny_l):
    from ldm.families import facts_from_config, facts_from_model, facts_from_state_dict, family_of

    model, sd, cfg, _ = tiny_l
    assert family_of(facts_from_config(OmegaConf.load(UNCLIP_L_CONFIG))).name == "sd-v2-unclip"
    assert family_of(facts_from_config(cfg)).name == "sd-v2-unclip"
    assert family_of(facts_from_model(model)).name == "sd-v2-unclip"
    assert family_of(facts_from_state_dict({k: tuple(v.shape) for k, v in sd.items()})).name == "sd-v2-unclip"


def test_variations_feed_the_oracles_adm_to_the_unet(tiny_l):
    """``StableDiffusion.variations`` on the tiny L model: the ``c_adm`` the UNet's ``label_emb``
    receives is transformers' image embedding of the independently preprocessed image, noised
    by the formula with the stats file; the unconditional half is zeros."""
    from PIL import Image

    from ldm.generate import StableDiffusion

    model, _, _, (mean, std) = tiny_l
    hf = transformers_vision_model(model.embedder.model, TINY_OPENAI_CLIP[1])
    pixels = fixture_image_uint8()  # 320x448: the blur runs
    image = Image.fromarray(pixels)
    x = 2 * torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None] - 1
    with torch.no_grad():
        embedding = hf(pixel_values=reference_preprocess(x).float()).image_embeds
    noise = torch.randn(2, 48, generator=torch.Generator().manual_seed(8))
    expected = oracle_adm(embedding.expand(2, -1), torch.tensor([300, 300]), noise, mean, std)

    seen = []
    hook = model.model.diffusion_model.label_emb.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    try:
        sd = StableDiffusion(model, progress=False)
        result = sd.variations(image, ["", "a cat"], seeds=[3, 4], noise_level=300, noise=noise, steps=2,
                               sampler="ddim", width=64, height=64)
    finally:
        hook.remove()
    ys = torch.cat(seen)
    zero = ys.abs().sum(1) == 0  # the unconditional branch: an all-zero adm
    assert ys.shape[1] == 96 and int(zero.sum()) == int((~zero).sum()) == 2 * 2  # 2 steps x 2 images, each branch
    for step in ys[~zero].reshape(2, 2, 96):
        assert rel_err(step, expected) < 1e-5  # measured 2.9e-7
    assert [r.extra["Noise level"] for r in result.records] == [300, 300]
    assert all(np.asarray(im).std() > 0 for im in result.images)


def test_variations_script_renders_the_tiny_l_model(tiny_l, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from ldm.checkpoint import save_checkpoint
    from ldm.metadata import parse_parameters, read_parameters
    from tests.test_scripts import load_main

    _, sd, cfg, _ = tiny_l
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # changed below; the fixture's stays
    monkeypatch.setattr(encoder_modules, "OPENAI_VIT_L14", TINY_OPENAI_CLIP)
    config = tmp_path / "unclip-l-tiny.yaml"
    OmegaConf.save(cfg, config)
    ckpt = save_checkpoint(sd, tmp_path / "unclip-l-tiny.safetensors")
    Image.fromarray(fixture_image_uint8()).resize((160, 120)).save(tmp_path / "init.png")
    def run(config_path) -> int:
        """The script on the tiny model: at the default precision (bfloat16 on the CPU, the
        augmentor's schedule and statistics stay float32), 256x256 so that the watermark fits."""
        flags = {"--init-img": tmp_path / "init.png", "--prompt": "a cat", "--noise_level": 100, "--n_samples": 1,
                 "--n_iter": 1, "--steps": 2, "--H": 256, "--W": 256, "--config": config_path, "--ckpt": ckpt,
                 "--outdir": tmp_path / "out", "--device": "cpu"}
        return main([str(a) for kv in flags.items() for a in kv] + ["--no_safety_check", "--skip_grid"])

    main = load_main("variations.py")
    assert run(config) == 0, capsys.readouterr().err
    (sample,) = sorted((tmp_path / "out" / "samples").iterdir())
    meta = parse_parameters(read_parameters(sample))
    assert [meta[k] for k in ("CFG scale", "Noise level", "Size", "Watermark")] == ["10.0", "100", "256x256", "SDV2"]
    assert np.asarray(Image.open(sample)).std() > 0
    # the stats file is the user's to bring: without it, one error line naming it (no traceback)
    OmegaConf.update(cfg, "model.params.noise_aug_config.params.clip_stats_path", str(tmp_path / "ViT-L-14_stats.th"))
    OmegaConf.save(cfg, tmp_path / "no-stats.yaml")
    assert "(cpu, bfloat16)" in capsys.readouterr().err
    assert run(tmp_path / "no-stats.yaml") == 2
    err = capsys.readouterr().err
    assert "error: clip_stats_path" in err and "ViT-L-14_stats.th" in err and "Traceback" not in err


@pytest.mark.parametrize("width, letter", [(1536, "l"), (2048, "h")])
def test_an_unclip_file_that_did_not_load_names_the_h_or_l_config_by_its_embedding_width(tmp_path, width, letter):
    from safetensors.torch import save_file

    from ldm.generate.config import checkpoint_family_hint, describe_config

    keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
            "cond_stage_model.model.token_embedding.weight": (49408, 1024),
            "model.diffusion_model.label_emb.0.0.weight": (1280, width)}
    save_file({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "unclip.safetensors")
    other = "h" if letter == "l" else "l"
    spec = describe_config(OmegaConf.load(REPO / f"configs/stable-diffusion/v2-1-stable-unclip-{other}-inference.yaml"))
    hint = checkpoint_family_hint(tmp_path / "unclip.safetensors", spec)
    assert f"unCLIP-{letter.upper()}" in hint and f"v2-1-stable-unclip-{letter}-inference.yaml" in hint, hint
