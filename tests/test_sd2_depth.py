"""SD 2 depth2img (``configs/stable-diffusion/v2-midas-inference.yaml``): the project config builds
the official layout (368 of its keys are MiDaS DPT-Hybrid, written here without timm); reference
parity on the tiny fixture ``sd-v2-depth-tiny`` (a delta checkpoint over ``sd-v2-v-tiny`` whose
full-size MiDaS weights are regenerated from the spec's deterministic init): the MiDaS input
transform, the DPT features and prediction, the depth at latent size and its [-1, 1] mapping, the
init latent, one 5-channel UNet call, DDIM 9 of 10 steps at strength 0.9 and scale 9, decoded; the
``sd-v2-depth`` family, ``StableDiffusion.depth2img`` and ``scripts/depth2img.py`` end to end on the
tiny model (with a small MiDaS of the same layout); the one-line errors for a depth checkpoint
without ``depth_model.*`` and an unCLIP checkpoint without ``embedder.*``.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, instantiate_on_meta, load_model_from_config
from ldm.models.diffusion.ddim import DDIMSampler
from tests.conftest import FIXTURES
from tests.helpers import REPO, Recorder, delta_state_dict, help_entries, read_manifest, register_tiny_openclip, rel_err

DEPTH_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-midas-inference.yaml"
TINY_CONFIG = FIXTURES / "sd-v2-depth-tiny.yaml"
TINY_CKPT = FIXTURES / "sd-v2-depth-tiny-random.ckpt"
TINY_PARITY = FIXTURES / "sd-v2-depth-tiny-parity.pt"
BASE_CKPT = FIXTURES / "sd-v2-v-tiny-random.ckpt"
#: a MiDaS of the DPT-Hybrid layout small enough to save in a test checkpoint
SMALL_MIDAS = {"embed_dim": 64, "depth": 4, "num_heads": 2, "hooks": [0, 1, 2, 3], "stem_width": 32,
               "resnet_layers": [1, 1, 1], "features": 32, "num_classes": 10}


def deterministic_tensor(name: str, shape, rule: str) -> torch.Tensor:
    """The spec's deterministic init (seed 0) of one tensor (``shared/spec/README.md``)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 2**63)
    r = torch.randn(tuple(shape), generator=g)
    if rule.startswith("fan_in"):
        return r / math.sqrt(r[0].numel())
    return 1 + 0.1 * r if rule.startswith("norm_weight") else 0.1 * r


def init_rule(model, name: str) -> str:
    """The rule of a parameter of ``model`` by its module type (as ``init_rules`` of the fixture)."""
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return "norm_weight" if name.endswith("weight") else "norm_bias"
    return "fan_in" if model.get_parameter(name).ndim >= 2 else "vector"


def tiny_state_dict(ref=None) -> dict:
    """The fixture's full state dict: the delta over v-tiny plus the regenerated ``depth_model.*``
    (each checked against the fixture's fingerprint when ``ref`` is given)."""
    sd = delta_state_dict(TINY_CKPT, BASE_CKPT)
    ck = torch.load(TINY_CKPT, weights_only=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in instantiate_on_meta(OmegaConf.load(TINY_CONFIG).model).state_dict().items()}
    for name in ck["keys_not_stored"]:
        sd[name] = deterministic_tensor(name, shapes[name], ck["init_rules"][name])
        if ref is not None:
            total, total_abs = ref["depth_model_fingerprint"][name]
            assert abs(sd[name].double().sum().item() - total) <= 1e-6 * total_abs, name
    return {k: sd[k] for k in ck["key_order"]}


@pytest.fixture(scope="module")
def ref(spec_dir) -> dict:
    return torch.load(TINY_PARITY, weights_only=True)


@pytest.fixture(scope="module")
def model(ref):
    register_tiny_openclip(FIXTURES)
    return load_model_from_config(OmegaConf.load(TINY_CONFIG), tiny_state_dict(ref)).eval()


def to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    return (255 * ((decoded + 1) / 2).clamp(0, 1)).permute(0, 2, 3, 1).to(torch.uint8)


# ---------------------------------------------------------------------------------- layout
def test_project_config_builds_the_depth_layout(spec_dir):
    """Key for key, shape for shape, in order: 1608 keys, the last 368 MiDaS (timm's and MiDaS's names)."""
    model = instantiate_on_meta(OmegaConf.load(DEPTH_CONFIG).model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / "sd-v2-depth.tsv")
    assert len(ours) == len(expected) == 1608
    assert [(o, e) for o, e in zip(ours, expected) if o != e] == []
    assert sum(k.startswith("depth_model.") for k, _ in ours) == 368
    assert all(p.is_meta for p in model.parameters())
    assert type(model).__name__ == "LatentDepth2ImageDiffusion" and model.model.conditioning_key == "hybrid"
    assert model.model.diffusion_model.in_channels == 5 and model.depth_stage_key == "midas_in"


