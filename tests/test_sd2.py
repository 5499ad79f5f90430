"""Stable Diffusion 2 (``configs/stable-diffusion/v2-*.yaml``): the UNet layouts of the other SD 2
models; reference parity on the tiny 768-v fixture (``sd-v2-v-tiny``: UNet and its blocks, v
conversions, VAE, DDIM / DPM-Solver txt2img traces, img2img); v-prediction in every sampler and in
PLMS, where we differ from the reference on purpose; ``use_fp16`` on the CPU, bf16, half-precision
attention scores; the whole tiny model from prompts (``.ckpt`` and ``.safetensors``); the
9-channel inpainting config; and the full-size 768-v UNet against diffusers.
(The full layouts of the three SD 2 configs are checked in ``tests/test_manifests.py``.)

Most parity tests do not need the text encoder (``FrozenOpenCLIPEmbedder``): they use the
fixture's recorded ``c`` / ``uc`` with the cond stage replaced by ``__is_unconditional__`` (keeping
the ``crossattn`` route). Tests that need the encoder skip, naming it, where it is missing.
"""
from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_on_meta, load_model_from_config, read_checkpoint, save_checkpoint
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import GuidedModel
from ldm.models.diffusion.registry import make_sampler
from tests.conftest import FIXTURES
from tests.helpers import (REPO, Recorder, read_manifest, rel_err, unet_and_diffusers_outputs, unet_block_outputs)
from tests.helpers import register_tiny_openclip as register_tiny_openclip_in

V_TINY_CONFIG = FIXTURES / "sd-v2-v-tiny.yaml"
V_TINY_CKPT = FIXTURES / "sd-v2-v-tiny-random.ckpt"
V_TINY_PARITY = FIXTURES / "sd-v2-v-tiny-parity.pt"
V2_V_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference-v.yaml"
COND = "cond_stage_model."


def openclip_embedder_missing() -> str:
    """Why the SD 2 text encoder cannot be built here ("" when it can)."""
    from ldm.modules.encoders import modules

    cls = getattr(modules, "FrozenOpenCLIPEmbedder", None)
    if cls is None or issubclass(cls, getattr(modules, "_NotProvided", ())):
        return "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder is not provided yet"
    return ""


def register_tiny_openclip() -> None:
    """Register the fixture's tiny open_clip arch (``ldmtest-tiny-ViT-H-14``) with the embedder."""
    register_tiny_openclip_in(FIXTURES)


needs_openclip = pytest.mark.skipif(bool(openclip_embedder_missing()), reason=openclip_embedder_missing() or "ok")


def tiny_v_model(with_text_encoder: bool = False, ckpt=V_TINY_CKPT, dtype=None, **overrides):
    """The tiny 768-v model with the fixture's weights (``ckpt``: a path), eval.

    With the text encoder the file is loaded as it is (strictly). Without, its
    ``cond_stage_model.*`` tensors are left out and the model keeps the crossattn route
    (``force_null_conditioning``)."""
    cfg = OmegaConf.load(V_TINY_CONFIG)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    if with_text_encoder:
        register_tiny_openclip()
        return load_model_from_config(cfg, ckpt, dtype=dtype)
    cfg.model.params.cond_stage_config = "__is_unconditional__"
    cfg.model.params.force_null_conditioning = True
    sd = {k: v for k, v in read_checkpoint(ckpt).state_dict.items() if not k.startswith(COND)}
    return load_model_from_config(cfg, sd, dtype=dtype)


@pytest.fixture(scope="module")
def v2(spec_dir) -> dict:
    """Everything the reference recorded on the tiny 768-v model."""
    return torch.load(V_TINY_PARITY, weights_only=True)


@pytest.fixture(scope="module")
def v_model(spec_dir):
    return tiny_v_model()


def to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """What the scripts write: ``(255·clamp((x+1)/2, 0, 1))`` truncated, [B, H, W, 3]."""
    return (255 * ((decoded + 1) / 2).clamp(0, 1)).permute(0, 2, 3, 1).to(torch.uint8)


