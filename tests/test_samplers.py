"""Samplers: reference parity (recorded UNet traces and the real tiny model), golden schedule
numbers, convergence, seeds, v-parameterisation, masks, img2img, guidance and the noise helper.

Three stand-in models keep most tests independent of the UNet:

* ``ReplayModel`` replays the reference's recorded UNet calls: it returns the recorded eps and
  records what the sampler asked for, so the sampler math and the exact timesteps are checked alone.
* ``MixtureModel`` is the exact noise predictor for data whose every element is an equal mixture of
  N(+m, s²) and N(-m, s²), m set by the conditioning: smooth, nonlinear, batch independent, any
  fractional timestep.
* ``VModel`` wraps an eps model and returns v = (eps - sqrt(1-a)·x) / sqrt(a) for it.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.k_diffusion import (CompVisDenoiser, KDiffusionSampler, _lms_coefficient,
                                              get_sigmas_karras)
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.registry import SAMPLER_NAMES, make_sampler
from ldm.models.diffusion.sampling import ClassifierFreeGuidance, randn, start_step_for_strength
from tests.helpers import load_config, rel_err

SHAPE = (4, 8, 8)  # latent (C, H, W) for the stand-in models
ALL = SAMPLER_NAMES
STOCHASTIC = {"ddim": dict(eta=1.0), "euler_a": {}}


# ---------------------------------------------------------------------------------- stand-ins
class ReplayModel(torch.nn.Module):
    """Holds the reference's schedule buffers; ``apply_model`` returns the recorded eps of call k."""

    def __init__(self, schedule, trace):
        super().__init__()
        for name, value in schedule.items():
            self.register_buffer(name, value.clone())
        self.num_timesteps = 1000
        self.parameterization = "eps"
        self.trace = trace
        self.calls = []

    def apply_model(self, x, t, cond):
        k = len(self.calls)
        assert k < len(self.trace), f"sampler made more UNet calls than the reference's {len(self.trace)}"
        self.calls.append((x.clone(), t.clone(), cond))
        return self.trace[k]["eps"].clone()


def _alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.0120 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class MixtureModel(torch.nn.Module):
    """Exact eps for x0 ~ ½N(m, s²) + ½N(-m, s²) per element, s = 1, m = 2·(1 + mean(cond)) per image.

    (Components narrower than about 0.7 make the data prediction change a lot at the last,
    coarse steps of the uniform-in-time grids, where DPM-Solver++(2M) then loses to DDIM; image
    latents, whose denoiser is nearly the identity at those noise levels, do not.)
    """

    s2 = 1.0

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", _alphas_cumprod())
        self.num_timesteps = 1000
        self.parameterization = "eps"
        self.calls = []

    def alpha_bar(self, t):
        """alphas_cumprod at (fractional) t: log-linear interpolation, exact at integers."""
        t = t.double()
        lo = t.floor().long().clamp(0, 998)
        w = (t - lo).view(-1, 1, 1, 1)
        log_ac = self.alphas_cumprod.double().log()
        return (log_ac[lo].view(-1, 1, 1, 1) * (1 - w) + log_ac[lo + 1].view(-1, 1, 1, 1) * w).exp()

    def apply_model(self, x, t, cond):
        self.calls.append(t.clone())
        a = self.alpha_bar(t)
        xd = x.double()
        m = 2 * (1 + (0 if cond is None else cond.double().mean(dim=(1, 2)).view(-1, 1, 1, 1)))
        var = a * self.s2 + 1 - a
        logits = torch.stack([-(xd - a.sqrt() * mu) ** 2 / (2 * var) for mu in (m, -m)])
        w = torch.softmax(logits, dim=0)
        post = sum(w[k] * (mu + a.sqrt() * self.s2 / var * (xd - a.sqrt() * mu)) for k, mu in enumerate((m, -m)))
        return ((xd - a.sqrt() * post) / (1 - a).sqrt()).float()


