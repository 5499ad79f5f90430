"""Stable unCLIP 2.1 (``configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml``): the project
config builds the official unCLIP-H layout; reference parity on the tiny fixture
``sd-v2-unclip-h-tiny`` (a delta checkpoint over ``sd-v2-v-tiny``): kornia's antialiased resize and
the CLIP normalisation, the OpenCLIP image tower, the squaredcos_cap_v2 noise augmentation, the adm
vector, one ``crossattn-adm`` UNet call with its ``label_emb``, DDIM 10 steps at scale 10 from the
image, decoded; the unCLIP-L layout (openai CLIP ViT-L/14 embedder) and its stats file; the
``sd-v2-unclip`` family and ``scripts/variations.py`` end to end on the tiny model.
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_on_meta, load_model_from_config
from ldm.models.diffusion.registry import make_sampler
from tests.conftest import FIXTURES
from tests.helpers import REPO, Recorder, delta_state_dict, read_manifest, rel_err
from tests.helpers import register_tiny_openclip as register_tiny_openclip_in

UNCLIP_H_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-1-stable-unclip-h-inference.yaml"
UNCLIP_L_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-1-stable-unclip-l-inference.yaml"
TINY_CONFIG = FIXTURES / "sd-v2-unclip-h-tiny.yaml"
TINY_CKPT = FIXTURES / "sd-v2-unclip-h-tiny-random.ckpt"
TINY_PARITY = FIXTURES / "sd-v2-unclip-h-tiny-parity.pt"
BASE_CKPT = FIXTURES / "sd-v2-v-tiny-random.ckpt"


def tiny_state_dict() -> dict:
    return delta_state_dict(TINY_CKPT, BASE_CKPT)


def register_tiny_openclip() -> None:
    register_tiny_openclip_in(FIXTURES)


@pytest.fixture(scope="module")
def ref(spec_dir) -> dict:
    return torch.load(TINY_PARITY, weights_only=True)


@pytest.fixture(scope="module")
def model(spec_dir):
    register_tiny_openclip()
    return load_model_from_config(OmegaConf.load(TINY_CONFIG), tiny_state_dict()).eval()


def init_image(ref, n: int = 2) -> torch.Tensor:
    """The conditioning image as the app makes it: ``2·uint8/255 − 1``, ``[n, 3, 320, 448]``."""
    img = ref["image_embedding"]["image_uint8"]
    return (2 * img.float() / 255 - 1).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)


def to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    return (255 * ((decoded + 1) / 2).clamp(0, 1)).permute(0, 2, 3, 1).to(torch.uint8)


# ---------------------------------------------------------------------------------- layout
def test_project_config_builds_the_unclip_h_layout(spec_dir):
    """Key for key, shape for shape, in order. The manifest counts no EMA shadows (the config leaves
    ``use_ema`` at its default, which would add ``model_ema.*``), so they are switched off here."""
    cfg = OmegaConf.load(UNCLIP_H_CONFIG)
    assert cfg.model.params.first_stage_config.params.ddconfig.attn_type == "vanilla-xformers"  # the original's
    OmegaConf.update(cfg, "model.params.use_ema", False)
    model = instantiate_on_meta(cfg.model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / "sd-v2-unclip-h.tsv")
    assert len(ours) == len(expected) == 1650
    assert [(o, e) for o, e in zip(ours, expected) if o != e] == []
    assert all(p.is_meta for p in model.parameters())
    assert model.model.conditioning_key == "crossattn-adm"


def test_tiny_checkpoint_loads_strictly_and_keys_match_the_reference_order(model, ref):
    ck = torch.load(TINY_CKPT, weights_only=True)
    assert list(model.state_dict()) == ck["key_order"]
    assert len(ck["key_order"]) == ref["meta"]["n_state_dict_keys"] == 1032


# ---------------------------------------------------------------------------------- image embedding
def test_antialiased_resize_and_clip_normalisation_match_kornia(ref):
    from ldm.modules.encoders.image_preprocess import antialiased_resize, clip_preprocess

    x = init_image(ref, 1)
    pre = clip_preprocess(x)
    assert pre.shape == (1, 3, 224, 224)
    assert rel_err(pre, ref["image_embedding"]["preprocessed_sample0"]) < 1e-6  # measured 1.4e-7
    # the blur matters: without it (plain bicubic) the result is far off
    plain = clip_preprocess(x, antialias=False)
    assert rel_err(plain, ref["image_embedding"]["preprocessed_sample0"]) > 1e-3
    # no blur when no axis shrinks, and nothing at all at the same size
    up = torch.randn(1, 3, 8, 8)
    assert torch.equal(antialiased_resize(up, (8, 8)), up)
    assert torch.equal(antialiased_resize(up, (16, 16)),
                       torch.nn.functional.interpolate(up, size=(16, 16), mode="bicubic", align_corners=True))


def test_image_tower_config_is_checked_when_built():
    from ldm.modules.encoders.open_clip import open_clip_vision_config, register_open_clip_arch

    register_tiny_openclip()
    tiny = open_clip_vision_config("ldmtest-tiny-ViT-H-14")
    assert (tiny.width, tiny.layers, tiny.heads, tiny.grid, tiny.output_dim) == (64, 2, 2, 16, 48)
    assert open_clip_vision_config("ViT-H-14").heads == 16
    cfg = json.loads((FIXTURES / "ldmtest-tiny-ViT-H-14.json").read_text())
    register_open_clip_arch("ldmtest-timm", {**cfg, "vision_cfg": {**cfg["vision_cfg"], "timm_model_name": "x"}})
    with pytest.raises(ValueError, match="'ldmtest-timm'.*timm_model_name"):
        open_clip_vision_config("ldmtest-timm")
    with pytest.raises(ValueError, match="no image tower"):
        open_clip_vision_config("ViT-bigG-14")


def test_image_embedding_matches_reference(model, ref):
    with torch.no_grad():
        emb = model.embed_image(init_image(ref))
    assert emb.shape == (2, 48)
    assert rel_err(emb, ref["image_embedding"]["embedding"]) < 1e-5  # measured 2.7e-7


def test_noise_augmentation_matches_reference(model, ref):
    aug, rec = model.noise_augmentor, ref["noise_augmentation"]
    for name, value in ref["noise_aug_schedule"].items():
        assert torch.equal(getattr(aug, name), value), name  # float64 -> float32, bit for bit
    assert aug.max_noise_level == ref["max_noise_level"] == 1000
    assert torch.equal(aug.data_mean, ref["noise_aug_data_mean"])
    assert torch.equal(aug.data_std, ref["noise_aug_data_std"])
    assert not any(k.endswith(("data_mean", "data_std")) for k in model.state_dict())  # non-persistent
    assert rec["noise_level"].tolist() == [0, 300]
    emb = ref["image_embedding"]["embedding"]
    with torch.no_grad():
        z, level_emb = aug(emb, noise_level=rec["noise_level"], noise=rec["noise"])
        adm = model.adm_conditioning(emb, rec["noise_level"], rec["noise"], weight=rec["weight"])
    assert rel_err(z, rec["z"]) < 1e-6 and rel_err(level_emb, rec["noise_level_emb"]) < 1e-6
    # level 0 is nearly the embedding (ā[0] = 1 − β[0], β[0] ≈ 4e-5): sqrt(1 − ā[0]) ≈ 0.006 of noise
    assert 0 < rel_err(z[0], emb[0]) < 1e-2 < rel_err(z[1], emb[1])
    assert rel_err(adm, rec["adm_cond"]) < 1e-6
    with pytest.raises(ValueError, match="noise levels must be in"):
        aug(emb, noise_level=torch.tensor([0, 1000]))


def test_unclip_conditioning_from_the_image(model, ref):
    """Prompts + image -> the recorded ``c`` / ``uc`` dicts (uc: the empty prompt, ``c_adm`` zeros)."""
    rec, d = ref["noise_augmentation"], ref["ddim"]
    c, uc = model.unclip_conditioning(ref["text"]["prompts"], init_image(ref, 1), noise_level=rec["noise_level"],
                                      noise=rec["noise"])
    assert rel_err(c["c_crossattn"][0], d["cond"]["c_crossattn"][0]) < 1e-5
    assert rel_err(uc["c_crossattn"][0], d["uncond"]["c_crossattn"][0]) < 1e-5
    assert rel_err(c["c_adm"], d["cond"]["c_adm"]) < 1e-5  # measured 2.2e-7
    assert torch.equal(uc["c_adm"], d["uncond"]["c_adm"]) and not uc["c_adm"].any()


# ---------------------------------------------------------------------------------- UNet and DDIM
def test_unet_crossattn_adm_call_matches_reference(model, ref):
    u = ref["unet"]
    unet = model.model.diffusion_model
    got = {}
    hook = unet.label_emb.register_forward_hook(lambda m, i, o: got.__setitem__("label_emb", o))
    try:
        with torch.no_grad():
            out = model.apply_model(u["x"], u["t"], u["cond"])
            out_uncond = model.apply_model(u["x"], u["t"], u["cond_uncond"])
            out_float = model.apply_model(u["x"], u["t_float"], u["cond"])
    finally:
        hook.remove()
    # measured: 1.2e-6 each
    assert rel_err(out, u["out"]) < 1e-5
    assert rel_err(out_uncond, u["out_uncond"]) < 1e-5
    assert rel_err(out_float, u["out_float_t"]) < 1e-5
    with torch.no_grad():
        label = unet.label_emb(u["cond"]["c_adm"])
    assert rel_err(label, u["blocks"]["label_emb"]) < 1e-5
    assert "label_emb" in got  # the vector reached the UNet
    with pytest.raises(ValueError, match="c_adm"):
        model.apply_model(u["x"], u["t"], {"c_crossattn": u["cond"]["c_crossattn"]})


def test_ddim_from_the_image_matches_reference(model, ref):
    """The whole app flow: image -> embedding -> noise augmentation (the recorded noise) -> c/uc ->
    DDIM 10 steps, CFG 10 (guided batch ``cat([uc, c])`` per dict key) -> decoded -> uint8."""
    rec, d = ref["noise_augmentation"], ref["ddim"]
    c, uc = model.unclip_conditioning(ref["text"]["prompts"], init_image(ref, 1), noise_level=rec["noise_level"],
                                      noise=rec["noise"])
    recorder = Recorder(model)
    out, _ = make_sampler("ddim", recorder).sample(
        d["steps_total"], 2, tuple(d["x_T"].shape[1:]), conditioning=c, unconditional_conditioning=uc,
        unconditional_guidance_scale=d["scale"], x_T=d["x_T"], eta=d["eta"], verbose=False)
    assert len(recorder.calls) == len(d["trace"]) == 10
    for k, ((x, t, mine), r) in enumerate(zip(recorder.calls, d["trace"])):
        assert torch.equal(t, r["t"]), k
        assert rel_err(x, r["x"]) < 1e-4, k  # measured <= 4.1e-6
        assert rel_err(mine, r["out"]) < 1e-4, k  # measured <= 5.0e-6
    assert rel_err(out, d["samples"]) < 1e-4  # measured 4.1e-6
    with torch.no_grad():
        decoded = model.decode_first_stage(out)
    assert rel_err(decoded, d["decoded"]) < 1e-4  # measured 4.2e-6
    diff = (to_uint8(decoded).int() - d["uint8"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# ---------------------------------------------------------------------------------- unCLIP-L
def test_project_config_builds_the_unclip_l_layout(spec_dir):
    """As the manifest was made: ``clip_stats_path: null`` (the stats file is a separate download)."""
    cfg = OmegaConf.load(UNCLIP_L_CONFIG)
    OmegaConf.update(cfg, "model.params.noise_aug_config.params.clip_stats_path", None)
    model = instantiate_on_meta(cfg.model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / "sd-v2-unclip-l.tsv")
    assert len(ours) == len(expected) == 1698
    assert [(o, e) for o, e in zip(ours, expected) if o != e] == []
    # the openai ViT-L/14 embeds a [-1, 1] image of any size to [B, 768] (shapes only, on meta)
    with torch.device("meta"):
        emb = model.embedder(torch.empty(2, 3, 320, 448))
    assert emb.shape == (2, 768)


def test_unclip_l_needs_its_stats_file_and_uses_it(tmp_path):
    from ldm.modules.encoders.modules import CLIPEmbeddingNoiseAugmentation, ClipImageEmbedder

    with pytest.raises(FileNotFoundError, match="ViT-L-14_stats.th"):
        instantiate_on_meta(OmegaConf.load(UNCLIP_L_CONFIG).model)  # the config's relative path is not here
    with pytest.raises(ValueError, match="ViT-L/14"):
        ClipImageEmbedder(model="ViT-B/32")
    schedule = {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    stats = tmp_path / "ViT-L-14_stats.th"
    torch.save((torch.arange(4.0), torch.full((4,), 2.0)), stats)
    aug = CLIPEmbeddingNoiseAugmentation(noise_schedule_config=schedule, clip_stats_path=str(stats), timestep_dim=4)
    x = torch.randn(2, 4)
    assert torch.equal(aug.scale(x), (x - torch.arange(4.0)) / 2)
    assert torch.allclose(aug.unscale(aug.scale(x)), x)
    assert "data_mean" not in aug.state_dict()
    with pytest.raises(ValueError, match="the embedding has 8"):
        CLIPEmbeddingNoiseAugmentation(noise_schedule_config=schedule, clip_stats_path=str(stats), timestep_dim=8)


# ---------------------------------------------------------------------------------- family, pipeline, script
def test_unclip_family_is_recognised_from_config_model_and_checkpoint(model):
    from ldm.families import facts_from_config, facts_from_model, facts_from_state_dict, family_of, get_family

    for config in (UNCLIP_H_CONFIG, TINY_CONFIG):
        assert family_of(facts_from_config(OmegaConf.load(config))).name == "sd-v2-unclip"
    assert family_of(facts_from_model(model)).name == "sd-v2-unclip"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert family_of(facts_from_state_dict(shapes)).name == "sd-v2-unclip"
    family = get_family("sd-v2-unclip")
    assert (family.kind, family.methods, family.watermark, family.default_scale("variations"),
            family.upcast_attention) == ("unclip", ("variations",), "SDV2", 10.0, True)


def test_variations_script_renders_the_tiny_model_end_to_end(spec_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ldm.checkpoint import save_checkpoint
    from ldm.metadata import parse_parameters, read_parameters
    from tests.test_scripts import load_main

    register_tiny_openclip()
    ckpt = save_checkpoint(tiny_state_dict(), tmp_path / "unclip-tiny.safetensors")
    ref = torch.load(TINY_PARITY, weights_only=True)
    Image.fromarray(ref["image_embedding"]["image_uint8"].numpy()).save(tmp_path / "init.png")
    out = tmp_path / "out"
    args = ["--init-img", str(tmp_path / "init.png"), "--prompt", "", "--noise_level", "300", "--n_samples", "1",
            "--n_iter", "1", "--steps", "2", "--H", "256", "--W", "256", "--config", str(TINY_CONFIG), "--ckpt",
            str(ckpt), "--outdir", str(out), "--no_safety_check", "--device", "cpu", "--precision", "fp32",
            "--skip_grid"]
    main = load_main("variations.py")
    assert main(args) == 0, capsys.readouterr().err
    (sample,) = sorted((out / "samples").iterdir())
    meta = parse_parameters(read_parameters(sample))
    assert (meta["CFG scale"], meta["Noise level"], meta["Size"], meta["Watermark"]) == ("10.0", "300", "256x256",
                                                                                        "SDV2")
    assert np.asarray(Image.open(sample)).std() > 0
    # a level outside the schedule is one error line before any model is loaded
    assert main(args[:4] + ["--noise_level", "1000"] + args[6:]) == 2
    assert "--noise_level 1000 is outside 0..999" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_variations_method_runs_other_samplers_per_seed(model, ref, sampler):
    """Any sampler takes the dict conditioning; image k depends on its seed only; the noise level
    changes the result and is written to the metadata."""
    import numpy as np
    from PIL import Image

    from ldm.errors import UserInputError
    from ldm.generate import StableDiffusion

    sd = StableDiffusion(model, progress=False)
    assert sd.spec.family.name == "sd-v2-unclip" and (sd.spec.width, sd.spec.height) == (768, 768)
    image = Image.fromarray(ref["image_embedding"]["image_uint8"].numpy())
    kwargs = dict(steps=3, sampler=sampler, width=64, height=64)
    pair = sd.variations(image, ["", "a cat"], seeds=7, noise_level=0, **kwargs)
    alone = sd.variations(image, "a cat", seeds=8, noise_level=0, **kwargs)
    assert np.array_equal(np.asarray(pair.images[1]), np.asarray(alone.images[0]))
    noised = sd.variations(image, "a cat", seeds=8, noise_level=500, **kwargs)
    assert not np.array_equal(np.asarray(noised.images[0]), np.asarray(alone.images[0]))
    assert noised.records[0].extra["Noise level"] == 500 and noised.records[0].scale == 10.0
    with pytest.raises(UserInputError, match="outside 0..999"):
        sd.variations(image, "", noise_level=-1, **kwargs)