def assert_uint8_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # truncation can flip a value sitting on an integer boundary by one level
    diff = (ours.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# ---------------------------------------------------------------------------------- UNet layouts
SD2_UNET = dict(use_checkpoint=True, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64,
                use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1,
                context_dim=1024, legacy=False)
OTHER_SD2_UNETS = {  # the unet_config params of the reference's configs
    "sd-v2-unclip-h.tsv": dict(SD2_UNET, num_classes="sequential", adm_in_channels=2048,
                               spatial_transformer_attn_type="softmax-xformers"),
    "sd-v2-unclip-l.tsv": dict(SD2_UNET, num_classes="sequential", adm_in_channels=1536,
                               spatial_transformer_attn_type="softmax-xformers"),
    "sd-v2-depth.tsv": dict(SD2_UNET, in_channels=5),
    "sd-x4-upscaler.tsv": dict(use_checkpoint=True, num_classes=1000, image_size=128, in_channels=7, out_channels=4,
                               model_channels=256, attention_resolutions=[2, 4, 8], num_res_blocks=2,
                               channel_mult=[1, 2, 2, 4], disable_self_attentions=[True, True, True, False],
                               disable_middle_self_attn=False, num_heads=8, use_spatial_transformer=True,
                               transformer_depth=1, context_dim=1024, legacy=False, use_linear_in_transformer=True),
}


@pytest.mark.parametrize("manifest", sorted(OTHER_SD2_UNETS))
def test_other_sd2_unets_build_official_layout(spec_dir, manifest):
    """The UNets of the other SD 2 models (label embeddings, text "self"-attention, 5/7 input
    channels) build exactly the ``model.diffusion_model.*`` keys and shapes of their manifests."""
    unet = instantiate_on_meta({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                "params": OTHER_SD2_UNETS[manifest]})
    prefix = "model.diffusion_model."
    expected = [(k[len(prefix):], s) for k, s in read_manifest(spec_dir / manifest) if k.startswith(prefix)]
    assert [(k, tuple(v.shape)) for k, v in unet.state_dict().items()] == expected


# ---------------------------------------------------------------------------------- model math
def test_schedule_and_parameterization(v_model, v2):
    assert v_model.parameterization == v2["parameterization"] == "v"
    for name, ref in v2["schedule"].items():
        assert torch.equal(getattr(v_model, name), ref), name


def test_unet_v_output_matches_reference(v_model, v2):
    ref = v2["unet"]
    with torch.no_grad():
        out = v_model.apply_model(ref["x"], ref["t"], ref["context"])
        out_float = v_model.apply_model(ref["x"], ref["t_float"], ref["context"])
        out_uncond = v_model.apply_model(ref["x"], ref["t"], ref["context_uncond"])
    # measured: 1.2e-6, 1.2e-6, 1.3e-6
    assert rel_err(out, ref["out"]) < 1e-5
    assert rel_err(out_float, ref["out_float_t"]) < 1e-5
    assert rel_err(out_uncond, ref["out_uncond"]) < 1e-5


def test_unet_blocks_match_reference(v_model, v2):
    ref = v2["unet"]
    got = unet_block_outputs(v_model.model.diffusion_model, ref["x"], ref["t"], ref["context"])
    assert set(ref["blocks"]) <= set(got)
    errors = {name: rel_err(got[name], value) for name, value in ref["blocks"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])  # measured: 1.2e-6 (output_blocks.2)


def test_v_conversions_match_reference(v_model, v2):
    ref = v2["unet"]
    # bit for bit: sqrt_alphas_cumprod[t]·... ± sqrt_one_minus_alphas_cumprod[t]·... in float32
    assert torch.equal(v_model.predict_eps_from_z_and_v(ref["x"], ref["t"], ref["out"]), ref["eps_from_v"])
    assert torch.equal(v_model.predict_start_from_z_and_v(ref["x"], ref["t"], ref["out"]), ref["x0_from_v"])
    fns = {"predict_eps_from_z_and_v": v_model.predict_eps_from_z_and_v,
           "predict_start_from_z_and_v": v_model.predict_start_from_z_and_v}
    steps = v2["txt2img"]["ddim"]["steps"]
    for k, conv in enumerate(v2["txt2img"]["ddim"]["v_conversions"]):
        x = v2["txt2img"]["x_T"] if k < 2 else steps[k // 2 - 1]["x_prev"]  # the state the step converts at
        assert torch.equal(fns[conv["fn"]](x, conv["t"], conv["v"]), conv["out"]), k


def test_v_training_target_is_get_v(v_model):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    v = v_model.training_target(x0, noise, t)
    x_t = v_model.q_sample(x0, t, noise)
    # v = sqrt(a)·eps - sqrt(1-a)·x0 inverts both conversions
    assert torch.allclose(v_model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(v_model.predict_eps_from_z_and_v(x_t, t, v), noise, atol=1e-5)


def test_vae_matches_reference(v_model, v2):
    ref = v2["vae"]
    vae = v_model.first_stage_model
    got = {}
    modules = dict(vae.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: got.__setitem__(f"blocks/{name}", o))
             for name in ref["blocks"]]
    try:
        with torch.no_grad():
            posterior = v_model.encode_first_stage(ref["x"])
            decoded = v_model.decode_first_stage(ref["z_scaled"])
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        decoded_rand = v_model.decode_first_stage(ref["z_rand_scaled"])
    assert v_model.scale_factor == ref["scale_factor"]
    got.update(moments=posterior.parameters, mean=posterior.mean, logvar_clamped=posterior.logvar,
               std=posterior.std, mode=posterior.mode(), z_scaled=v_model.scale_factor * posterior.mode(),
               decoded=decoded, decoded_rand=decoded_rand)
    expected = {k: ref[k] for k in ("moments", "mean", "logvar_clamped", "std", "mode", "z_scaled", "decoded",
                                    "decoded_rand")}
    expected.update({f"blocks/{k}": v for k, v in ref["blocks"].items()})
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    assert max(errors.values()) < 1e-5, errors


def test_use_fp16_config_runs_on_cpu(v2):
    # the project's SD 2 configs keep use_fp16: True; the UNet computes in its weights' dtype
    model = tiny_v_model(**{"model.params.unet_config.params.use_fp16": True})
    ref = v2["unet"]
    with torch.no_grad():
        out = model.apply_model(ref["x"], ref["t"], ref["context"])
    assert out.dtype == torch.float32 and rel_err(out, ref["out"]) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_close_to_fp32(v2, dtype, tol):
    model = tiny_v_model(dtype=dtype)
    assert model.model.diffusion_model.out[2].weight.dtype == dtype
    ref = v2["unet"]
    with torch.no_grad():
        out = model.apply_model(ref["x"], ref["t"], ref["context"])
    # measured: bf16 1.7e-2, fp16 2.1e-3
    assert out.dtype == torch.float32 and rel_err(out, ref["out"]) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)])