class VModel(torch.nn.Module):
    """The same predictor as ``inner`` in v form: v = (eps - sqrt(1-a)·x_t) / sqrt(a)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("alphas_cumprod", inner.alphas_cumprod.clone())
        self.num_timesteps = 1000
        self.parameterization = "v"

    def apply_model(self, x, t, cond):
        a = self.inner.alpha_bar(t)
        eps = self.inner.apply_model(x, t, cond).double()
        return ((eps - (1 - a).sqrt() * x.double()) / a.sqrt()).float()


def _conds(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(batch, 77, 8, generator=g) * 0.5
    uc = torch.zeros(batch, 77, 8)
    return c, uc


def _sample(name, model, steps, batch=2, x_T=None, scale=3.0, seed=0, conds=None, **kw):
    c, uc = conds or _conds(batch, seed)
    if x_T is None and "generator" not in kw:
        x_T = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(100 + seed))
    out, _ = make_sampler(name, model).sample(steps, batch, SHAPE, conditioning=c, unconditional_conditioning=uc,
                                              unconditional_guidance_scale=scale, x_T=x_T, verbose=False, **kw)
    return out


# ---------------------------------------------------------------------------------- 1. parity
@pytest.mark.parametrize("name", ["ddim", "plms", "dpm_solver"])
def test_replay_reproduces_reference_trace(parity, name):
    ref = parity["txt2img"]
    rec = ref[name]
    model = ReplayModel(parity["schedule"], rec["trace"])
    pred_x0s = []
    out, _ = make_sampler(name, model).sample(
        ref["steps"], 2, tuple(ref["x_T"].shape[1:]), conditioning=ref["c"], unconditional_conditioning=ref["uc"],
        unconditional_guidance_scale=ref["scale"], x_T=ref["x_T"], verbose=False,
        img_callback=lambda x0, i: pred_x0s.append(x0))
    assert len(model.calls) == len(rec["trace"]) == {"plms": 11}.get(name, 10)
    cond_in = torch.cat([ref["uc"], ref["c"]])
    for k, ((x, t, cond), call) in enumerate(zip(model.calls, rec["trace"])):
        assert t.dtype == call["t"].dtype, (k, t.dtype)
        assert torch.equal(t, call["t"]), (k, t, call["t"])  # incl. DPM-Solver's fractional 899.1, ...
        assert rel_err(x, call["x"]) < 1e-5, k
        assert torch.equal(cond, cond_in)
    assert rel_err(out, rec["samples"]) < 1e-4
    if "steps" in rec:  # DDIM / PLMS also record pred_x0 per step
        assert len(pred_x0s) == len(rec["steps"])
        for mine, step in zip(pred_x0s, rec["steps"]):
            assert rel_err(mine, step["pred_x0"]) < 1e-5


def test_dpm_solver_fractional_timesteps(parity):
    ts = [c["t"][0].item() for c in parity["txt2img"]["dpm_solver"]["trace"]]
    assert ts[0] == 999.0 and ts[-1] == pytest.approx(99.9, abs=1e-4)
    sampler = DPMSolverSampler(MixtureModel())
    sampler.make_schedule(10)
    assert torch.equal(sampler.model_timesteps, torch.tensor(ts))


def test_ddim_schedule_equals_reference(parity):
    ref = parity["txt2img"]["ddim"]["schedule"]
    sampler = DDIMSampler(ReplayModel(parity["schedule"], []))
    sampler.make_schedule(10, ddim_eta=0.0, verbose=False)
    for name, value in ref.items():
        assert torch.equal(torch.as_tensor(getattr(sampler, name)).to(value.dtype), value), name


def test_img2img_replay_keeps_reference_off_by_one(parity):
    ref = parity["img2img"]
    model = ReplayModel(parity["schedule"], ref["trace"])
    sampler = DDIMSampler(model)
    sampler.make_schedule(ref["steps_total"], ddim_eta=0.0, verbose=False)
    t_enc = int(ref["strength"] * ref["steps_total"])
    assert t_enc == ref["t_enc"] == 5
    z_enc = sampler.stochastic_encode(ref["init_latent"], torch.tensor([t_enc] * 2), noise=ref["noise"])
    assert torch.equal(z_enc, ref["z_enc"])
    out = sampler.decode(z_enc, ref["c"], t_enc, unconditional_guidance_scale=7.5,
                         unconditional_conditioning=ref["uc"], verbose=False)
    # noise was added at the level of timestep 501, denoising starts one step lower at 401
    assert sampler.ddim_timesteps[t_enc] == 501
    assert [t[0].item() for _, t, _ in model.calls] == [401, 301, 201, 101, 1]
    for (x, t, _), call in zip(model.calls, ref["trace"]):
        assert torch.equal(t, call["t"]) and rel_err(x, call["x"]) < 1e-5
    assert rel_err(out, ref["samples"]) < 1e-4


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    try:
        from ldm.checkpoint import load_model_from_config
    except ImportError as e:  # the model package is not there yet
        pytest.skip(f"real tiny model unavailable: {e}")
    return load_model_from_config(load_config(), tiny_ckpt)


@pytest.mark.parametrize("name", ["ddim", "plms", "dpm_solver"])
def test_real_tiny_model_matches_reference(tiny_model, parity, name):
    ref = parity["txt2img"]
    out, _ = make_sampler(name, tiny_model).sample(
        ref["steps"], 2, tuple(ref["x_T"].shape[1:]), conditioning=ref["c"], unconditional_conditioning=ref["uc"],
        unconditional_guidance_scale=ref["scale"], x_T=ref["x_T"], verbose=False)
    assert rel_err(out, ref[name]["samples"]) < 1e-4


def test_real_tiny_model_img2img_matches_reference(tiny_model, parity):
    ref = parity["img2img"]
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ref["steps_total"], ddim_eta=0.0, verbose=False)
    z_enc = sampler.stochastic_encode(ref["init_latent"], torch.tensor([ref["t_enc"]] * 2), noise=ref["noise"])
    out = sampler.decode(z_enc, ref["c"], ref["t_enc"], unconditional_guidance_scale=7.5,
                         unconditional_conditioning=ref["uc"], verbose=False)
    assert rel_err(out, ref["samples"]) < 1e-4


# ---------------------------------------------------------------------------------- 2. golden numbers
def test_ddim_50_steps_visit_981_down_to_1():
    assert make_ddim_timesteps("uniform", 50, 1000).tolist() == list(range(1, 1000, 20))
    assert make_ddim_timesteps("uniform", 10, 1000).tolist() == list(range(1, 1000, 100))
    assert len(make_ddim_timesteps("uniform", 7, 1000)) == 8  # reference quirk: range(0, 1000, 142)
    with pytest.raises(ValueError, match="past"):
        make_ddim_timesteps("uniform", 3, 1000)  # would index alphas_cumprod[1000]
    model = MixtureModel()
    _sample("ddim", model, 50)
    assert [t[0].item() for t in model.calls] == list(range(981, 0, -20))


def test_ddim_last_step_uses_alphas_cumprod_0():
    class ConstantEps(MixtureModel):
        def apply_model(self, x, t, cond):
            return torch.full_like(x, 0.5)

    model = ConstantEps()
    sampler = DDIMSampler(model)
    x_T = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    pred_x0s = []
    out, _ = sampler.sample(10, 1, SHAPE, x_T=x_T, verbose=False, img_callback=lambda x0, i: pred_x0s.append(x0))
    a0 = model.alphas_cumprod[0]
    assert a0.item() == pytest.approx(0.99915, abs=1e-7)
    assert sampler.ddim_alphas_prev[0] == a0.item()
    expected = a0.sqrt() * pred_x0s[-1] + (1 - a0).sqrt() * 0.5  # not pred_x0, and not a_prev = 1
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, pred_x0s[-1], atol=1e-3)


def test_plms_refuses_eta():
    sampler = PLMSSampler(MixtureModel())
    with pytest.raises(ValueError, match="eta must be 0"):
        sampler.sample(10, 1, SHAPE, eta=0.5, verbose=False)
    with pytest.raises(ValueError, match="eta must be 0"):
        sampler.make_schedule(10, ddim_eta=1.0)
    for name in ("dpm_solver", "euler", "heun", "dpmpp_2m", "lms"):
        with pytest.raises(ValueError, match="eta must be 0"):
            make_sampler(name, MixtureModel()).sample(5, 1, SHAPE, eta=0.5, verbose=False)


def test_k_diffusion_noise_levels():
    den = CompVisDenoiser(None, _alphas_cumprod())
    t = torch.tensor([0.0, 10.25, 500.5, 998.75, 999.0])
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(t)), t, atol=2e-3)
    sigmas = den.get_sigmas(10)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    assert torch.allclose(sigmas[[0, -2]], torch.stack([den.sigma_max, den.sigma_min]), rtol=1e-6)
    assert den.sigma_max.item() == pytest.approx(math.sqrt((1 - 0.0046600983) / 0.0046600983), rel=1e-5)
    k = get_sigmas_karras(10, den.sigma_min.item(), den.sigma_max.item())
    assert k[0].item() == pytest.approx(den.sigma_max.item(), rel=1e-5)
    assert k[-2].item() == pytest.approx(den.sigma_min.item(), rel=1e-5) and k[-1] == 0
    # LMS weights integrate the interpolating polynomial exactly: constants integrate to the step
    s = sigmas.double().numpy()
    for i in range(1, 6):
        order = min(i + 1, 4)
        total = sum(_lms_coefficient(s, i, j, order) for j in range(order))
        assert total == pytest.approx(s[i + 1] - s[i], rel=1e-10)


def test_unknown_and_unsupported_arguments_are_refused():
    sampler = DDIMSampler(MixtureModel())
    with pytest.raises(TypeError, match="ddim_steps"):
        sampler.sample(10, 1, SHAPE, ddim_steps=10)
    with pytest.raises(ValueError, match="score_corrector"):
        sampler.sample(10, 1, SHAPE, score_corrector=object(), verbose=False)
    with pytest.raises(ValueError, match="quantize_x0"):
        sampler.sample(10, 1, SHAPE, quantize_x0=True, verbose=False)
    with pytest.raises(ValueError, match="batch 2 but batch_size is 1"):
        sampler.sample(10, 1, SHAPE, conditioning=torch.zeros(2, 77, 8), verbose=False)
    with pytest.raises(ValueError, match="x0"):
        sampler.sample(10, 1, SHAPE, mask=torch.ones(1, 1, 8, 8), verbose=False)
    with pytest.raises(ValueError, match="schedule"):
        DDIMSampler(MixtureModel(), schedule="cosine")
    with pytest.raises(UserInputError, match="unknown sampler 'k_euler'.*dpmpp_2m_karras"):
        make_sampler("k_euler", MixtureModel())


def test_registry_names():
    assert SAMPLER_NAMES == ("ddim", "plms", "dpm_solver", "euler", "euler_a", "heun", "dpmpp_2m",
                             "dpmpp_2m_karras", "lms")
    types = {name: type(make_sampler(name, MixtureModel())) for name in SAMPLER_NAMES}
    assert types["ddim"] is DDIMSampler and types["plms"] is PLMSSampler and types["dpm_solver"] is DPMSolverSampler
    assert all(types[name] is KDiffusionSampler for name in SAMPLER_NAMES[3:])
    with pytest.raises(ValueError, match="unknown k-diffusion sampler"):
        KDiffusionSampler(MixtureModel(), "dpm_fast")


# ---------------------------------------------------------------------------------- 3. convergence
def _distances(model, scale, conds=None, batch=2):
    """L2 distance (relative) of each sampler's x0 to DDIM at 250 steps, same model and start noise."""
    x_T = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(7))
    c, uc = conds or _conds(batch)

    def to_x0(x):  # DDIM / DPM-Solver stop at alphas_cumprod[0]; finish all of them at sigma = 0
        a0 = model.alphas_cumprod[0]
        t0 = torch.zeros(batch, dtype=torch.long)
        eps = ClassifierFreeGuidance(model, c, uc, scale)(x, t0)
        return (x - (1 - a0).sqrt() * eps) / a0.sqrt()

    runs = {"ddim250": ("ddim", 250), "ddim20": ("ddim", 20), "dpmpp_2m20": ("dpmpp_2m", 20),
            "dpm_solver20": ("dpm_solver", 20), "heun20": ("heun", 20), "euler50": ("euler", 50)}
    out = {}
    for key, (name, steps) in runs.items():
        x = _sample(name, model, steps, batch=batch, x_T=x_T, scale=scale, conds=(c, uc))
        out[key] = to_x0(x) if name in ("ddim", "dpm_solver") else x
    return {k: rel_err(v, out["ddim250"]) for k, v in out.items() if k != "ddim250"}


