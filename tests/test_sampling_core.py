"""The sampling core: the guider, the parameterisation adapters (golden numbers), the denoiser's
timestep maps and known-region rule, the registry's rules, and that the reference samplers run on
the shared solver functions (DDIM = Euler, DPM-Solver++(2M) written once)."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.errors import UserInputError
from ldm.models.diffusion import solvers
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.denoiser import (DiscreteDenoiser, EDMScaling, EpsScaling, TimestepLookup, VScaling,
                                           from_sigma_space, scaling_for, to_sigma_space)
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import GuidedModel, IdentityGuider, VanillaCFG, make_guider
from ldm.models.diffusion.registry import (SAMPLER_DESCRIPTIONS, SAMPLER_NAMES, SAMPLERS, SamplerInfo, check_steps,
                                           make_sampler, resolve_eta, sampler_info)


def _alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.0120 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class LinearModel(torch.nn.Module):
    """eps = 0.3·x_t + 0.1·t/1000 + mean(cond): smooth, cheap, depends on everything it is given."""

    def __init__(self, parameterization="eps"):
        super().__init__()
        self.register_buffer("alphas_cumprod", _alphas_cumprod())
        self.num_timesteps = 1000
        self.parameterization = parameterization
        self.ts = []

    def apply_model(self, x, t, cond):
        self.ts.append(t.clone())
        c = 0 if cond is None else cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return 0.3 * x + 0.1 * t.view(-1, 1, 1, 1).float() / 1000 + c


# ---------------------------------------------------------------------------------- guider
def test_vanilla_cfg_doubles_the_batch_and_combines_u_plus_s_c_minus_u():
    g = VanillaCFG(7.5)
    x, t = torch.arange(2.0).view(2, 1), torch.tensor([3, 4])
    x_in, t_in = g.prepare_inputs(x, t)
    assert x_in.tolist() == [[0.0], [1.0], [0.0], [1.0]] and t_in.tolist() == [3, 4, 3, 4]
    assert torch.equal(g.prepare_cond(torch.ones(2, 1), torch.zeros(2, 1)), torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
    out = torch.tensor([[1.0], [2.0], [3.0], [-2.0]])  # u = (1, 2), c = (3, -2)
    assert g(out).tolist() == [[1.0 + 7.5 * 2.0], [2.0 + 7.5 * -4.0]]  # 16, -28


def test_make_guider_and_guided_model():
    assert isinstance(make_guider(7.5, torch.zeros(1)), VanillaCFG)
    assert type(make_guider(1.0, torch.zeros(1))) is IdentityGuider
    assert type(make_guider(7.5, None)) is IdentityGuider
    model = LinearModel()
    c, uc = torch.full((1, 77, 8), 0.5), torch.zeros(1, 77, 8)
    x = torch.ones(1, 4, 2, 2)
    out = GuidedModel(model, c, uc, 3.0)(x, torch.tensor(500))  # a scalar t is expanded to the batch
    assert model.ts[-1].tolist() == [500, 500]
    u, cc = 0.3 + 0.05, 0.3 + 0.05 + 0.5
    assert torch.allclose(out, torch.full_like(x, u + 3.0 * (cc - u)))


# ---------------------------------------------------------------------------------- scalings
def test_scalings_golden_numbers_at_sigma_2():
    s = torch.tensor(2.0)
    eps, v, edm = EpsScaling()(s), VScaling()(s), EDMScaling(0.5)(s)
    r5 = 1 / math.sqrt(5)
    assert [x.item() for x in eps] == pytest.approx([1.0, -2.0, r5, 2.0], rel=1e-6)
    assert [x.item() for x in v] == pytest.approx([0.2, -2 * r5, r5, 2.0], rel=1e-6)
    assert [x.item() for x in edm] == pytest.approx(
        [0.25 / 4.25, 1 / math.sqrt(4.25), 1 / math.sqrt(4.25), 0.25 * math.log(2)], rel=1e-6)
    assert [x.item() for x in edm] == pytest.approx([0.0588235294, 0.4850712501, 0.4850712501, 0.1732867951],
                                                    rel=1e-6)
    assert isinstance(scaling_for("eps"), EpsScaling) and isinstance(scaling_for("v"), VScaling)
    with pytest.raises(ValueError, match="'x0'"):
        scaling_for("x0")


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_denoiser_gives_the_vp_data_prediction(parameterization):
    ac = _alphas_cumprod()
    model = LinearModel(parameterization)
    den = DiscreteDenoiser(GuidedModel(model, None), ac, scaling=scaling_for(parameterization), timesteps="nearest")
    n = 600
    a = ac[n].double()
    sigma = den.sigmas[n:n + 1]
    x_t = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    out = model.apply_model(x_t, torch.tensor([n]), None).double()
    if parameterization == "eps":
        x0 = (x_t.double() - (1 - a).sqrt() * out) / a.sqrt()
    else:  # x0 = sqrt(a)·x_t - sqrt(1-a)·v
        x0 = a.sqrt() * x_t.double() - (1 - a).sqrt() * out
    got = den(to_sigma_space(x_t, sigma), sigma)
    assert model.ts[-1].dtype == torch.long and model.ts[-1].tolist() == [n]  # "nearest": the exact integer
    assert torch.allclose(got.double(), x0, rtol=1e-5, atol=1e-5)


def test_timestep_maps():
    ac = _alphas_cumprod()
    den = DiscreteDenoiser(None, ac)
    assert den.sigma_to_t(den.sigmas[[10, 500]]).tolist() == pytest.approx([10.0, 500.0], abs=1e-3)
    assert den.sigma_to_t(den.t_to_sigma(torch.tensor([250.5])))[0].item() == pytest.approx(250.5, abs=2e-3)
    grid = TimestepLookup(torch.tensor([14.6, 3.0, 0.5]), torch.tensor([999.0, 899.1, 99.9]))
    assert grid(torch.tensor([3.0, 0.5])).tolist() == pytest.approx([899.1, 99.9])
    assert grid(torch.tensor([14.6]))[0].item() == 999.0
    with pytest.raises(ValueError, match="timesteps must be"):
        DiscreteDenoiser(None, ac, timesteps="round")


def test_known_region_rule_in_the_denoiser():
    ac = _alphas_cumprod()
    x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0] = 1
    den = DiscreteDenoiser(GuidedModel(LinearModel(), None), ac, mask=mask, x0=x0)
    free = DiscreteDenoiser(GuidedModel(LinearModel(), None), ac)
    x, sigma = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([3.0])
    d, d_free = den(x, sigma), free(x, sigma)
    assert torch.equal(d[..., 0], x0[..., 0])  # known: the model is told the answer
    assert torch.equal(d[..., 1], d_free[..., 1])  # unknown: the model's own prediction
    zeros = DiscreteDenoiser(GuidedModel(LinearModel(), None), ac, mask=torch.zeros_like(mask), x0=x0)
    assert torch.equal(zeros(x, sigma), d_free)


def test_sigma_space_round_trip():
    x_t, sigma = torch.tensor([[1.5]]), torch.tensor(3.0)
    assert to_sigma_space(x_t, sigma).item() == pytest.approx(1.5 * math.sqrt(10))
    assert from_sigma_space(to_sigma_space(x_t, sigma), sigma).item() == pytest.approx(1.5)
    assert torch.equal(from_sigma_space(x_t, torch.tensor(0.0)), x_t)


# ---------------------------------------------------------------------------------- registry
def test_sampler_info_table():
    assert tuple(SAMPLERS) == SAMPLER_NAMES == ("ddim", "plms", "dpm_solver", "euler", "euler_a", "heun",
                                                "dpmpp_2m", "dpmpp_2m_karras", "lms")
    assert [SAMPLERS[n].display_name for n in SAMPLER_NAMES] == [
        "DDIM", "PLMS", "DPM-Solver++ 2M (time uniform)", "Euler", "Euler a", "Heun", "DPM++ 2M",
        "DPM++ 2M Karras", "LMS"]
    assert {n: i.default_eta for n, i in SAMPLERS.items() if i.default_eta is not None} == {"ddim": 0.0,
                                                                                           "euler_a": 1.0}
    assert SAMPLER_DESCRIPTIONS == {n: i.description for n, i in SAMPLERS.items()}
    assert sampler_info("euler_a") == SamplerInfo("euler_a", SAMPLER_DESCRIPTIONS["euler_a"], "Euler a", 1.0)
    with pytest.raises(UserInputError, match="unknown sampler 'k_lms'.*ddim, plms.*lms"):
        sampler_info("k_lms")
    with pytest.raises(UserInputError, match="unknown sampler"):
        make_sampler("k_lms", LinearModel())


def test_resolve_eta():
    assert resolve_eta("ddim", None) == 0.0 and resolve_eta("ddim", 0.3) == 0.3
    assert resolve_eta("euler_a", None) == 1.0 and resolve_eta("euler_a", 0) == 0.0
    for name in ("plms", "dpm_solver", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "lms"):
        assert resolve_eta(name, None) is None and resolve_eta(name, 0) is None and resolve_eta(name, 0.0) is None
    with pytest.raises(UserInputError, match=r"heun is deterministic: eta must be 0 \(got 0.5\).*ddim.*euler_a"):
        resolve_eta("heun", 0.5)
    for name in ("ddim", "euler_a", "plms"):
        with pytest.raises(UserInputError, match="eta must be >= 0"):
            resolve_eta(name, -0.1)
    with pytest.raises(UserInputError, match="unknown sampler"):
        resolve_eta("k_euler", None)


def test_check_steps():
    for name in SAMPLER_NAMES:
        check_steps(name, 50)
        with pytest.raises(UserInputError, match="positive int"):
            check_steps(name, 0)
    for name in ("ddim", "plms"):
        with pytest.raises(UserInputError, match="3 steps reaches timestep 1000.*pick another step count"):
            check_steps(name, 3)
        with pytest.raises(UserInputError, match="1..1000"):
            check_steps(name, 1001)
        check_steps(name, 7)  # 8 steps in the reference's discretisation: allowed
    for name in ("dpm_solver", "euler", "dpmpp_2m_karras"):
        check_steps(name, 3)
    check_steps("ddim", 3, num_timesteps=999)  # range(0, 999, 333) + 1 ends at 667
    with pytest.raises(UserInputError, match="positive int"):
        check_steps("euler", 2.5)


# ---------------------------------------------------------------------------------- one solver each
def _run(sampler, x_T, steps=10, **kw):
    c = torch.full((1, 77, 8), 0.2)
    out, _ = sampler.sample(steps, 1, (4, 2, 2), conditioning=c, unconditional_conditioning=torch.zeros_like(c),
                            unconditional_guidance_scale=3.0, x_T=x_T, verbose=False, **kw)
    return out


def test_dpm_solver_and_dpmpp_2m_are_one_function():
    dpm = DPMSolverSampler(LinearModel())
    assert dpm._plan(10, None, 1.0).solver is solvers.sample_dpmpp_2m
    for name in ("dpmpp_2m", "dpmpp_2m_karras"):
        assert make_sampler(name, LinearModel())._plan(10, None, 1.0).solver is solvers.sample_dpmpp_2m
    # the adapter's whole run is sample_dpmpp_2m on its grid, called at the grid's fractional timesteps
    x_T = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    out = _run(dpm, x_T)
    c = torch.full((1, 77, 8), 0.2)

    def by_hand(lower_order_final):
        model = LinearModel()
        den = dpm.denoiser(c, torch.zeros_like(c), 3.0, timesteps=TimestepLookup(dpm.sigmas, dpm._grid_timesteps))
        den.model.model = model
        x = solvers.sample_dpmpp_2m(den, to_sigma_space(x_T, dpm.sigmas[0]), dpm.sigmas,
                                    lower_order_final=lower_order_final)
        return from_sigma_space(x, dpm.sigmas[-1]), model.ts

    mine, ts = by_hand(True)
    assert torch.equal(out, mine)
    assert ts[0][0].item() == 999.0 and ts[-1][0].item() == pytest.approx(99.9, abs=1e-4)
    assert not torch.equal(by_hand(False)[0], out)  # the reference's first-order last step matters


def test_ddim_is_euler_in_sigma_space():
    sampler = DDIMSampler(LinearModel())
    assert sampler._plan(10, 0.0, 1.0).solver is solvers.sample_euler
    plan = sampler._plan(10, 0.5, 1.0)
    assert plan.solver is solvers.sample_euler_ancestral and plan.options == {"eta": 0.5, "s_noise": 1.0}
    # DDIM's sigma_t(eta), divided by sqrt(a_prev), is the ancestral split of the same step
    ac = _alphas_cumprod().double()
    a_t, a_prev, eta = ac[501], ac[401], 0.5
    sigma_ddim = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    s_from, s_to = ((1 - a_t) / a_t).sqrt(), ((1 - a_prev) / a_prev).sqrt()
    down, up = solvers.get_ancestral_step(s_from, s_to, eta)
    assert up.item() == pytest.approx((sigma_ddim / a_prev.sqrt()).item(), rel=1e-12)
    assert (down ** 2 + up ** 2).item() == pytest.approx((s_to ** 2).item(), rel=1e-12)
    # one Euler step in sigma space is one DDIM step: sqrt(a_prev)·pred_x0 + sqrt(1-a_prev)·eps
    x_t, eps = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    pred_x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x = to_sigma_space(x_t, s_from)
    x_next = solvers.sample_euler(lambda x, s: x - s.view(-1) * eps, x.view(1, 1), torch.stack([s_from, s_to]))
    assert from_sigma_space(x_next, s_to).item() == pytest.approx(
        (a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps).item(), rel=1e-12)


def test_plms_first_step_is_heun_and_calls_the_grid_timesteps():
    model = LinearModel()
    sampler = make_sampler("plms", model)
    assert sampler._plan(10, None, 1.0).solver is solvers.sample_plms
    _run(sampler, torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(4)))
    assert [t[0].item() for t in model.ts] == [901, 801] + list(range(801, 0, -100))
    assert all(t.dtype == torch.long for t in model.ts)


def test_plms_warm_up_as_the_last_step_calls_the_model_at_the_current_timestep_as_the_reference():
    """1 step (or img2img's last step alone): the reference's max(index - 1, 0) clamp evaluates the
    provisional state at the same timestep; 2 steps: the second call is at the next timestep."""
    model = LinearModel()
    make_sampler("plms", model).sample(1, 1, (4, 2, 2), x_T=torch.ones(1, 4, 2, 2), verbose=False)
    assert [t.item() for t in model.ts] == [1, 1]
    model.ts.clear()
    make_sampler("plms", model).sample(2, 1, (4, 2, 2), x_T=torch.ones(1, 4, 2, 2), verbose=False)
    assert [t.item() for t in model.ts] == [501, 1, 1]
