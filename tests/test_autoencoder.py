"""First-stage autoencoders: reference parity on the tiny model, checkpoint layouts, agreement with
diffusers at full SD v1 size, posterior sampling, VQ quantisation, tiled decoding."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModelInterface, tiled_map
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer2
from ldm.util import instantiate_from_config
from tests.helpers import REPO, TINY_CONFIG, read_manifest

PREFIX = "first_stage_model."
SD_V1_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
INPAINT_BIG_CONFIG = REPO / "models" / "ldm" / "inpainting_big" / "config.yaml"


def first_stage_config(path):
    return OmegaConf.to_container(OmegaConf.load(path).model.params.first_stage_config, resolve=True)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def manifest(spec_dir, name: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key without prefix, shape) rows of a spec TSV whose key starts with ``prefix``, in file order."""
    return [(k[len(prefix):], shape) for k, shape in read_manifest(spec_dir / name) if k.startswith(prefix)]


@pytest.fixture(scope="module")
def tiny_vae(tiny_ckpt) -> AutoencoderKL:
    """The tiny model's AutoencoderKL (ch 32) with the fixture's ``first_stage_model.*`` weights."""
    model = instantiate_from_config(first_stage_config(TINY_CONFIG)).eval()
    sd = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    model.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}, strict=True)
    return model


# -- reference parity ------------------------------------------------------------------------------


def test_tiny_vae_matches_reference(tiny_vae, parity):
    ref = parity["vae"]
    captured: dict[str, torch.Tensor] = {}
    modules = dict(tiny_vae.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        for name in ref["blocks"]
    ]
    try:
        with torch.no_grad():
            posterior = tiny_vae.encode(ref["x"])
            decoded = tiny_vae.decode(ref["z_scaled"] / ref["scale_factor"])
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        decoded_rand = tiny_vae.decode(ref["z_rand_scaled"] / ref["scale_factor"])

    ours = {
        "moments": posterior.parameters,
        "mean": posterior.mean,
        "logvar_clamped": posterior.logvar,
        "std": posterior.std,
        "mode": posterior.mode(),
        "decoded": decoded,
        "decoded_rand": decoded_rand,
        **{f"blocks/{k}": v for k, v in captured.items()},
    }
    expected = {k: ref[k] for k in ("moments", "mean", "logvar_clamped", "std", "mode", "decoded", "decoded_rand")}
    expected.update({f"blocks/{k}": v for k, v in ref["blocks"].items()})
    assert ours.keys() == expected.keys()
    errors = {k: max_rel(ours[k], expected[k]) for k in expected}
    for k in expected:
        assert ours[k].shape == expected[k].shape, k
    # Measured: max 1.6e-6 (decoded); encoder outputs <= 3.6e-7.
    assert max(errors.values()) < 1e-5, errors


# -- checkpoint layouts (meta device) --------------------------------------------------------------


def test_sd_v1_first_stage_keys_and_shapes(spec_dir):
    with torch.device("meta"):
        model = instantiate_from_config(first_stage_config(SD_V1_CONFIG))
    assert isinstance(model, AutoencoderKL)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == manifest(spec_dir, "sd-v1.tsv", PREFIX)
    assert len(ours) == 248


def test_ldm_inpainting_vq_keys_and_shapes(spec_dir):
    with torch.device("meta"):
        model = instantiate_from_config(first_stage_config(INPAINT_BIG_CONFIG))
    assert isinstance(model, VQModelInterface)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == manifest(spec_dir, "ldm-inpainting-big.tsv", PREFIX)
    assert len(ours) == 185


@pytest.mark.parametrize("target", ["torch.nn.Identity", "ldm.modules.losses.contperceptual.DummyLoss"])
def test_loss_targets_resolve_and_are_deferred(target):
    cfg = first_stage_config(TINY_CONFIG)
    cfg["params"]["lossconfig"] = {"target": target}
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    assert not hasattr(model, "loss")  # inference never builds the loss
    loss = model.init_loss()
    assert model.loss is loss and not list(loss.parameters())


# -- full SD v1 size against diffusers -------------------------------------------------------------