def _check_convergence(dist):
    print("relative distance to DDIM-250:", {k: f"{v:.2e}" for k, v in dist.items()})
    for key in ("dpmpp_2m20", "dpm_solver20", "heun20", "euler50"):
        assert dist[key] < dist["ddim20"], (key, dist)


def test_convergence_to_ddim_250_stand_in():
    _check_convergence(_distances(MixtureModel(), scale=3.0))


def test_convergence_to_ddim_250_real_tiny_model(tiny_model, parity):
    # ~400 UNet calls on one 8x8 latent, no guidance (one UNet batch per call) to stay cheap
    ref = parity["txt2img"]
    with torch.no_grad():
        _check_convergence(_distances(tiny_model, scale=1.0, conds=(ref["c"][:1], ref["uc"][:1]), batch=1))


# ---------------------------------------------------------------------------------- 4. seeds
@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_per_image_generators_are_batch_independent(name):
    model = MixtureModel()
    c, uc = _conds(4)
    kw = dict(STOCHASTIC[name], unconditional_guidance_scale=3.0, verbose=False)
    sampler = make_sampler(name, model)
    batch, _ = sampler.sample(8, 4, SHAPE, conditioning=c, unconditional_conditioning=uc,
                              generator=[torch.Generator().manual_seed(k) for k in range(4)], **kw)
    for k in range(4):
        alone, _ = sampler.sample(8, 1, SHAPE, conditioning=c[k:k + 1], unconditional_conditioning=uc[k:k + 1],
                                  generator=[torch.Generator().manual_seed(k)], **kw)
        assert torch.allclose(batch[k:k + 1], alone, rtol=1e-5, atol=1e-6), k
    # the noise really differs per image and per step (eta > 0 is not deterministic)
    again, _ = sampler.sample(8, 4, SHAPE, conditioning=c, unconditional_conditioning=uc,
                              generator=[torch.Generator().manual_seed(k + 10) for k in range(4)], **kw)
    assert not torch.allclose(batch, again)


