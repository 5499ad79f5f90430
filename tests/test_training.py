"""Training path: the Lightning wrappers, main.py, checkpoints in the official layout, the
autoencoder loss (the bundled demo model: tests/test_demo_model.py). Toy sizes (16x16 images), a few seconds each."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pl = pytest.importorskip("pytorch_lightning")

from ldm.checkpoint import load_model_from_config, read_checkpoint  # noqa: E402
from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.errors import UserInputError  # noqa: E402
from ldm.modules.losses.autoencoder import ReconstructionKLLoss  # noqa: E402
from ldm.training import (AutoencoderTrainer, DataModuleFromConfig, DiffusionTrainer, images_to_nchw,  # noqa: E402
                          instantiate_model, wrap_model)
from ldm.training.run import learning_rate, resolve_paths, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "monitor": "val/rec_loss",
        "lossconfig": {"target": "ldm.modules.losses.autoencoder.ReconstructionKLLoss",
                       "params": {"kl_weight": 1.0e-6}},
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
                     "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    },
}

LDM = {
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "first_stage_key": "image",
        "cond_stage_key": "caption", "image_size": 8, "channels": 4, "cond_stage_trainable": True,
        "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema", "scale_factor": 0.5, "use_ema": True,
        "ucg_training": {"caption": {"p": 0.1, "val": ""}},
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                                   "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1],
                                   "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
                                   "context_dim": 16, "legacy": False}},
        "first_stage_config": {**copy.deepcopy(VAE), "params": {**copy.deepcopy(VAE["params"]),
                                                                "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"freeze": False,
                                         "text_config": {"hidden_size": 16, "intermediate_size": 32,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "projection_dim": 16}}},
    },
}


def data_config(length: int = 8, batch_size: int = 4, validation: bool = True) -> dict:
    params = {"batch_size": batch_size, "num_workers": 0,
              "train": {"target": "ldm.data.shapes.ShapesDataset",
                        "params": {"split": "train", "size": 16, "length": length, "seed": 0}}}
    if validation:
        params["validation"] = {"target": "ldm.data.shapes.ShapesDataset",
                                "params": {"split": "train", "size": 16, "length": 4, "seed": 1}}
    return {"target": "ldm.training.DataModuleFromConfig", "params": params}


def run_config(model: dict, steps: int = 2, base_lr: float = 1e-4, **model_params) -> dict:
    model = copy.deepcopy(model)
    model["params"].update(model_params)
    return {"model": {"base_learning_rate": base_lr, **model}, "data": data_config(),
            "lightning": {"trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps,
                                      "num_sanity_val_steps": 0, "val_check_interval": steps,
                                      "check_val_every_n_epoch": None, "enable_progress_bar": False,
                                      "enable_model_summary": False, "log_every_n_steps": 1}}}


def fixed_batch(n: int = 4) -> dict:
    ds = ShapesDataset("train", size=16, length=n, seed=5)
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
            "caption": [it["caption"] for it in items]}


def fit_on(module: pl.LightningModule, batch: dict, steps: int) -> pl.Trainer:
    """Fit ``module`` for ``steps`` optimiser steps on the same batch."""
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- pieces
def test_images_to_nchw():
    x = torch.arange(2 * 5 * 6 * 3, dtype=torch.float32).reshape(2, 5, 6, 3)
    y = images_to_nchw(x)
    assert y.shape == (2, 3, 5, 6) and y.is_contiguous()
    assert torch.equal(y[1, 2], x[1, :, :, 2])
    with pytest.raises(UserInputError):
        images_to_nchw(torch.zeros(2, 3))


def test_reconstruction_kl_loss_values():
    torch.manual_seed(0)
    x, xr = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

    post = DiagonalGaussianDistribution(torch.randn(2, 8, 2, 2))
    loss, logs = ReconstructionKLLoss(kl_weight=0.5, l1_weight=1.0, l2_weight=2.0)(x, xr, post, split="val")
    expected = ((x - xr).abs() + 2 * (x - xr) ** 2).sum() / 2 + 0.5 * post.kl().sum() / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["val/rec_loss"], (x - xr).abs().mean())
    assert list(ReconstructionKLLoss().parameters()) == []  # no loss.* keys in checkpoints
    with pytest.raises(UserInputError):
        ReconstructionKLLoss(kl_weight=-1)
    with pytest.raises(UserInputError):
        ReconstructionKLLoss(l1_weight=0, l2_weight=0)


def test_learning_rate_scaling_matches_reference_rule():
    assert learning_rate(1e-4, 16, 2, 1, scale_lr=True) == pytest.approx(2 * 16 * 1e-4)
    assert learning_rate(1e-4, 16, 2, 1, scale_lr=False) == 1e-4


def test_wrap_model_dispatch():
    vae = instantiate_model(VAE)
    assert isinstance(wrap_model(vae, 1e-3), AutoencoderTrainer)
    ldm = instantiate_model(LDM)
    assert isinstance(wrap_model(ldm, 1e-3), DiffusionTrainer)
    with pytest.raises(UserInputError):
        wrap_model(torch.nn.Linear(2, 2), 1e-3)


def test_frozen_text_encoder_with_cond_stage_trainable_is_rejected():
    cfg = copy.deepcopy(LDM)
    cfg["params"]["cond_stage_config"]["params"]["freeze"] = True
    with pytest.raises(UserInputError, match="freeze: false"):
        DiffusionTrainer(instantiate_model(cfg))


def test_caption_dropout():
    trainer = DiffusionTrainer(instantiate_model(LDM))
    batch = {"caption": ["a"] * 1000, "image": None}
    g = torch.Generator().manual_seed(0)
    dropped = trainer.drop_conditions(batch, generator=g)["caption"]
    assert batch["caption"] == ["a"] * 1000  # the input is not changed
    assert 60 < dropped.count("") < 140  # p = 0.1
    trainer.model.ucg_training = {"caption": {"p": 1.0, "val": None}}
    assert set(trainer.drop_conditions(batch)["caption"]) == {""}


# ----------------------------------------------------------------------------- steps
def test_autoencoder_trainer_lowers_loss():
    torch.manual_seed(0)
    module = AutoencoderTrainer(instantiate_model(VAE), learning_rate=2e-3)
    batch = fixed_batch()
    x = images_to_nchw(batch["image"])

    def rec_loss():
        with torch.no_grad():
            rec, post = module.model(x, sample_posterior=False)
            return module.model.loss(x, rec, post)[0].item()

    before = rec_loss()
    fit_on(module, batch, steps=6)
    assert rec_loss() < 0.9 * before


def test_diffusion_trainer_lowers_loss_and_updates_ema():
    torch.manual_seed(0)
    model = instantiate_model(LDM)
    model.ucg_training = {}
    module = DiffusionTrainer(model, learning_rate=2e-3)
    batch = fixed_batch()
    shadow0 = {k: v.clone() for k, v in model.model_ema.named_buffers() if k not in ("decay", "num_updates")}
    text0 = model.cond_stage_model.transformer.text_model.final_layer_norm.weight.detach().clone()

    def loss():
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            x, raw = module.get_input(batch)
            return module._losses(x, raw, g)[0].item()

    before = loss()
    fit_on(module, batch, steps=8)
    assert loss() < before
    assert int(model.model_ema.num_updates) == 8
    moved = [k for k, v in model.model_ema.named_buffers() if k in shadow0 and not torch.equal(v, shadow0[k])]
    assert len(moved) == len(shadow0)
    # the text encoder is trained too (cond_stage_trainable)
    assert not torch.equal(model.cond_stage_model.transformer.text_model.final_layer_norm.weight, text0)


def test_offset_noise():
    """offset_noise_level adds one normal draw per sample and channel, the same at every position, to
    the standard training noise; 0 (the default) leaves the noise and its random stream untouched."""
    torch.manual_seed(0)
    plain = instantiate_model(run_config(LDM)["model"])
    offset = instantiate_model(run_config(LDM, offset_noise_level=0.5)["model"])
    x = torch.zeros(2048, 4, 8, 8)
    torch.manual_seed(1)
    base = torch.randn_like(x)
    torch.manual_seed(1)
    assert torch.equal(plain.training_noise(x), base)
    torch.manual_seed(1)
    noise = offset.training_noise(x)
    shift = noise - base
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # constant over positions
    # per-channel means over the 64 positions: variance 1/64 without offset, 1/64 + 0.25 with it
    assert abs(base.mean((2, 3)).var().item() - 1 / 64) < 0.003
    assert abs(noise.mean((2, 3)).var().item() - (1 / 64 + 0.25)) < 0.03
    with pytest.raises(ValueError, match="offset_noise_level"):
        instantiate_model(run_config(LDM, offset_noise_level=-0.1)["model"])


def test_ema_update_rule():
    model = instantiate_model(LDM)
    module = DiffusionTrainer(model)
    name, param = next(iter(model.model.named_parameters()))
    shadow_name = model.model_ema.m_name2s_name[name]
    before = getattr(model.model_ema, shadow_name).clone()
    with torch.no_grad():
        param.add_(1.0)
    module.on_train_batch_end(None, None, 0)
    decay = min(0.9999, (1 + 1) / (10 + 1))  # warm-up of the first update
    expected = before - (1 - decay) * (before - param.detach())
    torch.testing.assert_close(getattr(model.model_ema, shadow_name), expected)
    model.use_ema = False
    module.on_train_batch_end(None, None, 0)
    assert int(model.model_ema.num_updates) == 1


def test_lr_schedule_from_config_is_applied():
    schedule = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [0.1], "f_max": [1.0],
                           "f_min": [1.0]}}
    cfg = copy.deepcopy(LDM)
    cfg["params"]["scheduler_config"] = schedule
    module = DiffusionTrainer(instantiate_model(cfg), learning_rate=1e-3)
    trainer = fit_on(module, fixed_batch(), steps=3)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    # after 3 steps LambdaLR is at step 3 of the warm-up line 0.1 -> 1 over 10 steps
    assert lr == pytest.approx(1e-3 * (0.1 + (1.0 - 0.1) * 3 / 10))
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_scale_by_std_sets_scale_factor_from_first_batch():
    cfg = copy.deepcopy(LDM)
    cfg["params"].update(scale_by_std=True, scale_factor=1.0)
    model = instantiate_model(cfg)
    module = DiffusionTrainer(model)
    batch = fixed_batch()
    torch.manual_seed(3)
    module.on_train_batch_start(batch, 0)
    torch.manual_seed(3)
    z = model.encode_first_stage(images_to_nchw(batch["image"])).sample()
    assert float(model.scale_factor) == pytest.approx(1 / float(z.flatten().std()), rel=1e-5)


# ----------------------------------------------------------------------------- runs and checkpoints
def test_runs_write_official_layout_and_load(tmp_path):
    """VAE run, then LDM run on it (first stage via ckpt_path), then resume; every file loads
    with ldm.checkpoint."""
    now = "2000-01-01T00-00-00"
    vae_cfg = OmegaConf.create(run_config(VAE, steps=2))
    vae_paths = resolve_paths(now, ["demo-vae.yaml"], logdir=str(tmp_path))
    train(vae_cfg, vae_paths, now)
    assert vae_paths.logdir == tmp_path / f"{now}_demo-vae"
    assert sorted(p.name for p in vae_paths.cfgdir.iterdir()) == [f"{now}-lightning.yaml", f"{now}-project.yaml"]
    vae_ckpt = read_checkpoint(vae_paths.ckptdir / "last.ckpt")
    assert vae_ckpt.global_step == 2
    assert {k.split(".")[0] for k in vae_ckpt.state_dict} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}

    ldm_cfg = run_config(LDM, steps=2)
    ldm_cfg["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = str(vae_paths.ckptdir / "last.ckpt")
    ldm_paths = resolve_paths(now, ["x.yaml"], name="ldm", logdir=str(tmp_path))
    train(OmegaConf.create(ldm_cfg), ldm_paths, now)
    ckpt = read_checkpoint(ldm_paths.ckptdir / "last.ckpt")
    sd = ckpt.state_dict
    assert ckpt.global_step == 2
    groups = {k.split(".")[0] for k in sd} - {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                                             "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                                             "posterior_variance", "posterior_log_variance_clipped",
                                             "posterior_mean_coef1", "posterior_mean_coef2"}
    assert groups == {"model", "first_stage_model", "cond_stage_model", "model_ema"}
    assert all(k.startswith("model.diffusion_model.") for k in sd if k.startswith("model."))
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)
    # the frozen first stage is the VAE run's, unchanged
    for k, v in vae_ckpt.state_dict.items():
        assert torch.equal(sd["first_stage_model." + k], v)

    saved_cfg = OmegaConf.load(next(ldm_paths.cfgdir.glob("*-project.yaml")))
    model = load_model_from_config(saved_cfg, ldm_paths.ckptdir / "last.ckpt")
    torch.testing.assert_close(model.model.diffusion_model.out[2].weight, sd["model.diffusion_model.out.2.weight"])
    no_ema_cfg = copy.deepcopy(saved_cfg)
    no_ema_cfg.model.params.use_ema = False  # run the EMA weights (copied into the UNet)
    ema = load_model_from_config(no_ema_cfg, ldm_paths.ckptdir / "last.ckpt", use_ema=True)
    torch.testing.assert_close(ema.model.diffusion_model.out[2].weight, sd["model_ema.diffusion_modelout2weight"])
    assert not torch.equal(ema.model.diffusion_model.out[2].weight, model.model.diffusion_model.out[2].weight)

    # resume: continues from step 2 to 4 in the same directory
    resumed = resolve_paths("2000-01-01T00-00-01", [], resume=str(ldm_paths.logdir))
    config = OmegaConf.merge(*[OmegaConf.load(p) for p in resumed.base_configs],
                             OmegaConf.from_dotlist(["lightning.trainer.max_steps=4"]))
    trainer, _ = train(config, resumed, "2000-01-01T00-00-01")
    assert trainer.global_step == 4
    assert read_checkpoint(ldm_paths.ckptdir / "last.ckpt").global_step == 4


def test_main_py_trains_from_config(tmp_path):
    cfg = run_config(VAE, steps=2)
    path = tmp_path / "tiny-vae.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "main.py", "--base", str(path), "-t", "--logdir", str(tmp_path / "logs"),
                           "--seed", "1", "lightning.trainer.max_steps=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.endswith("_tiny-vae")
    assert read_checkpoint(run / "checkpoints" / "last.ckpt").global_step == 1
    saved = OmegaConf.load(next((run / "configs").glob("*-lightning.yaml")))
    assert saved.lightning.trainer.max_steps == 1


def test_main_py_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--base", str(tmp_path / "missing.yaml"), "-t"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = subprocess.run([sys.executable, "main.py", "-n", "a", "-r", "b", "-t"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot be given together" in proc.stderr


def test_data_module_only_defines_configured_loaders():
    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train=data_config()["params"]["train"])
    from lightning_utilities.core.overrides import is_overridden

    assert is_overridden("train_dataloader", dm, pl.LightningDataModule)
    assert not is_overridden("val_dataloader", dm, pl.LightningDataModule)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 16, 16, 3) and len(batch["caption"]) == 2
    with pytest.raises(UserInputError):
        DataModuleFromConfig(batch_size=0, train=data_config()["params"]["train"])


def test_export_bakes_ema_and_keeps_schedule_float32(tmp_path):
    from ldm.checkpoint import save_checkpoint
    from ldm.training.export import export

    cfg = copy.deepcopy(LDM)
    cfg["params"].update(scale_by_std=True, scale_factor=1.0)
    model = instantiate_model(cfg)
    model.scale_factor.fill_(0.25)
    with torch.no_grad():
        for name, buf in model.model_ema.named_buffers():
            if name not in ("decay", "num_updates"):
                buf.add_(1.0)  # shadows differ from the training weights
    ckpt = save_checkpoint(model, tmp_path / "train.ckpt", global_step=7)
    train_cfg = tmp_path / "project.yaml"
    cfg["params"]["first_stage_config"]["params"]["ckpt_path"] = "somewhere/vae.ckpt"
    OmegaConf.save(OmegaConf.create({"model": {"base_learning_rate": 1e-4, **cfg}}), train_cfg)
    inference = export(str(ckpt), str(train_cfg), str(tmp_path / "out.safetensors"), str(tmp_path / "out.yaml"),
                       half=True, extra_sections={"demo": {"safety_checker": False}})
    params = inference["model"]["params"]
    assert params["scale_factor"] == 0.25 and params["use_ema"] is False
    assert "scale_by_std" not in params and "ucg_training" not in params
    assert "ckpt_path" not in params["first_stage_config"]["params"]
    assert "freeze" not in params["cond_stage_config"]["params"]
    sd = read_checkpoint(tmp_path / "out.safetensors").state_dict
    assert not any(k.startswith("model_ema.") for k in sd) and "scale_factor" not in sd
    assert sd["alphas_cumprod"].dtype == torch.float32
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    expected = model.model_ema.diffusion_modelout2weight.half()
    assert torch.equal(sd["model.diffusion_model.out.2.weight"], expected)
    loaded = load_model_from_config(OmegaConf.load(tmp_path / "out.yaml"), tmp_path / "out.safetensors")
    assert loaded.model.diffusion_model.out[2].weight.dtype == torch.float32
    assert OmegaConf.load(tmp_path / "out.yaml").demo.safety_checker is False


def test_train_demo_script_end_to_end(tmp_path):
    """The documented one-command recipe (scripts/train_demo.sh) with a few steps per stage: both
    autoencoder phases, both diffusion phases (the second with offset noise) on that autoencoder, the
    export; the file loads with the project's loader and draws images. Then VAE_RUN reuses the
    autoencoder, and bad input is refused."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", LOGDIR=str(tmp_path / "logs"),
               VAE_STEPS="2", VAE_STEPS_64="1", LDM_STEPS="3", OFFSET_STEPS="1", OUT=str(tmp_path / "demo.safetensors"),
               OUT_CONFIG=str(tmp_path / "demo.yaml"))
    script = str(REPO / "scripts" / "train_demo.sh")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (vae_run,) = (tmp_path / "logs").glob("*_demo-vae")
    assert read_checkpoint(vae_run / "checkpoints" / "last.ckpt").global_step == 3  # 2 at 32x32 + 1 at 64x64
    (ldm_run,) = (tmp_path / "logs").glob("*_demo-ldm")
    assert read_checkpoint(ldm_run / "checkpoints" / "last.ckpt").global_step == 3  # 2 plain + 1 offset
    first, resumed = sorted((ldm_run / "configs").glob("*-project.yaml"))
    assert "offset_noise_level" not in OmegaConf.load(first).model.params
    assert OmegaConf.load(resumed).model.params.offset_noise_level == 0.1
    config = OmegaConf.load(tmp_path / "demo.yaml")
    assert "offset_noise_level" not in config.model.params  # training-only: export drops it
    assert config.demo.safety_checker is False and (config.demo.height, config.demo.width) == (64, 64)
    model = load_model_from_config(config, tmp_path / "demo.safetensors")
    from ldm.training.evaluate import generate

    images = generate(model, ["a red circle on a blue background"], steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype.name == "uint8"

    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites the weights
    bad = subprocess.run(["bash", script], env=dict(env, OUT=str(tmp_path / "b.safetensors"),
                                                     VAE_RUN=str(tmp_path / "nowhere")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "VAE_RUN" in bad.stderr
    for offset_steps in ("3", "-1"):  # the whole diffusion stage, or fewer than none
        bad = subprocess.run(["bash", script], env=dict(env, OUT=str(tmp_path / "b.safetensors"),
                                                         OFFSET_STEPS=offset_steps),
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "OFFSET_STEPS" in bad.stderr
    reuse = subprocess.run(["bash", script], env=dict(env, OUT=str(tmp_path / "c.safetensors"),
                                                       OUT_CONFIG=str(tmp_path / "c.yaml"), VAE_RUN=str(vae_run)),
                           capture_output=True, text=True, timeout=600)
    assert reuse.returncode == 0, reuse.stderr[-3000:]
    assert len(list((tmp_path / "logs").glob("*_demo-vae"))) == 1  # no second autoencoder run
    assert (tmp_path / "c.safetensors").is_file()