def test_half_precision_attention_keeps_scores_in_float32(dtype, tol):
    """SD 2's reference upcasts q·kᵀ and the softmax to float32 (ATTN_PRECISION "fp32"). Our
    attention gets half-precision q, k, v and SDPA does the same internally: the result is the
    float32-score attention of the rounded inputs up to the rounding of the output, several
    times closer than scores rounded to the half dtype (what the upcast avoids)."""
    import ldm.ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, n, 64, generator=g) * s for n, s in ((1024, 3), (77, 3), (77, 1)))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, -1) @ v.double()
    half_scores = (torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v).double()
    with ldm.ops.settings(attention="sdpa"):
        ours = ldm.ops.attention(q, k, v, scale=64 ** -0.5)
    assert ours.dtype == dtype
    assert rel_err(ours, exact) < tol < rel_err(half_scores, exact)


# ---------------------------------------------------------------------------------- samplers
class ReplayModel(torch.nn.Module):
    """The reference's schedule; ``apply_model`` returns the recorded raw output of call k."""

    def __init__(self, schedule, trace, parameterization):
        super().__init__()
        for name, value in schedule.items():
            self.register_buffer(name, value.clone())
        self.num_timesteps = 1000
        self.parameterization = parameterization
        self.trace = trace
        self.calls = []

    def apply_model(self, x, t, cond):
        k = len(self.calls)
        assert k < len(self.trace), f"more model calls than the reference's {len(self.trace)}"
        self.calls.append((x.clone(), t.clone()))
        return self.trace[k]["out"].clone()


def _txt2img(name, model, ref):
    out, _ = make_sampler(name, model).sample(
        ref["steps"], 2, tuple(ref["x_T"].shape[1:]), conditioning=ref["c"], unconditional_conditioning=ref["uc"],
        unconditional_guidance_scale=ref["scale"], x_T=ref["x_T"], verbose=False)
    return out