def test_randn_helper():
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    noise = randn((3, 2, 4), gens)
    for k in range(3):
        assert torch.equal(noise[k], torch.randn((1, 2, 4), generator=torch.Generator().manual_seed(k))[0])
    assert randn((2, 3), torch.Generator().manual_seed(0), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="one generator per image"):
        randn((2, 3), gens)


# ---------------------------------------------------------------------------------- 5. v-prediction
@pytest.mark.parametrize("name", ALL)
def test_v_parameterization_matches_eps(name):
    def run(model):
        return _sample(name, model, 10, generator=[torch.Generator().manual_seed(k) for k in range(2)],
                       **STOCHASTIC.get(name, {}))

    # integer timesteps (DDIM, PLMS) convert with exactly the model's alpha; fractional ones with
    # the sampler's interpolated alpha, which differs from the stand-in's by float rounding
    tol = 1e-6 if name in ("ddim", "plms") else 5e-5
    assert rel_err(run(VModel(MixtureModel())), run(MixtureModel())) < tol


# ---------------------------------------------------------------------------------- 6. masks, img2img
@pytest.mark.parametrize("name", ALL)
def test_mask_all_known_returns_x0_and_no_mask_is_plain_sampling(name):
    model = MixtureModel()
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    kw = STOCHASTIC.get(name, {})

    def run(**extra):
        return _sample(name, model, 6, generator=[torch.Generator().manual_seed(k) for k in range(2)], **kw, **extra)

    assert torch.equal(run(mask=torch.ones(2, 1, 8, 8), x0=x0), x0)
    assert torch.equal(run(mask=torch.zeros(2, 1, 8, 8), x0=x0), run())
    # half known: the known half is x0 exactly, the rest is generated
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    half = run(mask=mask, x0=x0)
    assert torch.equal(half[..., :4], x0[..., :4])
    assert not torch.allclose(half[..., 4:], x0[..., 4:])


