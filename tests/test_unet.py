"""The UNet and the noise schedule reproduce the reference's recorded numbers (tiny model, fp32)."""
import pytest
import torch

from ldm.checkpoint import instantiate_on_meta, load_model_from_config
from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding
from tests.helpers import load_config, rel_err, unet_block_outputs


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_model_from_config(load_config(), tiny_ckpt)


def test_schedule_buffers_equal_reference(parity):
    cfg = load_config()
    model = instantiate_on_meta(cfg.model)
    for name, ref in parity["schedule"].items():
        ours = getattr(model, name)
        assert ours.device.type == "cpu" and ours.dtype == torch.float32
        assert torch.equal(ours, ref), name


def test_linear_schedule_is_quadratic_in_beta():
    # The reference calls it "linear"; it is linear in sqrt(beta) ("scaled_linear" in diffusers).
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.0120)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1] == pytest.approx(0.0120, rel=1e-12)
    assert betas[500] == pytest.approx(((0.00085 ** 0.5 + 0.0120 ** 0.5) / 2) ** 2, rel=1e-2)
    alphas_cumprod = torch.tensor(1 - betas).cumprod(0)
    assert alphas_cumprod[-1].item() == pytest.approx(0.004660098513, rel=1e-9)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("quadratic", 10)


def test_timestep_embedding_cos_first():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert torch.equal(emb[0], torch.tensor([1., 1, 1, 1, 0, 0, 0, 0]))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(10.)).item(), abs=1e-6)


def test_unet_eps_matches_reference(tiny_model, parity):
    ref = parity["unet"]
    with torch.no_grad():
        eps = tiny_model.apply_model(ref["x"], ref["t"], ref["context"])
        eps_float = tiny_model.apply_model(ref["x"], ref["t_float"], ref["context"])
        eps_uncond = tiny_model.apply_model(ref["x"], ref["t"], ref["context_uncond"])
    assert rel_err(eps, ref["eps"]) < 1e-5
    assert rel_err(eps_float, ref["eps_float_t"]) < 1e-5
    assert rel_err(eps_uncond, ref["eps_uncond"]) < 1e-5
    # fractional timesteps really change the output (they are not rounded)
    assert rel_err(eps_float, eps) > 1e-4


def test_unet_blocks_match_reference(tiny_model, parity):
    ref = parity["unet"]
    got = unet_block_outputs(tiny_model.model.diffusion_model, ref["x"], ref["t"], ref["context"])
    assert set(ref["blocks"]) <= set(got)
    errors = {name: rel_err(got[name], value) for name, value in ref["blocks"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])


def test_unet_accepts_scalar_timestep(tiny_model, parity):
    ref = parity["unet"]
    x = ref["x"][:1]
    with torch.no_grad():
        a = tiny_model.apply_model(x, torch.tensor(ref["t"][0].item()), ref["context"][:1])
        b = tiny_model.apply_model(x, ref["t"][:1], ref["context"][:1])
    assert torch.equal(a, b)


def test_unet_bf16_close_to_fp32(tiny_ckpt, parity):
    ref = parity["unet"]
    model = load_model_from_config(load_config(), tiny_ckpt, dtype=torch.bfloat16)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32
    with torch.no_grad():
        eps = model.apply_model(ref["x"], ref["t"], ref["context"])
    assert eps.dtype == torch.float32  # output in the input's dtype
    assert rel_err(eps, ref["eps"]) < 3e-2