def _check_trace(calls, trace, tol):
    assert len(calls) == len(trace)
    for k, (call, rec) in enumerate(zip(calls, trace)):
        assert call[1].dtype == rec["t"].dtype and torch.equal(call[1], rec["t"]), (k, call[1], rec["t"])
        assert rel_err(call[0], rec["x"]) < tol, k


@pytest.mark.parametrize("name", ["ddim", "dpm_solver"])
def test_replay_v_trace(v2, name):
    """Fed the recorded v outputs, the sampler asks for exactly the recorded inputs and timesteps
    (DPM-Solver's fractional 999.0, 899.1, ...) and lands on the recorded samples."""
    ref = v2["txt2img"]
    model = ReplayModel(v2["schedule"], ref[name]["trace"], "v")
    out = _txt2img(name, model, ref)
    _check_trace(model.calls, ref[name]["trace"], 1e-5)
    assert rel_err(out, ref[name]["samples"]) < 1e-5


@pytest.mark.parametrize("name", ["ddim", "dpm_solver"])
def test_tiny_v_model_txt2img_matches_reference(v_model, v2, name):
    ref = v2["txt2img"]
    model = Recorder(v_model)
    out = _txt2img(name, model, ref)
    # measured: inputs <= 3.2e-6 per call, samples 2.9e-6 (DDIM) / 3.5e-6 (DPM-Solver)
    _check_trace(model.calls, ref[name]["trace"], 1e-4)
    for (_, _, mine), rec in zip(model.calls, ref[name]["trace"]):
        assert rel_err(mine, rec["out"]) < 1e-4
    assert rel_err(out, ref[name]["samples"]) < 1e-4
    with torch.no_grad():
        decoded = v_model.decode_first_stage(out)
    assert rel_err(decoded, ref[name]["decoded"]) < 1e-4
    assert_uint8_close(to_uint8(decoded), ref[name]["uint8"])


def test_tiny_v_model_img2img_keeps_reference_off_by_one(v_model, v2):
    ref, vae = v2["img2img"], v2["vae"]
    with torch.no_grad():
        posterior = v_model.encode_first_stage(vae["x"].expand(2, -1, -1, -1))
    init_latent = v_model.scale_factor * (posterior.mean + posterior.std * ref["posterior_noise"])
    assert rel_err(init_latent, ref["init_latent"]) < 1e-5
    model = Recorder(v_model)
    sampler = DDIMSampler(model)
    sampler.make_schedule(ref["steps_total"], ddim_eta=0.0, verbose=False)
    t_enc = int(ref["strength"] * ref["steps_total"])
    assert t_enc == ref["t_enc"] == 5
    z_enc = sampler.stochastic_encode(ref["init_latent"], torch.tensor([t_enc] * 2), noise=ref["noise"])
    assert torch.equal(z_enc, ref["z_enc"])
    out = sampler.decode(z_enc, ref["c"], t_enc, unconditional_guidance_scale=ref["scale"],
                         unconditional_conditioning=ref["uc"], verbose=False)
    # noised to timestep 501, denoised from 401 (the reference's off-by-one)
    assert [t[0].item() for _, t, _ in model.calls] == [401, 301, 201, 101, 1]
    _check_trace(model.calls, ref["trace"], 1e-4)
    assert rel_err(out, ref["samples"]) < 1e-4
    with torch.no_grad():
        decoded = v_model.decode_first_stage(out)
    assert rel_err(decoded, ref["decoded"]) < 1e-4
    assert_uint8_close(to_uint8(decoded), ref["uint8"])


def test_plms_replays_reference_only_when_v_is_misread_as_eps(v2):
    """The reference PLMS uses the v output as if it were eps. Fed the recorded outputs, our PLMS
    reproduces its trace when told the model predicts eps, and departs from it at the second model
    call when it converts v correctly (what it does for a v model)."""
    ref = v2["txt2img"]
    trace = ref["plms"]["trace"]
    as_eps = ReplayModel(v2["schedule"], trace, "eps")
    out = _txt2img("plms", as_eps, ref)
    _check_trace(as_eps.calls, trace, 1e-5)
    assert rel_err(out, ref["plms"]["samples"]) < 1e-5
    as_v = ReplayModel(v2["schedule"], trace, "v")
    _txt2img("plms", as_v, ref)
    assert rel_err(as_v.calls[0][0], trace[0]["x"]) < 1e-6
    assert rel_err(as_v.calls[1][0], trace[1]["x"]) > 0.1