def test_known_region_stays_on_the_forward_path():
    # with the known region replaced in eps space, DDIM's state there stays sqrt(a)·x0 + sqrt(1-a)·n
    # for the one noise n that x_T carries relative to x0 at the first level
    model = MixtureModel()
    x0 = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3))
    x_T = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(4))
    sampler = DDIMSampler(model)
    _, inter = sampler.sample(10, 1, SHAPE, mask=torch.ones(1, 1, 8, 8), x0=x0, x_T=x_T, verbose=False,
                              log_every_t=1)
    a_prev = torch.as_tensor(sampler.ddim_alphas_prev, dtype=torch.float32)
    a_T = sampler.ddim_alphas[-1]
    n = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    assert len(inter["x_inter"]) == 11
    for i, x in enumerate(inter["x_inter"][1:]):
        a = a_prev[9 - i]
        assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * n, atol=1e-5), i


@pytest.mark.parametrize("name", ALL)
def test_img2img_start_step_any_sampler(name):
    # data = a point mass at x0: a correct img2img from x0 noised to any level returns x0
    class PointMass(MixtureModel):
        def apply_model(self, x, t, cond):
            self.calls.append(t.clone())
            self.inputs.append(x.clone())
            a = self.alpha_bar(t)
            return ((x.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()).float()

    model = PointMass()
    model.inputs = []
    model.x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    start = start_step_for_strength(10, 0.5)
    assert start == 5
    out = _sample(name, model, 10, x0=model.x0, start_step=start, scale=1.0, **STOCHASTIC.get(name, {}),
                  generator=[torch.Generator().manual_seed(k) for k in range(2)])
    full_calls = {"plms": 11, "heun": 19}.get(name, 10)
    first_t = model.calls[0][0].item()
    # the first model input is x0 noised to that level with the generators' noise
    noise = randn((2, *SHAPE), [torch.Generator().manual_seed(k) for k in range(2)])
    a = model.alpha_bar(model.calls[0][:1]).float()
    assert torch.allclose(model.inputs[0], a.sqrt() * model.x0 + (1 - a).sqrt() * noise, atol=1e-5)
    model.calls.clear()
    _sample(name, model, 10, scale=1.0, **STOCHASTIC.get(name, {}))
    # the run starts at the timestep the full run reaches after `start` steps
    full = [t[0].item() for t in model.calls]
    assert len(full) == full_calls
    assert first_t == pytest.approx(full[{"plms": start + 1, "heun": 2 * start}.get(name, start)], abs=1e-4)
    tol = 0.05 if name in ("ddim", "plms", "dpm_solver") else 1e-4  # DDIM-like stop at alphas_cumprod[0]
    assert rel_err(out, model.x0) < tol


# ---------------------------------------------------------------------------------- guidance, callbacks
def test_cfg_single_batched_call_and_dict_conditioning():
    seen = []

    class Recorder:
        def apply_model(self, x, t, cond):
            seen.append((x.shape[0], t.clone(), cond))
            return torch.ones_like(x) * (torch.arange(x.shape[0]).view(-1, 1, 1, 1) < x.shape[0] // 2)

    x = torch.zeros(2, 4, 2, 2)
    t = torch.tensor([5, 5])
    cond = {"c_crossattn": [torch.ones(2, 3)], "c_concat": [torch.full((2, 1, 2, 2), 2.0)]}
    uncond = {"c_crossattn": [torch.zeros(2, 3)], "c_concat": [torch.full((2, 1, 2, 2), 2.0)]}
    out = ClassifierFreeGuidance(Recorder(), cond, uncond, 7.5)(x, t)
    assert len(seen) == 1 and seen[0][0] == 4 and seen[0][1].tolist() == [5, 5, 5, 5]
    assert torch.equal(seen[0][2]["c_crossattn"][0], torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
    assert seen[0][2]["c_concat"][0].shape == (4, 1, 2, 2)
    assert torch.equal(out, torch.full_like(x, 1 - 7.5))  # e_u + s·(e_c - e_u) with e_u = 1, e_c = 0
    seen.clear()
    ClassifierFreeGuidance(Recorder(), cond, uncond, 1.0)(x, t)
    ClassifierFreeGuidance(Recorder(), cond, None, 7.5)(x, t)
    assert [s[0] for s in seen] == [2, 2] and seen[0][2] is cond


@pytest.mark.parametrize("name", ALL)
def test_callbacks_and_intermediates(name):
    steps, calls, images = 5, [], []
    c, uc = _conds(1)
    sampler = make_sampler(name, MixtureModel())
    out, inter = sampler.sample(steps, 1, SHAPE, conditioning=c, verbose=False, callback=calls.append,
                                img_callback=lambda x0, i: images.append(i), log_every_t=2,
                                generator=torch.Generator().manual_seed(0))
    assert calls == images == list(range(steps))
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + 3  # start, index 4 (first), 2, 0
    assert torch.equal(inter["x_inter"][-1], out)
