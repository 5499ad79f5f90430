"""SDXL 1.0 (sgm): the original configs build the released key layout, and the tiny fixture recorded
from the original sgm code (../shared/spec/sdxl.md) is reproduced: tokenizers, embedders,
conditioner, c/uc, every UNet block, the denoiser, the grids, the Euler and DPM++(2M) traces, the
VAE, the refiner's conditioner; then the pipeline and the scripts end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import SPEC_DIR
from tests.helpers import REPO, read_manifest, rel_err, unet_block_outputs
from tests.test_scripts import load_main, restore_logging  # noqa: F401  (autouse fixture)

BASE_YAML = REPO / "configs" / "inference" / "sd_xl_base.yaml"
REFINER_YAML = REPO / "configs" / "inference" / "sd_xl_refiner.yaml"
TINY_ARCH = "ViT-bigG-14-tiny"
LEGACY_DDPM = {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the fixture was recorded (and quick on a shared, busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fx(spec_dir) -> dict:
    return torch.load(spec_dir / "fixtures" / "sdxl-tiny-parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_file(spec_dir) -> Path:
    return spec_dir / "fixtures" / "sdxl-tiny-random.safetensors"


def _register_tiny_arch(fx) -> None:
    from ldm.modules.encoders.open_clip import register_open_clip_arch

    oc = fx["meta"]["tiny_overrides"]["open_clip_config"]
    register_open_clip_arch(TINY_ARCH, {"embed_dim": oc["embed_dim"], "text_cfg": dict(oc["text_cfg"]),
                                        "vision_cfg": dict(oc["vision_cfg"])})


def tiny_config(fx, refiner: bool = False):
    """The original yaml with only the fixture's size overrides (sdxl.md, "Tiny fixture")."""
    _register_tiny_arch(fx)
    over = fx["meta"]["tiny_overrides"]
    cfg = OmegaConf.load(REFINER_YAML if refiner else BASE_YAML)
    params = cfg.model.params
    unet = dict(over["unet"])
    if refiner:
        unet.update(adm_in_channels=fx["meta"]["refiner_adm_in_channels"], context_dim=48, transformer_depth=1,
                    channel_mult=[1, 2, 4])
    for key, value in unet.items():
        params.network_config.params[key] = value
    params.first_stage_config.params.ddconfig.ch = over["ddconfig"]["ch"]
    params.first_stage_config.params.ddconfig.attn_type = over["ddconfig"]["attn_type"]
    for entry in params.conditioner_config.params.emb_models:
        if entry.target.endswith("FrozenCLIPEmbedder"):
            entry.params.text_config = dict(over["clip_l"])
        elif entry.target.endswith("FrozenOpenCLIPEmbedder2"):
            entry.params.arch = TINY_ARCH
    return cfg


@pytest.fixture(scope="module")
def model(fx, tiny_file):
    from ldm.checkpoint import load_model_from_config

    return load_model_from_config(tiny_config(fx), tiny_file)


@pytest.fixture(scope="module")
def sd(fx, tiny_file):
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(tiny_config(fx), tiny_file, device="cpu", precision="fp32",
                                      hash_checkpoint=False, progress=False)


def close(got, want, tol=1e-5):
    err = rel_err(got, want)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


# --------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("yaml,tsv", [(BASE_YAML, "sdxl-base.tsv"), (REFINER_YAML, "sdxl-refiner.tsv")])
def test_the_original_configs_build_the_released_layout(spec_dir, yaml, tsv):
    from ldm.checkpoint import instantiate_on_meta

    model = instantiate_on_meta(OmegaConf.load(yaml).model)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == dict(read_manifest(spec_dir / tsv))