def _fill_deterministic(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights like the spec fixture: per-parameter generator, norms ~1, convs ~1/sqrt(fan_in)."""
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm) for p in ("weight", "bias")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % 2**63)
            r = torch.randn(p.shape, generator=g)
            if name in norm_params:
                r = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
            elif p.ndim >= 2:
                r = r / math.sqrt(p[0].numel())
            else:
                r = 0.1 * r
            p.copy_(r)


def test_full_size_matches_diffusers():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    with torch.device("meta"):
        ours = instantiate_from_config(first_stage_config(SD_V1_CONFIG))
    ours = ours.to_empty(device="cpu").eval()
    _fill_deterministic(ours)
    ckpt = {PREFIX + k: v for k, v in ours.state_dict().items()}

    original_config = OmegaConf.to_container(OmegaConf.load(SD_V1_CONFIG), resolve=True)
    config = create_vae_diffusers_config_from_ldm(original_config, ckpt)
    with torch.device("meta"):
        theirs = DiffusersAutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(ckpt, config)
    theirs.load_state_dict(converted, strict=True, assign=True)
    theirs.eval()

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean_ours, mean_theirs = ours.encode(x).mean, theirs.encode(x).latent_dist.mean
        dec_ours, dec_theirs = ours.decode(z), theirs.decode(z).sample
    assert mean_ours.shape == (1, 4, 4, 4) and dec_ours.shape == (1, 3, 32, 32)
    # Measured: 9.5e-7 (mean) and 1.1e-6 (decode) relative.
    assert max_rel(mean_ours, mean_theirs) < 1e-4
    assert max_rel(dec_ours, dec_theirs) < 1e-4


# -- posterior -------------------------------------------------------------------------------------


def test_posterior_sample_is_seeded_cpu_noise():
    params = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussianDistribution(params)
    a = posterior.sample(torch.Generator().manual_seed(42))
    b = posterior.sample(torch.Generator().manual_seed(42))
    expected = posterior.mean + posterior.std * torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, b)
    assert torch.equal(a, expected)
    # One generator per batch element: element i depends only on its own generator.
    per_item = posterior.sample([torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    first = DiagonalGaussianDistribution(params[:1]).sample([torch.Generator().manual_seed(7)])
    assert torch.equal(per_item[:1], first)
    # Clamp, std and deterministic mode.
    extreme = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], dim=1))
    assert extreme.logvar.item() == 20.0 and math.isclose(extreme.std.item(), math.exp(10.0), rel_tol=1e-6)
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(torch.Generator().manual_seed(0)), det.mean)
    assert torch.equal(det.kl(), torch.zeros(2))


def test_posterior_kl_and_nll_closed_forms():
    params = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(3))
    post = DiagonalGaussianDistribution(params)
    kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), kl)
    x = torch.zeros_like(post.mean)
    nll = -torch.distributions.Normal(post.mean, post.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.nll(x), nll)


# -- vector quantisation ---------------------------------------------------------------------------


def test_vq_picks_nearest_codebook_entry():
    vq = VectorQuantizer2(n_e=64, e_dim=3, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)))
    z = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    z_q, loss, (_, _, idx) = vq(z)

    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)  # (B*h*w, e_dim), rows in (b, h, w) order
    brute = torch.cdist(flat, vq.embedding.weight).argmin(dim=1)
    assert torch.equal(idx, brute)
    codes = vq.embedding.weight[brute].reshape(2, 5, 7, 3).permute(0, 3, 1, 2)
    assert torch.equal(vq.get_codebook_entry(idx, (2, 5, 7, 3)), codes)
    # z_q is the straight-through z + (codes - z).detach(): equal to the codes up to rounding.
    torch.testing.assert_close(z_q, codes, rtol=0, atol=1e-6)
    assert torch.isclose(loss, 1.25 * ((z_q - z) ** 2).mean())


def test_vq_interface_quantises_in_decode():
    cfg = first_stage_config(INPAINT_BIG_CONFIG)
    cfg["params"]["ddconfig"]["ch"] = 32
    cfg["params"]["n_embed"] = 16
    torch.manual_seed(0)
    model = instantiate_from_config(cfg).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        assert h.shape == (1, 3, 4, 4)
        quant = model.quantize(h)[0]
        torch.testing.assert_close(model.decode(h), model.decode(quant, force_not_quantize=True), rtol=0, atol=0)
        assert not torch.equal(model.decode(h), model.decode(h, force_not_quantize=True))


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    assert IdentityFirstStage().decode(IdentityFirstStage().encode(x)) is x
    assert IdentityFirstStage(vq_interface=True).quantize(x)[0] is x


# -- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 0.05), (torch.bfloat16, 0.25)])
def test_low_precision_runs(tiny_vae, dtype, bound):
    import copy

    model = copy.deepcopy(tiny_vae).to(dtype)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = tiny_vae.decode(tiny_vae.encode(x).mode())
        z = model.encode(x.to(dtype)).sample(torch.Generator().manual_seed(0))
        out = model.decode(model.encode(x.to(dtype)).mode())
    assert z.dtype == dtype and out.dtype == dtype
    assert max_rel(out.float(), expected) < bound  # measured 8.7e-3 (fp16), 8.4e-2 (bf16)


# -- tiling ----------------------------------------------------------------------------------------


def test_tiled_map_blends_local_maps_exactly():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 24, 40, generator=g)
    up = tiled_map(lambda t: 2 * F.interpolate(t, scale_factor=8), z, tile=16, overlap=8, in_per_unit=1, out_per_unit=8)
    torch.testing.assert_close(up, 2 * F.interpolate(z, scale_factor=8), rtol=0, atol=1e-5)
    x = torch.randn(2, 3, 100, 60, generator=g)  # 25 x 15 units: last tiles shifted back to the border
    down = tiled_map(lambda t: F.avg_pool2d(t, 4), x, tile=8, overlap=3, in_per_unit=4, out_per_unit=1)
    torch.testing.assert_close(down, F.avg_pool2d(x, 4), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        tiled_map(lambda t: t, z, tile=8, overlap=8, in_per_unit=1, out_per_unit=1)


def test_tiled_decode_and_encode(tiny_vae):
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(1, 3, 12, 20, generator=g) * 2 - 1, size=(192, 320), mode="bilinear")
    with torch.no_grad():
        posterior = tiny_vae.encode(x)
        z = posterior.mode()  # (1, 4, 24, 40)
        full = tiny_vae.decode(z)
        assert torch.equal(tiny_vae.decode_tiled(z, tile_latent=40, overlap=8), full)  # one tile: exact
        dec_err = [(tiny_vae.decode_tiled(z, t, o) - full).abs() for t, o in [(8, 4), (16, 8), (32, 16)]]
        enc_err = [(tiny_vae.encode_tiled(x, t, o).parameters - posterior.parameters).abs() for t, o in [(16, 8), (32, 16)]]
    # Not exact: a tile sees neither the GroupNorm statistics nor the attention context nor the
    # conv neighbourhood beyond its border. The random-weight tiny VAE has a wide effective
    # receptive field, so the error is large for small tiles and shrinks as they grow. Measured
    # mean |diff| (max |diff|), with |decoded| up to 4.9 and |moments| up to 2.5:
    #   decode 8/4: 0.31 (2.96), 16/8: 0.12 (1.47), 32/16: 0.033 (0.50)
    #   encode 16/8: 0.135 (1.22), 32/16: 0.044 (0.71)
    # test_tiled_map_blends_local_maps_exactly checks that tiling and blending are exact.
    dec_mean = [e.mean().item() for e in dec_err]
    enc_mean = [e.mean().item() for e in enc_err]
    assert dec_mean[0] > dec_mean[1] > dec_mean[2], dec_mean
    assert enc_mean[0] > enc_mean[1], enc_mean
    assert dec_mean[2] < 0.015 * full.abs().max()
    assert enc_mean[1] < 0.03 * posterior.parameters.abs().max()


# -- ckpt_path -------------------------------------------------------------------------------------


def test_ckpt_path_loads_strictly_through_project_loader(tiny_vae, tmp_path):
    from ldm.checkpoint import CheckpointError

    sd = dict(tiny_vae.state_dict())
    sd["loss.logvar"] = torch.zeros(())  # released autoencoder files carry their training loss
    torch.save({"state_dict": sd}, tmp_path / "vae.ckpt")
    cfg = first_stage_config(TINY_CONFIG)
    cfg["params"]["ckpt_path"] = str(tmp_path / "vae.ckpt")
    with torch.device("meta"):
        loaded = instantiate_from_config(cfg)
    for k, v in tiny_vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    del sd["decoder.conv_out.bias"]
    torch.save({"state_dict": sd}, tmp_path / "broken.ckpt")
    cfg["params"]["ckpt_path"] = str(tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        instantiate_from_config(cfg)