def test_plms_handles_v_where_the_reference_does_not(v_model, v2):
    """Our PLMS on the v model lands near DDIM's result (as PLMS does on eps models); the reference's
    PLMS samples are far off (final latents with std 12 against DDIM's 2.2)."""
    ref = v2["txt2img"]
    ddim = ref["ddim"]["samples"]
    ours = _txt2img("plms", v_model, ref)
    # measured: ours 0.25 from DDIM-10 (DPM-Solver-10 is 0.18 from it), std 2.28; reference 12.4
    assert rel_err(ours, ddim) < 0.4
    assert abs(ours.std() / ddim.std() - 1) < 0.2
    assert rel_err(ref["plms"]["samples"], ddim) > 2
    assert ref["plms"]["samples"].std() > 4 * ddim.std()


def test_every_sampler_handles_v_on_the_tiny_model(v_model, v2):
    """Every deterministic sampler, run on the real tiny v model, lands near DDIM-50's x0; told the
    model predicts eps instead, it lands far away. (Measured: 0.046 (PLMS, LMS) to 0.09 (Heun-10)
    with v; about 8.5 misread.)"""
    ref = v2["txt2img"]
    c, uc, scale = ref["c"], ref["uc"], ref["scale"]

    def x0_of(name, steps, model):
        out, _ = make_sampler(name, model).sample(steps, 2, tuple(ref["x_T"].shape[1:]), conditioning=c,
                                                  unconditional_conditioning=uc, unconditional_guidance_scale=scale,
                                                  x_T=ref["x_T"], verbose=False)
        if name in ("ddim", "plms", "dpm_solver"):  # these stop at alphas_cumprod[0]: finish to x0
            t0 = torch.zeros(2, dtype=torch.long)
            with torch.no_grad():
                out = v_model.predict_start_from_z_and_v(out, t0, GuidedModel(v_model, c, uc, scale)(out, t0))
        return out

    best = x0_of("ddim", 50, v_model)
    runs = [("ddim", 20), ("plms", 20), ("dpm_solver", 20), ("euler", 20), ("heun", 10), ("dpmpp_2m", 20),
            ("dpmpp_2m_karras", 20), ("lms", 20)]
    errors = {name: rel_err(x0_of(name, steps, v_model), best) for name, steps in runs}
    assert max(errors.values()) < 0.15, errors
    misread = Recorder(v_model)
    misread.parameterization = "eps"
    for name, steps in [("euler", 20), ("dpmpp_2m_karras", 20)]:
        assert rel_err(x0_of(name, steps, misread), best) > 2, name


# ---------------------------------------------------------------------------------- text encoder
@needs_openclip
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_tiny_v_model_end_to_end_from_prompts(v2, tmp_path, fmt):
    """The fixture's config as is (real OpenCLIP cond stage), the whole file loaded strictly, as
    the reference's ``.ckpt`` and re-saved as ``.safetensors``: prompts -> conditioning -> DDIM."""
    ckpt = V_TINY_CKPT
    if fmt == "safetensors":
        ckpt = save_checkpoint(read_checkpoint(V_TINY_CKPT).state_dict, tmp_path / "sd-v2-v-tiny.safetensors")
    model = tiny_v_model(with_text_encoder=True, ckpt=ckpt)
    ref = v2["txt2img"]
    prompts = v2["clip"]["prompts"]
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))
    assert rel_err(c, ref["c"]) < 1e-5 and rel_err(uc, ref["uc"]) < 1e-5
    out, _ = make_sampler("ddim", model).sample(
        ref["steps"], 2, tuple(ref["x_T"].shape[1:]), conditioning=c, unconditional_conditioning=uc,
        unconditional_guidance_scale=ref["scale"], x_T=ref["x_T"], verbose=False)
    assert rel_err(out, ref["ddim"]["samples"]) < 1e-4