def test_tiny_checkpoint_loads_strictly_in_the_reference_order(model, ref):
    ck = torch.load(TINY_CKPT, weights_only=True)
    assert list(model.state_dict()) == ck["key_order"]
    assert len(ck["key_order"]) == ref["meta"]["n_state_dict_keys"] == 1350
    assert ref["parameterization"] == model.parameterization == "eps"


# ---------------------------------------------------------------------------------- MiDaS
def test_midas_input_transform_matches_reference(ref):
    from ldm.modules.midas.api import midas_input_size, midas_transform

    d = ref["depth"]
    assert torch.equal(d["jpg"][0], d["jpg"][1])  # one image, repeated
    x = midas_transform(d["jpg"][:1])
    assert x.shape == (1, 3, 192, 384)
    assert rel_err(x, d["midas_in_sample0"]) < 1e-6  # measured 1.1e-7 (torch bicubic in float64 vs cv2.INTER_CUBIC)
    # "minimal" keep-aspect scaling toward 384, sides to multiples of 32
    assert [midas_input_size(*s) for s in [(512, 512), (64, 128), (768, 512), (480, 640), (512, 200)]] == [
        (384, 384), (192, 384), (576, 384), (384, 512), (384, 160)]


def test_midas_input_transform_matches_opencv_when_shrinking():
    cv2 = pytest.importorskip("cv2")
    from ldm.modules.midas.api import midas_transform

    image = np.random.default_rng(0).uniform(-1, 1, (512, 768, 3)).astype(np.float32)
    expected = (cv2.resize((image + 1) * 0.5, (576, 384), interpolation=cv2.INTER_CUBIC) - 0.5) / 0.5
    ours = midas_transform(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    assert rel_err(ours, torch.from_numpy(expected)) < 1e-4  # measured 2.9e-5 on noise (cv2's fixed-point taps)


@pytest.fixture
def one_thread():
    """The reference ran on one thread; the 60-layer MiDaS amplifies the order of float sums: at 1
    thread its features match to about 2e-6, at 2 threads to about 1e-5 (also with the fast paths off)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_midas_dpt_hybrid_matches_reference(model, ref, one_thread):
    d = ref["depth"]
    with torch.no_grad():
        got = model.depth_model.model.forward_features(d["midas_in_sample0"])
        prediction = model.depth_model(d["midas_in_sample0"].expand(2, -1, -1, -1))
    for name, value in d["midas_features"].items():
        assert got[name].shape == value.shape, name
        assert rel_err(got[name], value) < 5e-6, name  # measured <= 2.0e-6
    assert prediction.shape == (2, 1, 192, 384)
    assert rel_err(prediction, d["prediction"]) < 5e-6  # measured 1.5e-6
    # the apps' depth image: 8-bit (d - min)/(max - min) of sample 0
    p = prediction[0, 0]
    shown = (255 * (p - p.min()) / (p.max() - p.min())).to(torch.uint8)
    assert (shown.int() - d["display_uint8"].int()).abs().max() <= 1


def test_depth_at_latent_size_and_its_normalisation(model, ref, one_thread):
    """From the image: the whole path (transform, MiDaS, resize, mapping). The random-weight MiDaS
    amplifies an input change some 200-1000 times (a 1e-7 relative perturbation of its input moves its
    output by 1.4e-5), so the transform's 1e-7 difference from cv2 shows as 1e-4 here; from the
    recorded MiDaS input the prediction matches to 1.5e-6 (above)."""
    from ldm.models.diffusion.depth import normalize_depth

    d = ref["depth"]
    with torch.no_grad():
        c_concat = model.depth_conditioning(d["jpg"], (8, 16))
    assert c_concat.shape == (2, 1, 8, 16)
    assert rel_err(c_concat, d["c_concat"]) < 1e-3  # measured 2.6e-4
    assert c_concat.amin() == -1 and c_concat.amax() == 1
    with torch.no_grad():
        from_recorded_input = model.depth_conditioning(None, (8, 16), depth=model.depth_model(d["midas_in_sample0"]))
    assert rel_err(from_recorded_input, d["c_concat"][:1]) < 2e-5  # measured 4.0e-6
    # from the recorded prediction: bicubic to the latent size, then the scripts' / training mapping
    small = torch.nn.functional.interpolate(d["prediction"], size=(8, 16), mode="bicubic", align_corners=False)
    assert rel_err(small, d["depth_latent_size_bicubic"]) < 1e-6
    assert rel_err(normalize_depth(d["prediction"], (8, 16)), d["c_concat"]) < 1e-6
    assert rel_err(normalize_depth(d["prediction"], (8, 16), eps=0.001), d["c_concat_get_input_variant"]) < 1e-6
    assert rel_err(d["c_concat"], d["c_concat_get_input_variant"]) > 1e-5  # the two mappings differ
    flat = normalize_depth(torch.ones(1, 1, 4, 4))
    assert torch.equal(flat, torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------------------------- UNet and DDIM
def test_init_latent_matches_reference(model, ref):
    rec = ref["img2img_latent"]
    with torch.no_grad():
        posterior = model.encode_first_stage(ref["depth"]["jpg"])
    z = model.scale_factor * (posterior.mean + posterior.std * rec["posterior_noise"])
    assert rel_err(z, rec["z"]) < 1e-5  # measured 3e-7 (the reference's input was NHWC-strided)


def test_unet_call_with_depth_matches_reference(model, ref):
    from tests.helpers import unet_block_outputs

    u = ref["unet"]
    with torch.no_grad():
        out = model.apply_model(u["x"], u["t"], u["cond"])
        out_uncond = model.apply_model(u["x"], u["t"], u["cond_uncond"])
        out_float = model.apply_model(u["x"], u["t_float"], u["cond"])
    assert rel_err(out, u["out"]) < 1e-5  # measured 1e-6
    assert rel_err(out_uncond, u["out_uncond"]) < 1e-5
    assert rel_err(out_float, u["out_float_t"]) < 1e-5
    unet_input = torch.cat([u["x"], u["cond"]["c_concat"][0]], dim=1)
    assert torch.equal(unet_input, u["blocks"]["unet_input"])
    blocks = unet_block_outputs(model.model.diffusion_model, unet_input, u["t"], u["cond"]["c_crossattn"][0])
    for name in ("time_embed", "input_blocks.0", "middle_block", "output_blocks.11"):
        assert rel_err(blocks[name], u["blocks"][name]) < 1e-5, name


def test_ddim_depth2img_matches_reference(model, ref):
    """The app's flow after MiDaS: the recorded depth c_concat (cond and uncond) + text, z noised to
    DDIM step t_enc = 9 with the recorded noise, 9 DDIM steps from timestep 801 (the reference's
    off-by-one), CFG 9, decoded."""
    d = ref["ddim"]
    c = model.get_learned_conditioning(ref["text"]["prompts"])
    uc = model.get_learned_conditioning([""] * 2)
    assert rel_err(c, ref["text"]["c"]) < 1e-5 and rel_err(uc, ref["text"]["uc"]) < 1e-5
    depth = ref["depth"]["c_concat"]
    cond = {"c_concat": [depth], "c_crossattn": [c]}
    uncond = {"c_concat": [depth], "c_crossattn": [uc]}
    t_enc = min(int(d["strength"] * d["steps_total"]), d["steps_total"] - 1)
    assert t_enc == d["t_enc"] == 9
    recorder = Recorder(model)
    sampler = DDIMSampler(recorder)
    sampler.make_schedule(d["steps_total"], ddim_eta=0.0, verbose=False)
    z_enc = sampler.stochastic_encode(ref["img2img_latent"]["z"], torch.tensor([t_enc] * 2), noise=d["noise"])
    assert rel_err(z_enc, d["z_enc"]) < 1e-6
    out = sampler.decode(d["z_enc"], cond, t_enc, unconditional_guidance_scale=d["scale"],
                         unconditional_conditioning=uncond, verbose=False)
    assert [t[0].item() for _, t, _ in recorder.calls] == [801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert len(recorder.calls) == len(d["trace"]) == 9
    for k, ((x, t, mine), r) in enumerate(zip(recorder.calls, d["trace"])):
        assert torch.equal(t, r["t"]), k
        assert rel_err(x, r["x"]) < 1e-4, k
        assert rel_err(mine, r["out"]) < 1e-4, k
    assert rel_err(out, d["samples"]) < 1e-4
    with torch.no_grad():
        decoded = model.decode_first_stage(out)
    assert rel_err(decoded, d["decoded"]) < 1e-4
    diff = (to_uint8(decoded).int() - d["uint8"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# ---------------------------------------------------------------------------------- bad checkpoints
def test_depth_checkpoint_without_midas_weights_is_one_line(model):
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("depth_model.")}
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(OmegaConf.load(TINY_CONFIG), sd)
    message = str(info.value)
    assert "\n" not in message and "lacks the weights of the MiDaS depth model" in message
    assert "368 tensors missing" in message and "512-depth-ema.ckpt" in message
    # other missing keys as well: the config/checkpoint mismatch message, not the MiDaS one
    del sd["model.diffusion_model.out.2.bias"]
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load_model_from_config(OmegaConf.load(TINY_CONFIG), sd)


def test_unclip_checkpoint_without_image_embedder_is_one_line(spec_dir):
    register_tiny_openclip(FIXTURES)
    sd = delta_state_dict(FIXTURES / "sd-v2-unclip-h-tiny-random.ckpt", BASE_CKPT)
    sd = {k: v for k, v in sd.items() if not k.startswith("embedder.")}
    with pytest.raises(CheckpointError) as info:
        load_model_from_config(OmegaConf.load(FIXTURES / "sd-v2-unclip-h-tiny.yaml"), sd)
    message = str(info.value)
    assert "\n" not in message and "lacks the weights of the CLIP image embedder (embedder.model.*)" in message
    assert "ViT-H-14 laion2b_s32b_b79k" in message


# ---------------------------------------------------------------------------------- family, pipeline, script
def test_depth_family_is_recognised_from_config_model_and_checkpoint(model):
    from ldm.families import facts_from_config, facts_from_model, facts_from_state_dict, family_of, get_family

    for config in (DEPTH_CONFIG, TINY_CONFIG):
        assert family_of(facts_from_config(OmegaConf.load(config))).name == "sd-v2-depth"
    assert family_of(facts_from_model(model)).name == "sd-v2-depth"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert family_of(facts_from_state_dict(shapes)).name == "sd-v2-depth"
    family = get_family("sd-v2-depth")
    assert (family.kind, family.methods, family.watermark, family.default_scale("depth2img"), family.strength,
            family.upcast_attention) == ("depth", ("depth2img",), "SDV2", 9.0, 0.9, True)


def small_midas_config():
    cfg = OmegaConf.load(TINY_CONFIG)
    OmegaConf.update(cfg, "model.params.depth_stage_config.params.model_config", SMALL_MIDAS)
    return cfg


def small_midas_state_dict() -> dict:
    """The tiny fixture's weights with a small MiDaS (deterministic init) in place of the full one."""
    sd = delta_state_dict(TINY_CKPT, BASE_CKPT)
    meta = instantiate_on_meta(small_midas_config().model)
    for name, tensor in meta.state_dict().items():
        if name.startswith("depth_model."):
            sd[name] = deterministic_tensor(name, tensor.shape, init_rule(meta, name))
    return sd


@pytest.fixture(scope="module")
def small_sd(spec_dir):
    from ldm.generate import StableDiffusion

    register_tiny_openclip(FIXTURES)
    model = load_model_from_config(small_midas_config(), small_midas_state_dict())
    return StableDiffusion(model, progress=False)


def test_depth2img_method_uses_midas_or_a_given_depth_map(small_sd):
    """Per-seed images; a given depth map equal to MiDaS's estimate gives the same images, another one
    changes them; strength 0 returns the re-encoded image; other families refuse the method."""
    from PIL import Image

    from ldm.errors import UserInputError

    sd = small_sd
    assert sd.spec.family.name == "sd-v2-depth"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    kwargs = dict(steps=4, sampler="ddim", strength=0.75)
    pair = sd.depth2img(["a house", "a cat"], image, seeds=3, **kwargs)
    alone = sd.depth2img("a cat", image, seeds=4, **kwargs)
    assert np.array_equal(np.asarray(pair.images[1]), np.asarray(alone.images[0]))
    record = alone.records[0]
    assert (record.mode, record.strength, record.scale, record.extra["Depth"], record.watermark_text) == (
        "depth2img", 0.75, 9.0, "MiDaS", "SDV2")
    with torch.no_grad():
        from ldm.image_io import image_to_tensor

        estimate = sd.model.estimate_depth(image_to_tensor(image))[0, 0]
    same = sd.depth2img("a cat", image, seeds=4, depth_map=estimate, **kwargs)
    assert np.array_equal(np.asarray(same.images[0]), np.asarray(alone.images[0]))
    assert same.records[0].extra["Depth"] == "given depth map"
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1)))
    other = sd.depth2img("a cat", image, seeds=4, depth_map=ramp, **kwargs)
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(alone.images[0]))
    with pytest.raises(UserInputError, match="flat"):
        sd.depth2img("a cat", image, depth_map=np.zeros((8, 8)), **kwargs)
    with pytest.raises(UserInputError, match="strength"):
        sd.depth2img("a cat", image, strength=1.5)
    with pytest.raises(UserInputError, match=r"txt2img\(\) cannot run the SD 2 depth"):
        sd.txt2img("a cat", steps=2)