def test_the_configs_are_the_original_files_targets():
    text = BASE_YAML.read_text()
    for target in ("sgm.models.diffusion.DiffusionEngine", "sgm.modules.GeneralConditioner",
                   "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                   "sgm.modules.diffusionmodules.openaimodel.UNetModel", "sgm.models.autoencoder.AutoencoderKL"):
        assert f"target: {target}" in text


def test_a_file_without_position_ids_and_sigmas_loads_the_same(fx, tiny_file, model):
    from safetensors.torch import load_file

    from ldm.checkpoint import load_model_from_config

    sd = load_file(str(tiny_file))
    assert "denoiser.sigmas" in sd and "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in sd
    slim = {k: v for k, v in sd.items() if not k.endswith("position_ids") and k != "denoiser.sigmas"}
    other = load_model_from_config(tiny_config(fx), slim)
    assert torch.equal(other.denoiser.sigmas, model.denoiser.sigmas)
    assert torch.equal(other.denoiser.sigmas, fx["denoiser"]["sigmas_1000"])


def test_a_bf16_load_keeps_the_sigma_table_in_float32(fx, tiny_file):
    from ldm.checkpoint import load_model_from_config

    m = load_model_from_config(tiny_config(fx), tiny_file, dtype=torch.bfloat16)
    assert m.denoiser.sigmas.dtype == torch.float32
    assert torch.equal(m.denoiser.sigmas, fx["denoiser"]["sigmas_1000"])
    assert next(m.model.parameters()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- text
def test_both_tokenizers_give_the_recorded_ids(fx, model):
    tok = fx["tokenizer"]
    clip_l, big_g = model.conditioner.embedders[0], model.conditioner.embedders[1]
    assert torch.equal(clip_l.tokenize(tok["prompts"]).input_ids, tok["clip_l_input_ids"])
    assert torch.equal(big_g.tokenize(tok["prompts"]).input_ids, tok["open_clip_input_ids"])


def test_each_text_embedder(fx, model):
    e = fx["embedders"]
    clip_l, big_g = model.conditioner.embedders[0], model.conditioner.embedders[1]
    with torch.no_grad():
        close(clip_l(e["prompts"]), e["clip_l_crossattn"])   # hidden_states[11], no final norm
        crossattn, pooled = big_g(e["prompts"])
    close(crossattn, e["open_clip_crossattn"])               # penultimate, no ln_final
    close(pooled, e["open_clip_pooled"])


@pytest.mark.parametrize("part", ["conditioner_direct", "conditioner_extra"])
def test_the_conditioner_with_per_sample_sizes(fx, model, part):
    rec = fx[part]
    with torch.no_grad():
        out = model.conditioner(rec["batch"])
    close(out["crossattn"], rec["crossattn"])
    close(out["vector"], rec["vector"])
    if part == "conditioner_direct":
        size = model.conditioner.embedders[2]
        for i, key in enumerate(("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")):
            close(model.conditioner.embedders[2 + i](rec["batch"][key]), rec["size_embeddings"][key])
        assert size(torch.tensor([[1024, 1024]])).shape == (1, 512)


def test_c_and_uc_as_sgm_builds_them(fx, sd):
    """Base without a negative prompt: zero text embeddings in uc (sgm); with one: it is encoded
    (sgm's legacy path, recorded as uc_legacy)."""
    from ldm.generate.sdxl import MicroConditioning

    rec = fx["cond"]
    v = rec["value_dict"]
    sd.micro_conditioning = MicroConditioning(original_size=(v["orig_height"], v["orig_width"]),
                                              crop_top_left=(v["crop_coords_top"], v["crop_coords_left"]))
    size = (v["target_height"], v["target_width"])
    try:
        with torch.no_grad():
            c, uc = sd._text_conditioning(rec["prompts"], ["", ""], 5.0, size)
            _, uc_neg = sd._text_conditioning(rec["prompts"], [rec["negative_prompt"]] * 2, 5.0, size)
            _, uc_mixed = sd._text_conditioning(rec["prompts"], ["", rec["negative_prompt"]], 5.0, size)
    finally:
        sd.micro_conditioning = MicroConditioning()
    for key in ("crossattn", "vector"):
        close(c[key], rec["c"][key])
        assert torch.equal(uc[key], rec["uc"][key]) or rel_err(uc[key], rec["uc"][key]) < 1e-5
        close(uc_neg[key], rec["uc_legacy"][key])
        assert torch.equal(uc_mixed[key][0], uc[key][0])
        close(uc_mixed[key][1], rec["uc_legacy"][key][1])
    assert not rec["uc"]["crossattn"].any()


def test_the_refiner_conditioner_with_aesthetic_scores(fx, tiny_file):
    from safetensors.torch import load_file

    from ldm.generate.sdxl import MicroConditioning, conditioning_batch
    from ldm.util import instantiate_from_config

    rec = fx["refiner"]
    cond = instantiate_from_config(tiny_config(fx, refiner=True).model.params.conditioner_config)
    base = load_file(str(tiny_file))
    prefix = "conditioner.embedders.1."
    cond.embedders[0].load_state_dict({k[len(prefix):]: v.float() for k, v in base.items() if k.startswith(prefix)})
    v = rec["value_dict"]
    micro = MicroConditioning(aesthetic_score=v["aesthetic_score"],
                              negative_aesthetic_score=v["negative_aesthetic_score"])
    size = (v["orig_height"], v["orig_width"])
    with torch.no_grad():
        c = cond(conditioning_batch(cond.input_keys, rec["prompts"], size, micro, refiner=True))
        uc = cond(conditioning_batch(cond.input_keys, [rec["negative_prompt"]] * 2, size, micro, refiner=True,
                                     negative=True))
        scores = cond.embedders[3](torch.tensor([6.0, 2.5]))
    for key in ("crossattn", "vector"):
        close(c[key], rec["c"][key])
        close(uc[key], rec["uc"][key])
    close(scores, rec["aesthetic_embedding"])


# --------------------------------------------------------------------------------------------- UNet, denoiser
def test_every_unet_block(fx, model):
    u = fx["unet"]
    unet = model.model.diffusion_model
    blocks = unet_block_outputs(unet, u["x"], u["t"], u["context"], y=u["y"])
    for name, want in u["blocks"].items():
        close(blocks[name], want)
    with torch.no_grad():
        close(unet(u["x"], timesteps=u["t"], context=u["context"], y=u["y"]), u["eps"])
        close(unet(u["x"], timesteps=u["t_float"], context=u["context"], y=u["y"]), u["eps_float_t"])
        close(unet(u["x"], timesteps=u["t"], context=u["context_uc"], y=u["y_uc"]), u["eps_uc"])


def test_the_sigma_table_and_the_denoiser_on_and_off_the_grid(fx, model):
    d = fx["denoiser"]
    den = model.denoiser
    assert torch.equal(den.sigmas, d["sigmas_1000"])
    assert torch.equal(den.possibly_quantize_sigma(d["probe_sigma"]), d["quantized_sigma"])
    assert torch.equal(den.sigma_to_idx(d["probe_sigma"]), d["idx"])
    c_skip, c_out, c_in, c_noise = den.scaling(d["quantized_sigma"])
    assert torch.equal(c_skip, d["c_skip"]) and torch.equal(c_out, d["c_out"])
    close(c_in, d["c_in"], 1e-7)
    assert torch.equal(den.possibly_quantize_c_noise(c_noise), d["c_noise"])
    with torch.no_grad():
        close(den(model.model, d["call_x"], d["call_sigma"], d["call_c"]), d["call_out"])
    # alphas_cumprod of the engine (what every project sampler reads) is the float64 schedule's
    close(model.alphas_cumprod, d["alphas_cumprod_float64"], 1e-6)


def test_the_10_and_50_step_discretizations(fx):
    from sgm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization

    disc = LegacyDDPMDiscretization()
    assert torch.equal(disc(10), fx["denoiser"]["discretization_10"])
    assert torch.equal(disc(50), fx["denoiser"]["discretization_50"])
    assert torch.equal(disc(1000, do_append_zero=False, flip=True), fx["denoiser"]["sigmas_1000"])


# --------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name,cls", [("euler_edm", "EulerEDMSampler"), ("dpmpp2m", "DPMPP2MSampler")])
def test_sgm_samplers_reproduce_the_recorded_traces(fx, model, name, cls):
    import sgm.modules.diffusionmodules.sampling as sampling

    t = fx["txt2img"]
    sampler = getattr(sampling, cls)(discretization_config=LEGACY_DDPM, num_steps=t["steps"],
                                     guider_config={"target": "sgm.modules.diffusionmodules.guiders.VanillaCFG",
                                                    "params": {"scale": t["scale"]}})
    calls = []

    def denoiser(x, sigma, c):
        out = model.denoiser(model.model, x, sigma, c)
        calls.append((x, sigma, out))
        return out

    steps = []
    with torch.no_grad():
        z = sampler(denoiser, t["x_T"].clone(), t["c"], t["uc"], callback=lambda info: steps.append(info["x"]))
        decoded = model.decode_first_stage(z)
    rec = t[name]
    assert len(calls) == len(rec["calls"]) == 10
    for (x, sigma, out), want in zip(calls, rec["calls"]):
        close(x, want["x"], 1e-4)
        assert torch.allclose(sigma, want["sigma"])
        close(out, want["out"], 1e-4)
    for x, want in zip(steps, rec["steps"]):
        close(x, want["x_next"], 1e-4)
    close(z, rec["samples_z"], 1e-4)
    close(decoded, rec["decoded"], 1e-4)
    images = (255 * ((decoded + 1) / 2).clamp(0, 1)).permute(0, 2, 3, 1).to(torch.uint8)
    assert (images.int() - rec["uint8"].int()).abs().max() <= 1


@pytest.mark.parametrize("name,ours", [("euler_edm", "euler"), ("dpmpp2m", "dpmpp_2m")])
def test_the_pipeline_samplers_run_sgms_grid(fx, sd, name, ours):
    """The project's euler / dpmpp_2m on an SDXL model are sgm's samplers: same levels, start and calls."""
    from ldm.generate.batching import PaddedPerImageModel
    from tests.helpers import Recorder

    t = fx["txt2img"]
    model = Recorder(sd.model)
    engine = sd._sampler_for(ours, PaddedPerImageModel(model, 1, None))
    with torch.no_grad():
        z, _ = engine.sample(S=10, batch_size=2, shape=(4, 8, 12), conditioning=t["c"],
                             unconditional_guidance_scale=5.0,
                             unconditional_conditioning=t["uc"], x_T=t["x_T"], verbose=False)
    rec = t[name]
    assert [int(c[1][0]) for c in model.calls] == [int(i) for i in sd.model.denoiser.sigma_to_idx(rec["sigmas"][:-1])]
    close(z, rec["samples_z"], 1e-4)
    close(sd.decode(z), rec["decoded"], 1e-4)


def test_vae_encode_and_decode(fx, model):
    v = fx["vae"]
    with torch.no_grad():
        close(model.decode_first_stage(v["z_rand_scaled"]), v["decoded_rand"])
        fs = model.first_stage_model
        close(fs.quant_conv(fs.encoder(v["x"])), v["moments"])
    x = v["image_uint8"].permute(2, 0, 1)[None].float() / 127.5 - 1
    close(x, v["x"], 1e-7)


# --------------------------------------------------------------------------------------------- families
def test_the_families_of_the_sgm_configs_and_models(fx, model):
    from ldm.families import facts_from_model, facts_from_state_dict, family_of
    from ldm.generate import describe_config, load_config

    base, refiner = describe_config(load_config(BASE_YAML)), describe_config(load_config(REFINER_YAML))
    assert (base.family.name, refiner.family.name) == ("sdxl-base", "sdxl-refiner")
    assert base.geometry.unet_multiple == 4 and refiner.geometry.unet_multiple == 8
    assert (base.height, base.width, base.family.sampler, base.family.steps) == (1024, 1024, "dpmpp_2m", 50)
    assert base.family.default_scale("txt2img") == 6.0
    assert family_of(facts_from_model(model)).name == "sdxl-base"
    for tsv, name in (("sdxl-base.tsv", "sdxl-base"), ("sdxl-refiner.tsv", "sdxl-refiner")):
        shapes = dict(read_manifest(SPEC_DIR / tsv))
        assert family_of(facts_from_state_dict(shapes)).name == name


def test_an_sdxl_file_with_a_v1_config_and_the_reverse_name_the_right_config(fx, tiny_file, spec_dir):
    from ldm.checkpoint import CheckpointError
    from ldm.generate import StableDiffusion
    from tests.helpers import TINY_CONFIG

    with pytest.raises(CheckpointError, match="sd_xl_base.yaml"):
        StableDiffusion.from_files(TINY_CONFIG, tiny_file, device="cpu", precision="fp32", hash_checkpoint=False)
    with pytest.raises(CheckpointError, match="v1-inference.yaml"):
        StableDiffusion.from_files(tiny_config(fx), spec_dir / "fixtures" / "sd-v1-tiny-random.ckpt", device="cpu",
                                   precision="fp32", hash_checkpoint=False)


# --------------------------------------------------------------------------------------------- pipeline
def test_micro_conditioning_out_of_range_is_one_line():
    from ldm.errors import UserInputError
    from ldm.generate.sdxl import MicroConditioning

    for bad in (dict(original_size=(0, 512)), dict(crop_top_left=(-1, 0)), dict(aesthetic_score=11.0),
                dict(target_size=(512, 99999))):
        with pytest.raises(UserInputError) as err:
            MicroConditioning(**bad).check()
        assert "\n" not in str(err.value)


def test_the_refiner_split_is_sgms():
    from ldm.errors import UserInputError
    from ldm.generate.sdxl import refiner_steps

    assert refiner_steps(50, 0.15) == 6   # int(0.15 * 51) - 1: the base runs 44 steps, the refiner 6
    assert refiner_steps(40, 0.15) == 5
    assert refiner_steps(20, 0.3) == 5
    with pytest.raises(UserInputError):
        refiner_steps(10, 0.15)           # int(1.65) - 1 = 0 steps


@pytest.mark.parametrize("mode", ["latent", "image"])
def test_two_stages_hand_over_at_the_same_level(sd, mode):
    """With the base standing in as its own refiner (the split machinery without a second model), a
    latent hand-off with Euler (memoryless) equals one uninterrupted run; the image mode runs."""
    whole = sd.txt2img("a castle", 3, width=64, height=64, steps=10, sampler="euler")
    sd.refiner, sd.refiner_strength, sd.refiner_mode = sd, 0.3, mode
    try:
        split = sd.txt2img("a castle", 3, width=64, height=64, steps=10, sampler="euler")
    finally:
        sd.refiner, sd.refiner_mode = None, "latent"
    a = torch.from_numpy(np.array(split.images[0])).float()
    b = torch.from_numpy(np.array(whole.images[0])).float()
    if mode == "latent":
        assert (a - b).abs().max() <= 1
    else:
        assert split.images[0].size == (64, 64) and (a - b).abs().max() > 1


def test_scripts_run_sdxl_with_micro_conditioning_and_a_refiner(fx, tiny_file, tmp_path):
    from ldm.metadata import read_parameters
    from ldm.watermark import SDXL_WATERMARK, has_watermark

    cfg_path = tmp_path / "sd_xl_base_tiny.yaml"
    OmegaConf.save(tiny_config(fx), cfg_path)
    out = tmp_path / "out"
    args = ["--config", str(cfg_path), "--ckpt", str(tiny_file), "--prompt", "a castle", "--n_samples", "1",
            "--n_iter", "1", "--steps", "4", "--H", "256", "--W", "256", "--outdir", str(out), "--no_safety_check",
            "--device", "cpu", "--precision", "fp32", "--original_size", "512", "768", "--crop_top_left", "0", "8",
            "--target_size", "256", "256"]
    assert load_main("txt2img.py")(args) == 0
    sample = sorted((out / "samples").glob("*.png"))[0]
    from PIL import Image

    image = Image.open(sample)
    assert image.size == (256, 256) and has_watermark(image, SDXL_WATERMARK)
    assert "Steps: 4" in read_parameters(sample)
    assert load_main("txt2img.py")(args[:-6] + ["--aesthetic_score", "11"]) == 2
    assert load_main("img2img.py")(["--config", str(cfg_path), "--ckpt", str(tiny_file), "--prompt", "a castle",
                                    "--init-img", str(sample), "--n_samples", "1", "--steps", "4", "--strength", "0.5",
                                    "--outdir", str(tmp_path / "i2i"), "--no_safety_check", "--device", "cpu",
                                    "--precision", "fp32"]) == 0


@pytest.fixture(scope="module")
def tiny_refiner(fx, tiny_file, tmp_path_factory) -> Path:
    """A tiny random refiner saved as ``sd_xl_refiner_tiny.safetensors`` with its config beside it
    (found by the name), its text tower the base fixture's."""
    from safetensors.torch import load_file

    from ldm.checkpoint import save_checkpoint
    from ldm.util import instantiate_from_config

    folder = tmp_path_factory.mktemp("refiner")
    cfg = tiny_config(fx, refiner=True)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    base = load_file(str(tiny_file))
    prefix = "conditioner.embedders.1."
    model.conditioner.embedders[0].load_state_dict({k[len(prefix):]: v.float() for k, v in base.items()
                                                    if k.startswith(prefix)})
    OmegaConf.save(cfg, folder / "sd_xl_refiner_tiny.yaml")
    return save_checkpoint(model, folder / "sd_xl_refiner_tiny.safetensors")


@pytest.mark.parametrize("mode", ["latent", "image"])
def test_txt2img_with_a_refiner(fx, tiny_file, tiny_refiner, tmp_path, mode):

    cfg_path = tmp_path / "base.yaml"
    OmegaConf.save(tiny_config(fx), cfg_path)
    args = ["--config", str(cfg_path), "--ckpt", str(tiny_file), "--prompt", "a castle", "--n_samples", "1",
            "--n_iter", "1", "--steps", "20", "--H", "64", "--W", "64", "--outdir", str(tmp_path / mode),
            "--no_safety_check", "--device", "cpu", "--precision", "fp32", "--refiner", str(tiny_refiner),
            "--refiner_mode", mode, "--refiner_strength", "0.3"]
    assert load_main("txt2img.py")(args) == 0
    assert len(list((tmp_path / mode / "samples").glob("*.png"))) == 1
    # a sampler off the model's levels cannot hand the latent over; the refiner must be a refiner
    if mode == "latent":
        assert load_main("txt2img.py")(args + ["--sampler", "ddim"]) == 2
        assert load_main("txt2img.py")(args + ["--refiner_config", str(cfg_path)]) == 2


def test_tiled_decode_is_close_to_the_whole_decode(fx, model):
    z = fx["vae"]["z_rand_scaled"]
    with torch.no_grad():
        whole = model.decode_first_stage(z)
        model.vae_tile = 8
        try:
            tiled = model.decode_first_stage(z)
        finally:
            model.vae_tile = None
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    assert rel_err(tiled, whole) < 0.25


def test_the_sgm_package_stays_thin_and_ldm_never_imports_it():
    """sgm holds adapters, not a second UNet / attention / VAE / sampler: no module of it is long,
    and nothing under ldm/ imports it (ldm knows SDXL by names)."""
    import re

    for path in (REPO / "sgm").rglob("*.py"):
        assert len(path.read_text().splitlines()) < 250, path
        assert not re.search(r"^class (CrossAttention|SpatialTransformer|ResBlock|Encoder|Decoder)\b",
                             path.read_text(), re.M), path
    for path in (REPO / "ldm").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) sgm\b", path.read_text(), re.M), path


@pytest.mark.slow
def test_the_full_base_loads_in_bf16_from_an_fp16_file_in_little_more_than_its_size(tmp_path):
    """3.5 B parameters: a random fp16 file in the released layout, loaded in bf16 in a fresh process,
    cast tensor by tensor as it is read: the peak stays near the bf16 model (7 GB), far below 24 GiB."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from ldm.checkpoint import instantiate_on_meta

    path = tmp_path / "sd_xl_base_random_fp16.safetensors"
    model = instantiate_on_meta(OmegaConf.load(BASE_YAML).model)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, value in model.state_dict().items():
        if not value.is_meta:
            sd[key] = value.clone()
        elif value.is_floating_point():
            sd[key] = (0.02 * torch.randn(value.shape, generator=g)).half()
        else:
            sd[key] = torch.arange(value.shape[-1]).expand(value.shape).clone()
    del model
    save_file(sd, str(path))
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and k != "denoiser.sigmas")
    del sd
    code = ("import resource, sys, torch; from omegaconf import OmegaConf; "
            "from ldm.checkpoint import load_model_from_config; "
            "m = load_model_from_config(OmegaConf.load(sys.argv[1]), sys.argv[2], dtype=torch.bfloat16); "
            "assert next(m.model.parameters()).dtype == torch.bfloat16 and m.denoiser.sigmas.dtype == torch.float32; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(BASE_YAML), str(path)], cwd=REPO, capture_output=True,
                         text=True, check=True)
    peak_gib = int(out.stdout.split()[-1]) / 2**20
    model_gib = 2 * n_params / 2**30
    assert n_params > 3.4e9
    assert peak_gib < model_gib + 2.0, f"peak {peak_gib:.1f} GiB for a {model_gib:.1f} GiB bf16 model"


def test_the_watermark_reader_names_sgms_message(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ldm.families import get_family
    from ldm.watermark import add_watermark

    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    marked, ok = add_watermark(Image.fromarray(noise), get_family("sdxl-base").watermark)
    assert ok
    marked.save(tmp_path / "x.png")
    assert load_main("tests/test_watermark.py")([str(tmp_path / "x.png")]) == 0
    assert capsys.readouterr().out.strip() == "0xB3EC907BB19E"


def test_sdxl_flags_on_another_model_are_one_error_line(spec_dir, tmp_path, capsys):
    from tests.helpers import TINY_CONFIG

    code = load_main("txt2img.py")(["--config", str(TINY_CONFIG), "--ckpt", str(spec_dir / "fixtures" /
                                    "sd-v1-tiny-random.ckpt"), "--original_size", "512", "512", "--outdir",
                                    str(tmp_path), "--no_safety_check"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--original_size" in err[-1] and "only for SDXL" in err[-1]


def test_every_sampler_runs_sdxl(sd):
    from ldm.models.diffusion.registry import SAMPLER_NAMES

    for name in SAMPLER_NAMES:
        steps = 4 if name in ("ddim", "plms") else 3
        result = sd.txt2img("a castle", 1, width=64, height=64, steps=steps, sampler=name)
        image = np.array(result.images[0])
        assert image.shape == (64, 64, 3) and image.std() > 0, name