# ---------------------------------------------------------------------------------- inpainting 2
@needs_openclip
def test_v2_inpainting_config_routes_mask_and_masked_latent(v2):
    """The project's v2-inpainting-inference.yaml at the tiny fixture's sizes, with the tiny 768-v
    weights and a 9-channel input conv whose 5 extra input channels are zero: the hybrid route
    (``cat([x, mask, masked-image latent])`` + text cross-attention) then gives exactly the tiny
    model's recorded output, whatever the mask. Then a masked DDIM run keeps the known region."""
    register_tiny_openclip()
    cfg = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml")
    for key, value in v2["meta"]["config_overrides"].items():
        if "use_fp16" not in key:  # the inpainting config has no use_fp16
            OmegaConf.update(cfg, key, value)
    cfg.model.params.cond_stage_config.params.arch = "ldmtest-tiny-ViT-H-14"
    sd = dict(read_checkpoint(V_TINY_CKPT).state_dict)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.cat([sd[key], torch.zeros(sd[key].shape[0], 5, 3, 3)], dim=1)  # [32, 9, 3, 3]
    model = load_model_from_config(cfg, sd)
    assert type(model).__name__ == "LatentInpaintDiffusion" and model.parameterization == "eps"

    ref, vae = v2["unet"], v2["vae"]
    image = vae["x"].expand(2, -1, -1, -1)
    mask = torch.zeros(2, 1, 64, 128)
    mask[..., 32:, 40:100] = 1  # 1 = repaint
    c_concat = model.inpaint_conditioning(image, mask, generator=torch.Generator().manual_seed(0))
    assert c_concat[0].shape == (2, 5, 8, 16)
    assert torch.equal(c_concat[0][:, :1], torch.nn.functional.interpolate(mask, size=(8, 16)))  # mask first
    with torch.no_grad():
        out = model.apply_model(ref["x"], ref["t"], {"c_concat": c_concat, "c_crossattn": [ref["context"]]})
    assert rel_err(out, ref["out"]) < 1e-5

    known = 1 - torch.nn.functional.interpolate(mask, size=(8, 16))
    x0 = model.get_first_stage_encoding(model.encode_first_stage(image), generator=torch.Generator().manual_seed(1))
    cond = {"c_concat": c_concat, "c_crossattn": [v2["txt2img"]["c"]]}
    uncond = {"c_concat": c_concat, "c_crossattn": [v2["txt2img"]["uc"]]}
    z, _ = make_sampler("ddim", model).sample(4, 2, (4, 8, 16), conditioning=cond, unconditional_conditioning=uncond,
                                              unconditional_guidance_scale=9.0, mask=known, x0=x0, verbose=False,
                                              generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    assert torch.isfinite(z).all()
    assert torch.equal(z * known, x0 * known)


# ---------------------------------------------------------------------------------- full size
def test_full_size_768_v_unet_matches_diffusers():
    """The UNet of the original v2-inference-v.yaml (use_fp16: True, num_head_channels 64, linear
    projections, context 1024) against diffusers' UNet2DConditionModel with the same random
    weights, converted by diffusers' own single-file functions."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    from tests.test_diffusers_unet import random_state_dict

    config = OmegaConf.load(V2_V_CONFIG)
    ours = instantiate_on_meta(config.model.params.unet_config)
    sd = random_state_dict(ours)
    ours.load_state_dict(sd, assign=True)
    ours.eval()
    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}
    dconfig = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config, resolve=True), ckpt)
    assert dconfig["use_linear_projection"] and dconfig["cross_attention_dim"] == 1024
    converted = convert_ldm_unet_checkpoint(ckpt, dconfig)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dconfig)
    theirs.load_state_dict(converted, strict=True, assign=True)
    theirs.eval()
    heads = [m.heads for m in ours.modules() if type(m).__name__ == "CrossAttention"]
    assert sorted(set(heads)) == [5, 10, 20]  # head width 64 at 320/640/1280 channels

    a, b, a_frac, b_frac = unet_and_diffusers_outputs(ours, theirs, 1024)
    assert rel_err(a, b) < 1e-4
    assert rel_err(a_frac, b_frac) < 1e-4
    assert a.std() > 0.01 and rel_err(a, a_frac) > 1e-4