def test_depth2img_script_renders_the_tiny_model_end_to_end(spec_dir, tmp_path, capsys):
    from PIL import Image

    from ldm.checkpoint import save_checkpoint
    from ldm.metadata import parse_parameters, read_parameters
    from tests.test_scripts import load_main

    register_tiny_openclip(FIXTURES)
    config = tmp_path / "depth-small-midas.yaml"
    OmegaConf.save(small_midas_config(), config)
    ckpt = save_checkpoint(small_midas_state_dict(), tmp_path / "depth-tiny.safetensors")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (70, 140, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(np.tile(np.linspace(0, 65535, 50).astype(np.uint16), (30, 1))).save(tmp_path / "depth.png")
    out = tmp_path / "out"
    common = ["--prompt", "a cabin", "--n_samples", "1", "--n_iter", "1", "--steps", "4", "--config", str(config),
              "--ckpt", str(ckpt), "--outdir", str(out), "--no_safety_check", "--device", "cpu", "--precision",
              "fp32", "--skip_grid"]
    main = load_main("depth2img.py")
    assert main(["--init-img", str(tmp_path / "init.png"), *common]) == 0, capsys.readouterr().err
    assert main(["--init-img", str(tmp_path / "init.png"), "--depth-map", str(tmp_path / "depth.png"),
                 "--strength", "0.5", *common]) == 0, capsys.readouterr().err
    capsys.readouterr()
    first, second = sorted((out / "samples").iterdir())
    meta = parse_parameters(read_parameters(first))
    # the init image is scaled down to multiples of 64: 140x70 -> 128x64
    assert (meta["Size"], meta["CFG scale"], meta["Denoising strength"], meta["Depth"]) == ("128x64", "9.0", "0.9",
                                                                                          "MiDaS")
    assert Image.open(first).size == (128, 64) and np.asarray(Image.open(first)).std() > 0
    meta = parse_parameters(read_parameters(second))
    assert (meta["Denoising strength"], meta["Depth"]) == ("0.5", "given depth map")
    # bad input: one error line each, before any model is loaded
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(tmp_path / "flat.png")
    for extra, expected in [(["--depth-map", str(tmp_path / "flat.png")], "--depth-map: the depth map is flat"),
                            (["--depth-map", str(tmp_path / "nope.png")], "--depth-map: image"),
                            (["--strength", "1.5"], "--strength"),
                            ([], "no init image given")]:
        init = [] if not extra else ["--init-img", str(tmp_path / "init.png")]
        assert main([*init, *extra, *common]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and expected in errors[0], errors
    # the depth checkpoint with a text-to-image config: the error names the depth config
    from ldm.generate import StableDiffusion

    with pytest.raises(CheckpointError, match="depth2img.*--config configs/stable-diffusion/v2-midas-inference.yaml"):
        StableDiffusion.from_files(FIXTURES / "sd-v2-v-tiny.yaml", ckpt, device="cpu", precision="fp32",
                                   hash_checkpoint=False)


def test_depth2img_help_lists_every_flag(capsys):
    from tests.test_scripts import load_main

    with pytest.raises(SystemExit):
        load_main("depth2img.py")(["--help"])
    entries = help_entries(capsys.readouterr().out)
    for flag in ("--init-img", "--depth-map", "--strength", "--prompt", "--negative_prompt", "--from-file", "--steps",
                 "--sampler", "--scale", "--seed", "--n_samples", "--n_iter", "--outdir", "--config", "--ckpt",
                 "--device", "--precision", "--no_safety_check", "--fixed_code", "--ddim_eta"):
        assert flag in entries, flag
    assert "0.9" in entries["--strength"] and "white = near" in entries["--depth-map"]
    assert "9.0 for sd-v2-depth" in entries["--scale"] and "v2-midas-inference.yaml" in entries["--config"]
