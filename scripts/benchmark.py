"""Benchmark this toolkit against diffusers on the same Stable Diffusion v1 weights.

Builds the full SD v1 architecture (configs/stable-diffusion/v1-inference.yaml) with random weights
(nothing is downloaded), saves it once as an official-layout ``.safetensors`` checkpoint and, from
the same tensors converted by diffusers' own single-file functions, as a diffusers pipeline folder.
Then, in one run and alternating ours / diffusers (A B A B), it measures:

* load: seconds from process start to a ready model (UNet + VAE + CLIP + tokenizer, in the dtype),
  each in a fresh subprocess so imports count; that process's peak RSS when ready and after one
  2-step 256x256 sampling run (the real footprint: lazily mapped or prepacked weights included);
* text encoding (uncond + cond prompt) and seconds per DDIM step with classifier-free guidance
  (UNet batch 2*B) at each size and batch, with the peak memory a sampling run adds;
* VAE decode;
* on the CPU: PSNR of the bf16 image against the fp32 image (same start noise, 10 DDIM steps at
  256x256) and of diffusers' fp32 image against ours; peak RSS of a tiled VAE decode and the
  difference between tiled and untiled decode at 1024x1024;
* on CUDA: 50-step text-to-image end to end (it/s of the loop, seconds per batch).

Both sides run the same sampler settings (DDIM, eta 0, guidance 7.5, timesteps 1, 1+1000/S, ...),
the same dtype and the same thread count. Random weights make fp32 activations underflow into
denormal floats (CLIP's quick_gelu on large negative inputs), which x86 CPUs process about 100x
slower and trained weights rarely produce; so both sides run with flush-to-zero
(``torch.set_flush_denormal(True)``) unless ``--keep-denormals``. The table (medians, ratios
ours/diffusers) is printed and written into docs/benchmarks.md between the RESULTS markers.

    python scripts/benchmark.py                 # CPU, fp32 and bf16 (about 10 minutes on a quiet 2-core machine)
    python scripts/benchmark.py --quick         # 256x256 batch 1, one repeat, no load/PSNR/tiled tests
    python scripts/benchmark.py --device cuda   # fp16, 512x512 batch 1 and 4, 50-step end to end
    python scripts/benchmark.py --throughput    # batch runs: images/min with 1 and 2 processes (torchrun), demo model
    python scripts/benchmark.py --family sdxl   # SDXL base UNet step time against diffusers (--sizes, --dtypes)
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
TOKENIZER_DIR = REPO / "ldm" / "modules" / "encoders" / "clip-vit-large-patch14"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- BEGIN RESULTS (written by scripts/benchmark.py) -->", "<!-- END RESULTS -->"
WEIGHTS_VERSION = "sd-v1-random-seed0-v1"  # bump when the weight recipe changes
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

log = logging.getLogger("benchmark")


# ============================================================================ settings
@dataclass
class Settings:
    device: str
    dtypes: list[str]
    configs: list[tuple[int, int]]  # (size, batch)
    repeats: int
    steps: int  # DDIM steps per timed run; the first is not timed (warm-up)
    threads: int
    skip_load: bool
    psnr: bool
    vae_size: int  # side of the timed VAE decode
    tiled_vae: int  # output side of the tiled decode memory test; 0 = off
    e2e_steps: int  # CUDA end-to-end steps; 0 = off
    variants: list[str]  # extra variants of ours: "no prepack", "channels_last", "compiled"
    flush_denormal: bool
    clock: str  # "wall" or "cpu"
    cache_dir: Path
    write_doc: bool


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on cpu; fp16 on cuda)")
    p.add_argument("--configs", default=None,
                   help="comma list of SIZExBATCH (default: 512x1,256x1,256x4 on cpu; 512x1,512x4 on cuda)")
    p.add_argument("--sizes", default=None, help="comma list of image sides; with --batches replaces --configs")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (images per prompt batch)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side and setting (default 2 on cpu, 3 on cuda)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps per timed run, the first untimed; must divide 1000 (default 4 on cpu, 10 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's default)")
    p.add_argument("--skip-load", action="store_true", help="skip the load-time subprocesses")
    p.add_argument("--no-psnr", action="store_true", help="skip the bf16-vs-fp32 image check")
    p.add_argument("--vae-size", type=int, default=None, help="image side of the timed VAE decode (default 256 on cpu, 512 on cuda)")
    p.add_argument("--tiled-vae", type=int, default=None,
                   help="image side of the tiled VAE decode memory test, 0 = off (default 1024 on cpu, 2048 on cuda)")
    p.add_argument("--e2e-steps", type=int, default=None, help="CUDA end-to-end steps (default 50; 0 = off)")
    p.add_argument("--no-prepack", action="store_true", help="also time ours with the CPU conv weight prepacking off")
    p.add_argument("--channels-last", action="store_true", help="also time our UNet with channels_last weights")
    p.add_argument("--sdpa-attention", action="store_true",
                   help="also time ours with attention always in PyTorch's SDPA (ldm.ops.settings(attention='sdpa'))")
    p.add_argument("--compile", action="store_true",
                   help="also time our UNet under torch.compile with weight freezing (minutes of compiling per shape)")
    p.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats to zero (see above)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed seconds (default); cpu: this process's CPU seconds, steadier on a shared "
                        "machine (use with --threads 1)")
    p.add_argument("--quick", action="store_true", help="256x256 batch 1, 1 repeat, no load/PSNR/tiled tests")
    p.add_argument("--cache-dir", default=None, help="where the random checkpoints are kept (default ~/.cache/ldm-benchmark)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = p.parse_args(argv)

    device = a.device.strip().lower()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {a.device!r}")
    cuda = device.startswith("cuda")
    dtypes = [d.strip() for d in (a.dtypes or ("fp16" if cuda else "fp32,bf16")).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    if not cuda and "fp16" in dtypes:
        p.error("fp16 is not benchmarked on the CPU (ldm refuses it there); use fp32 or bf16")
    if a.quick:
        configs = [(256, 1)]
    elif a.sizes or a.batches:
        sizes = _ints(p, a.sizes or ("512" if cuda else "512,256"), "--sizes")
        batches = _ints(p, a.batches or "1,4", "--batches")
        configs = [(size, b) for size in sizes for b in batches]
    else:
        configs = _configs(p, a.configs or ("512x1,512x4" if cuda else "512x1,256x1,256x4"))
    for size, batch in configs:
        if size % 64 or size < 64 or batch < 1:
            p.error(f"size {size} must be a positive multiple of 64 and batch {batch} >= 1")
    steps = a.steps if a.steps is not None else (10 if cuda else 4)
    if steps < 2 or 1000 % steps:
        p.error(f"--steps must be >= 2 and divide 1000 (so both DDIM implementations visit the same timesteps), got {steps}")
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else (3 if cuda else 2))
    if repeats < 1:
        p.error("--repeats must be >= 1")
    vae_size = a.vae_size or (512 if cuda else 256)
    tiled = a.tiled_vae if a.tiled_vae is not None else (0 if a.quick else (2048 if cuda else 1024))
    if vae_size % 64 or (tiled and (tiled % 64 or tiled < 1024)):
        p.error("--vae-size must be a multiple of 64; --tiled-vae a multiple of 64 >= 1024 (or 0)")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    cache = Path(a.cache_dir).expanduser() if a.cache_dir else Path.home() / ".cache" / "ldm-benchmark"
    import torch

    return Settings(device=device, dtypes=dtypes, configs=configs, repeats=repeats, steps=steps,
                    threads=a.threads or torch.get_num_threads(), skip_load=a.skip_load or a.quick,
                    psnr=not (a.no_psnr or a.quick or cuda), vae_size=vae_size, tiled_vae=tiled,
                    e2e_steps=0 if not cuda else (50 if a.e2e_steps is None else a.e2e_steps),
                    variants=[v for v, on in (("no prepack", a.no_prepack), ("sdpa attention", a.sdpa_attention),
                                              ("channels_last", a.channels_last), ("compiled", a.compile)) if on],
                    flush_denormal=not a.keep_denormals,
                    clock=a.clock, cache_dir=cache, write_doc=not a.no_write)


def _ints(p, text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{name} must be a comma list of integers, got {text!r}")


def _configs(p, text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not m:
            p.error(f"--configs items look like 512x1 (size x batch), got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


# ============================================================================ memory
def rss_mb(field_name: str = "VmRSS") -> Optional[float]:
    """Resident set size (or VmHWM, its peak) of this process in MiB, from /proc (Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{field_name}:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else None


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB (VmHWM; ``getrusage`` where /proc is missing)."""
    peak = rss_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


class PeakMemory:
    """Peak memory a block adds: CUDA ``max_memory_allocated``, or on Linux the RSS high-water mark
    (reset through /proc/self/clear_refs after returning freed heap to the OS)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.added_mb: Optional[float] = None

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = rss_mb()
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.added_mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
        elif self.base is not None:
            self.added_mb = rss_mb("VmHWM") - self.base
        return False


# ============================================================================ weights
def random_state_dict(model, seed: int = 0) -> dict:
    """Random float tensors for every entry of ``model``'s state dict (built on meta), scaled like a
    trained net: norm weights ~1, matrices ~1/sqrt(fan_in), biases and embeddings small. Integer
    buffers (position ids) get arange; real (non-meta) buffers such as the noise schedule are kept."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if not v.is_meta:
            sd[k] = v.clone()
        elif not v.is_floating_point():
            sd[k] = torch.arange(v.shape[-1]).expand(v.shape).clone()
        else:
            r = torch.randn(v.shape, generator=g)
            if "norm" in k and k.endswith("weight"):
                r = 1 + 0.1 * r
            elif "embedding" in k:
                r = 0.1 * r
            elif v.dim() >= 2:
                r = r / math.sqrt(v[0].numel())
            else:
                r = 0.1 * r
            sd[k] = r
    return sd


def prepare_weights(cache_dir: Path) -> dict:
    """The random checkpoint in both layouts, made once: ``{"ckpt": .safetensors, "diffusers": folder}``."""
    root = cache_dir / WEIGHTS_VERSION
    ckpt, folder = root / "sd-v1-random.safetensors", root / "diffusers"
    if ckpt.is_file() and (folder / "model_index.json").is_file():
        return {"ckpt": ckpt, "diffusers": folder}
    root.mkdir(parents=True, exist_ok=True)
    log.info("building random SD v1 weights in %s (once; about 9 GB on disk)", root)
    from omegaconf import OmegaConf

    from ldm.checkpoint import instantiate_on_meta, save_checkpoint

    config = OmegaConf.load(CONFIG)
    sd = random_state_dict(instantiate_on_meta(config.model))
    if not ckpt.is_file():
        save_checkpoint(sd, ckpt)
    if not (folder / "model_index.json").is_file():
        pipe = _diffusers_pipeline_from_ldm(sd, OmegaConf.to_container(config, resolve=True))
        pipe.save_pretrained(folder, safe_serialization=True)
    return {"ckpt": ckpt, "diffusers": folder}


def _hf_tokenizer(cls):
    """transformers' CLIP tokenizer from the vocabulary and merges bundled with ldm."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    try:  # transformers >= 5: tokenizers-backed, built from the vocabulary itself
        tokenizer = cls(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    except TypeError:  # transformers 4: from the files
        tokenizer = cls(vocab_file=str(TOKENIZER_DIR / "vocab.json"), merges_file=str(TOKENIZER_DIR / "merges.txt"),
                        model_max_length=77)
    if len(tokenizer) != 49408:
        raise RuntimeError(f"transformers' CLIPTokenizer built with {len(tokenizer)} tokens, expected 49408")
    return tokenizer


def _materialize_buffers(module) -> None:
    """Non-persistent buffers (CLIP's position_ids) stay on meta after an assign-load: arange them."""
    import torch

    for m in module.modules():
        for name, buf in m.named_buffers(recurse=False):
            if buf.is_meta:
                m.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    # The reference's DDIM: scaled_linear betas, timesteps 1, 1+1000/S, ..., last alpha_prev = alphas_cumprod[0].
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def _diffusers_pipeline_from_ldm(sd: dict, original_config: dict):
    """A diffusers StableDiffusionPipeline holding ``sd`` converted by diffusers' own functions."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_config = create_unet_diffusers_config_from_ldm(original_config, sd)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, sd)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_config = CLIPTextConfig.from_pretrained(TOKENIZER_DIR)
        text_encoder = CLIPTextModel(text_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_config), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae_config), strict=True, assign=True)
    clip = convert_ldm_clip_checkpoint(sd)
    keys = set(text_encoder.state_dict())
    if not any(k.startswith("text_model.") for k in keys):  # transformers 5: no text_model level
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    clip = {k: v for k, v in clip.items() if k in keys or not k.endswith("position_ids")}
    text_encoder.load_state_dict(clip, strict=True, assign=True)
    _materialize_buffers(text_encoder)
    tokenizer = _hf_tokenizer(CLIPTokenizer)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


# ============================================================================ the two sides
class Ours:
    """This toolkit: ``load_model_from_config`` and the DDIM sampler from the registry.

    :param variant: ``None`` (library defaults), ``"channels_last"`` (UNet weights in channels_last),
        ``"compiled"`` (:func:`compile_unet` with weight freezing), ``"no prepack"`` (the CPU conv
        weight prepacking switched off while this side runs) or ``"sdpa attention"`` (attention always
        in PyTorch's SDPA while this side runs, ``ldm.ops.settings(attention="sdpa")``).
    """

    def __init__(self, paths: dict, dtype, device: str, variant: Optional[str] = None):
        import torch
        from omegaconf import OmegaConf

        from ldm.checkpoint import load_model_from_config
        from ldm.models.diffusion.registry import make_sampler
        from ldm.modules.diffusionmodules.openaimodel import compile_unet

        self.model = load_model_from_config(OmegaConf.load(CONFIG), paths["ckpt"], device=device, dtype=dtype)
        if variant == "channels_last":
            self.model.model.diffusion_model.to(memory_format=torch.channels_last)
        elif variant == "compiled":
            compile_unet(self.model, freezing=True)
        elif variant not in (None, "no prepack", "sdpa attention"):
            raise ValueError(f"unknown variant {variant!r}")
        self.name = "ours" if variant is None else f"ours ({variant})"
        self.prepack = variant != "no prepack"
        self.attention_backend = "sdpa" if variant == "sdpa attention" else "auto"
        self.sampler = make_sampler("ddim", self.model)
        self.device = device

    def _switches(self):
        """The ldm.ops settings of this side, for the duration of a ``with`` block."""
        import ldm.ops

        return ldm.ops.settings(conv_prepack=self.prepack, attention=self.attention_backend)

    def encode(self, batch: int):
        import torch

        with torch.no_grad():
            return (self.model.get_learned_conditioning([""] * batch), self.model.get_learned_conditioning([PROMPT] * batch))

    def sample(self, x_T, steps: int, cond, callback: Callable[[], None]):
        uc, c = cond
        b, _, h, w = x_T.shape
        with self._switches():
            samples, _ = self.sampler.sample(S=steps, batch_size=b, shape=(4, h, w), conditioning=c,
                                             unconditional_conditioning=uc, unconditional_guidance_scale=GUIDANCE,
                                             eta=0.0, x_T=x_T, verbose=False, callback=lambda i: callback())
        return samples

    def decode(self, z):
        import torch

        with torch.no_grad(), self._switches():
            return self.model.decode_first_stage(z)

    def packed_conv_mb(self) -> float:
        from ldm.ops import Conv2d

        total = 0
        for m in self.model.modules():
            cached = getattr(m, "_packed", None) if isinstance(m, Conv2d) else None
            if cached is not None:
                total += cached[-1].numel() * cached[-1].element_size()
        return total / 2**20


class Diffusers:
    """diffusers' StableDiffusionPipeline from the saved folder.

    :param meta_init: instead of ``from_pretrained``, build each model on the meta device and
        assign the file's tensors: what ``from_pretrained`` does with ``low_cpu_mem_usage`` when
        ``accelerate`` is installed (without it, diffusers first initialises random weights).
    """

    name = "diffusers"

    def __init__(self, paths: dict, dtype, device: str, meta_init: bool = False):
        from diffusers import StableDiffusionPipeline

        if meta_init:
            self.pipe = _pipeline_meta_init(Path(paths["diffusers"]), dtype)
            self.name = "diffusers (meta init)"
        else:
            self.pipe = StableDiffusionPipeline.from_pretrained(paths["diffusers"], torch_dtype=dtype)
        self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = dtype
        self.device = device

    def encode(self, batch: int):
        import torch

        with torch.no_grad():
            c, uc = self.pipe.encode_prompt([PROMPT] * batch, self.device, 1, True, [""] * batch)
        return uc, c

    def sample(self, x_T, steps: int, cond, callback: Callable[[], None]):
        uc, c = cond
        b, _, h, w = x_T.shape

        def on_step_end(pipe, i, t, kwargs):
            callback()
            return kwargs

        return self.pipe(prompt_embeds=c, negative_prompt_embeds=uc, num_inference_steps=steps, guidance_scale=GUIDANCE,
                         eta=0.0, latents=x_T.to(self.dtype), height=8 * h, width=8 * w, output_type="latent",
                         callback_on_step_end=on_step_end).images

    def decode(self, z):
        import torch

        with torch.no_grad():
            return self.pipe.vae.decode(z / self.pipe.vae.config.scaling_factor).sample


def _pipeline_meta_init(folder: Path, dtype):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def build(make, sub: str, weights: str):
        with torch.device("meta"):
            model = make()
        model.load_state_dict(load_file(str(folder / sub / weights)), strict=True, assign=True)
        return model.to(dtype).eval()

    unet = build(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")), "unet",
                 "diffusion_pytorch_model.safetensors")
    vae = build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")), "vae",
                "diffusion_pytorch_model.safetensors")
    text_encoder = build(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")), "text_encoder",
                         "model.safetensors")
    _materialize_buffers(text_encoder)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                   unet=unet, scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _accelerate_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is None


def attention_processors(side: Diffusers) -> set[str]:
    return {type(p).__name__ for p in side.pipe.unet.attn_processors.values()}


# ============================================================================ measurements
@dataclass
class Row:
    metric: str
    setting: str
    unit: str
    values: dict = field(default_factory=dict)  # side name -> list of samples

    def add(self, side: str, value: Optional[float]) -> None:
        if value is not None:
            self.values.setdefault(side, []).append(value)

    def median(self, side: str) -> Optional[float]:
        v = self.values.get(side)
        return statistics.median(v) if v else None


_CLOCK: Callable[[], float] = time.perf_counter  # set by run(): wall or process CPU time


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process so far, imports included."""
    t = os.times()
    return t.user + t.system


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def start_noise(size: int, batch: int, device: str, seed: int = 42):
    from ldm.devices import seed_generators
    from ldm.models.diffusion.sampling import randn

    return randn((batch, 4, size // 8, size // 8), seed_generators(seed, batch), device)


def time_steps(side, x_T, steps: int, cond, device: str) -> tuple[list[float], Optional[float], object]:
    """Run ``steps`` DDIM steps; returns (seconds of steps 2..S, peak memory added in MiB, latents)."""
    stamps: list[float] = []

    def tick():
        _sync(device)
        stamps.append(_CLOCK())

    with PeakMemory(device) as mem:
        out = side.sample(x_T, steps, cond, tick)
    return [b - a for a, b in zip(stamps, stamps[1:])], mem.added_mb, out


def time_call(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t0 = _CLOCK()
    out = fn()
    _sync(device)
    return _CLOCK() - t0, out


def run_child(spec: dict, s: Settings, paths: dict) -> tuple[float, list[dict]]:
    """Run this script's ``--child`` entry in a fresh Python; returns (seconds until its first
    report line, all report lines)."""
    spec = dict(spec, device=s.device, threads=s.threads, flush_denormal=s.flush_denormal,
                ckpt=str(paths["ckpt"]), diffusers=str(paths["diffusers"]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_child_env())
    first = proc.stdout.readline()  # printed the moment the child's work is done (a load: the model is ready)
    seconds = time.perf_counter() - t0
    rest, err = proc.communicate()
    lines = [line for line in [first] + rest.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec['task']} {spec.get('side', '')} failed:\n{err[-3000:]}")
    return seconds, [json.loads(line) for line in lines]


def _child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _process_memory_mb(device: str) -> Optional[float]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def child_main(spec: dict) -> None:
    """Subprocess entry points. ``load``: load one side, report at once, then (``footprint``) run
    one 2-step 256x256 sampling run and report the peak memory again. ``tiled_vae``: see
    :func:`tiled_vae_child`."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(spec["flush_denormal"])
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    paths = {"ckpt": Path(spec["ckpt"]), "diffusers": Path(spec["diffusers"])}
    device = spec["device"]
    if spec["task"] == "load":
        if spec["side"] == "ours":
            side = Ours(paths, dtype, device)
        else:
            side = Diffusers(paths, dtype, device, meta_init=spec["side"] == "diffusers (meta init)")
        _sync(device)
        print(json.dumps({"peak_mb": _process_memory_mb(device), "cpu_s": _cpu_seconds()}), flush=True)
        if spec.get("footprint"):
            side.sample(start_noise(256, 1, device), 2, side.encode(1), lambda: None)
            _sync(device)
            print(json.dumps({"peak_after_sampling_mb": _process_memory_mb(device)}), flush=True)
        return
    if spec["task"] == "tiled_vae":
        print(json.dumps(tiled_vae_child(paths, dtype, device, spec["size"])), flush=True)
        return
    raise ValueError(f"unknown child task {spec['task']!r}")


def tiled_vae_child(paths: dict, dtype, device: str, size: int) -> dict:
    """With only our VAE loaded (read key by key from the checkpoint): the peak memory of a tiled
    ``size`` x ``size`` decode, then the max abs difference of tiled vs untiled decode at 1024x1024."""
    import torch
    from omegaconf import OmegaConf
    from safetensors import safe_open

    from ldm.checkpoint import instantiate_on_meta, load_weights_into

    prefix = "first_stage_model."
    vae = instantiate_on_meta(OmegaConf.load(CONFIG).model.params.first_stage_config)
    with safe_open(str(paths["ckpt"]), framework="pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    load_weights_into(vae, sd, assign=True)
    del sd
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def latent(side: int, seed: int):
        return torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(seed)).to(device, dtype) / 0.18215

    result: dict = {"size": size}
    with torch.no_grad():
        z = latent(size, 0)
        with PeakMemory(device) as mem:
            result["seconds"], image = time_call(lambda: vae.decode_tiled(z), device)
        result["peak_added_mb"], result["process_peak_mb"] = mem.added_mb, _process_memory_mb(device)
        tiled = image if size == 1024 else vae.decode_tiled(latent(1024, 0))
        del image
        full = vae.decode(latent(1024, 0))
        result["diff_1024"] = (tiled.float() - full.float()).abs().max().item()
        result["mean_diff_1024"] = (tiled.float() - full.float()).abs().mean().item()
        result["range_1024"] = full.float().abs().max().item()
    return result


def psnr(a, b) -> float:
    """PSNR in dB of images in [-1, 1] mapped to [0, 1]."""
    a = ((a.float() + 1) / 2).clamp(0, 1)
    b = ((b.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


# ============================================================================ the run
def run(s: Settings, rows: list[Row], extra: dict) -> None:
    """Measure everything ``s`` asks for, appending to ``rows`` and ``extra`` as it goes (so an
    interrupted run still has what it measured)."""
    import torch

    global _CLOCK
    _CLOCK = time.perf_counter if s.clock == "wall" else _cpu_seconds
    torch.set_num_threads(s.threads)
    torch.set_flush_denormal(s.flush_denormal)
    paths = prepare_weights(s.cache_dir)

    def row(metric, setting, unit) -> Row:
        r = Row(metric, setting, unit)
        rows.append(r)
        return r

    if not s.skip_load:
        bench_load(s, paths, row, extra)

    images: dict = {}
    for name in s.dtypes:
        bench_dtype(s, paths, name, row, extra, images)  # its models are freed when it returns
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()

    if ("ours", "fp32") in images:
        ref = images[("ours", "fp32")]
        for key, img in images.items():
            if key != ("ours", "fp32"):
                extra.setdefault("psnr", []).append((f"{key[0]} {key[1]}", psnr(img, ref), (img - ref).abs().max().item()))

    if s.tiled_vae:
        name = "bf16" if "bf16" in s.dtypes else s.dtypes[0]
        log.info("tiled VAE decode %dx%d in %s (subprocess)", s.tiled_vae, s.tiled_vae, name)
        try:
            _, reports = run_child({"task": "tiled_vae", "dtype": name, "size": s.tiled_vae}, s, paths)
            extra["tiled"] = dict(reports[-1], dtype=name)
        except RuntimeError as e:
            extra["notes"].append(f"tiled VAE test failed: {str(e).strip().splitlines()[-1]}")


def bench_dtype(s: Settings, paths: dict, name: str, row, extra: dict, images: dict) -> None:
    """Everything measured in-process for one dtype: text encoding, steps, VAE decode, PSNR images."""
    import torch

    dtype = getattr(torch, DTYPES[name])
    log.info("loading both models in %s", name)
    sides = [Ours(paths, dtype, s.device)] + [Ours(paths, dtype, s.device, v) for v in s.variants]
    sides.append(Diffusers(paths, dtype, s.device))
    extra["attention"] = sorted(attention_processors(sides[-1]))

    r_text = row("text encode (uncond+cond)", f"{name} B=1", "ms")
    for rep in range(max(3, s.repeats) + 1):  # round 0 warms up
        for side in sides:
            sec, _ = time_call(lambda: side.encode(1), s.device)
            if rep:
                r_text.add(side.name, sec * 1000)

    for size, batch in s.configs:
        setting = f"{name} {size}x{size} B={batch}"
        r_step = row("s/step, CFG", setting, "s")
        r_mem = row("peak memory added by a sampling run", setting, "GiB")
        x_T = start_noise(size, batch, s.device)
        conds = {side.name: side.encode(batch) for side in sides}
        latents = {}
        for rep in range(s.repeats):
            for side in sides:
                times, mem, latents[side.name] = time_steps(side, x_T, s.steps, conds[side.name], s.device)
                log.info("%s %s: %s s/step", side.name, setting, ", ".join(f"{t:.2f}" for t in times))
                for t in times:
                    r_step.add(side.name, t)
                if rep == s.repeats - 1 and mem is not None:  # the last run: steady state
                    r_mem.add(side.name, mem / 1024)
        ref = latents["diffusers"].float()
        extra.setdefault("agreement", []).append(
            (setting, ((latents["ours"].float() - ref).norm() / ref.norm()).item()))
    packed = sides[0].packed_conv_mb()
    if packed:
        row("ours: prepacked conv weights held", name, "GiB").add("ours", packed / 1024)

    r_vae = row(f"VAE decode {s.vae_size}x{s.vae_size}", f"{name} B=1", "s")
    z = start_noise(s.vae_size, 1, s.device, seed=7).to(dtype)  # scaled latents ~ N(0, 1)
    for rep in range(s.repeats + 1):  # round 0 warms up
        for side in sides:
            sec, _ = time_call(lambda: side.decode(z), s.device)
            if rep:
                r_vae.add(side.name, sec)

    if s.psnr:
        x_T = start_noise(256, 1, s.device, seed=3)
        for side in (sides[0], sides[-1]):
            if side.name == "diffusers" and name != "fp32":
                continue
            log.info("PSNR check: 10 DDIM steps at 256x256, %s %s", side.name, name)
            lat = side.sample(x_T, 10, side.encode(1), lambda: None)
            images[(side.name, name)] = side.decode(lat.to(dtype)).float().cpu()

    if s.e2e_steps:
        bench_e2e(s, sides, name, row)


def bench_load(s: Settings, paths: dict, row, extra: dict) -> None:
    """Load time and memory, each side in fresh subprocesses, alternating."""
    sides = ["ours", "diffusers"]
    if _accelerate_missing():
        sides.append("diffusers (meta init)")
        extra["notes"].append("`accelerate` is not installed here, so diffusers' `from_pretrained` first initialises "
                              "random weights (low_cpu_mem_usage=False); the 'diffusers (meta init)' column loads "
                              "the same folder on the meta device with assign, as it would with accelerate")
    for path in [paths["ckpt"], *sorted(Path(paths["diffusers"]).rglob("*.safetensors"))]:
        with open(path, "rb") as f:  # warm the page cache for both sides alike
            while f.read(1 << 24):
                pass
    for name in s.dtypes:
        r_time = row("load to ready", name, "s")
        r_ready = row("load: peak memory when ready", name, "GiB")
        r_total = row("load + one 256x256 sampling run: peak memory", name, "GiB")
        for rep in range(max(3, s.repeats)):  # a median of 3: now and then one start is 1-2.5 s slow (cause not found)
            for side in sides:
                seconds, reports = run_child({"task": "load", "side": side, "dtype": name, "footprint": rep == 0}, s, paths)
                log.info("load %s %s: %.1f s, %s", side, name, seconds, reports)
                r_time.add(side, seconds if s.clock == "wall" else reports[0]["cpu_s"])
                r_ready.add(side, reports[0]["peak_mb"] / 1024)
                if len(reports) > 1:
                    r_total.add(side, reports[1]["peak_after_sampling_mb"] / 1024)


def bench_e2e(s: Settings, sides: list, name: str, row) -> None:
    """Text to latents to image, ``e2e_steps`` DDIM steps (CUDA)."""
    for size, batch in s.configs:
        setting = f"{name} {size}x{size} B={batch}"
        r_e2e = row(f"{s.e2e_steps} steps end to end (encode+sample+decode)", setting, "s")
        r_its = row(f"{s.e2e_steps}-step loop", setting, "it/s")
        x_T = start_noise(size, batch, s.device)
        for rep in range(s.repeats + 1):  # round 0 warms up
            for side in sides:
                stamps: list[float] = []

                def tick(stamps=stamps):
                    _sync(s.device)
                    stamps.append(_CLOCK())

                def e2e(side=side, tick=tick):
                    lat = side.sample(x_T, s.e2e_steps, side.encode(batch), tick)
                    return side.decode(lat)

                sec, _ = time_call(e2e, s.device)
                if rep:
                    r_e2e.add(side.name, sec)
                    r_its.add(side.name, (len(stamps) - 1) / (stamps[-1] - stamps[0]))


# ============================================================================ report
def _fmt(v: Optional[float], unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "ms" or (unit == "s" and v >= 100):
        return f"{v:.0f}"
    return f"{v:.2f}" if v >= 1 or unit == "GiB" else f"{v:.3f}"


def table(rows: list[Row]) -> list[str]:
    sides = []
    for r in rows:
        sides += [k for k in r.values if k not in sides]
    others = [k for k in sides if k not in ("ours", "diffusers")]
    head = ["metric", "setting", "ours", "diffusers", "ours/diffusers"] + others
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        a, b = r.median("ours"), r.median("diffusers")
        ratio = f"{a / b:.2f}" if a is not None and b else ""
        cells = [f"{r.metric} ({r.unit})", r.setting, _fmt(a, r.unit), _fmt(b, r.unit), ratio]
        cells += [_fmt(r.median(k), r.unit) for k in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def derived(rows: list[Row], extra: dict) -> list[str]:
    """Lines for the cross-dtype comparisons, the numeric checks and the targets."""
    out = []
    steps = {r.setting: r for r in rows if r.metric == "s/step, CFG"}
    for setting, r in steps.items():
        ref = steps.get("fp32 " + setting[5:]) if setting.startswith("bf16 ") else None
        if ref and r.median("ours") and ref.median("diffusers"):
            out.append(f"- ours `auto` (bf16 on this CPU) vs diffusers' fp32 default, {setting[5:]}: "
                       f"{ref.median('diffusers') / r.median('ours'):.2f}x faster per step")
    for setting, err in extra.get("agreement", []):
        out.append(f"- final latents, ours vs diffusers, {setting}: relative L2 difference {err:.1e}")
    for name, value, maxdiff in extra.get("psnr", []):
        out.append(f"- 10 DDIM steps at 256x256, decoded image of {name} vs ours fp32 (same start noise): "
                   f"PSNR {value:.1f} dB, max abs difference {maxdiff:.3f} (images in [-1, 1])")
    t = extra.get("tiled")
    if t:
        out.append(f"- tiled VAE decode {t['size']}x{t['size']} ({t['dtype']}, only the VAE loaded, fresh process): "
                   f"{t['seconds']:.0f} s, process peak RSS {t['process_peak_mb'] / 1024:.2f} GiB "
                   f"(the decode added {t['peak_added_mb'] / 1024:.2f} GiB)")
        out.append(f"- tiled vs untiled VAE decode at 1024x1024 ({t['dtype']}, random weights): max abs difference "
                   f"{t['diff_1024']:.3f}, mean {t['mean_diff_1024']:.4f} (output range about ±{t['range_1024']:.2f})")
    if extra.get("attention"):
        out.append(f"- diffusers attention processors: {', '.join(extra['attention'])} (PyTorch SDPA, as ours)")
    out += [f"- {n}" for n in extra.get("notes", [])]
    return out


def machine_lines(s: Settings) -> list[str]:
    import diffusers
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    lines = [f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
             f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
             f"- torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
             f"Python {platform.python_version()}",
             f"- threads: {s.threads} (torch.set_num_threads, both sides)"]
    if s.device.startswith("cuda"):
        lines.append(f"- GPU: {torch.cuda.get_device_name(s.device)}")
    lines.append(f"- settings: device {s.device}, dtypes {','.join(s.dtypes)}, sizes x batches "
                 f"{', '.join(f'{a}x{a} B={b}' for a, b in s.configs)}, {s.steps} DDIM steps per timed run "
                 f"(the first untimed), {s.repeats} runs per side alternating ours/diffusers ({max(3, s.repeats)} for load), "
                 f"guidance {GUIDANCE}, eta 0; "
                 f"denormals {'flushed to zero' if s.flush_denormal else 'kept'}; times are "
                 f"{'elapsed (wall) seconds' if s.clock == 'wall' else 'CPU seconds of the process (--clock cpu)'}")
    return lines


def report(s: Settings, rows: list[Row], extra: dict, seconds: float) -> str:
    lines = ["### Measured", ""] + machine_lines(s) + [f"- benchmark wall time: {seconds / 60:.1f} min", ""]
    lines += table(rows) + [""] + derived(rows, extra)
    return "\n".join(lines) + "\n"


def write_doc(text: str) -> None:
    block = f"{BEGIN}\n{text}{END}"
    if DOC.is_file():
        old = DOC.read_text()
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
    else:
        new = f"# Benchmarks\n\n{block}\n"
    DOC.write_text(new)


# -- --throughput: images per minute of scripts/txt2img.py run as N processes by torchrun ---------------------------
TP_BEGIN, TP_END = "<!-- BEGIN THROUGHPUT (written by scripts/benchmark.py --throughput) -->", "<!-- END THROUGHPUT -->"


def throughput_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark.py --throughput",
                                description="Images per minute of a batch run (scripts/txt2img.py --from-file) with "
                                            "1, 2, ... processes started by torchrun, on the demo model.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu; on cuda one GPU per process)")
    p.add_argument("--nprocs", default="1,2", help="comma list of process counts (default 1,2)")
    p.add_argument("--sizes", default="64,256", help="comma list of image sides (default 64,256)")
    p.add_argument("--images", type=int, default=16, help="images per run (default 16)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    p.add_argument("--batch", type=int, default=4, help="--n_samples of each process (default 4)")
    p.add_argument("--precision", default="auto", help="--precision of the runs (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each process (default: cpu_count / N, so every run uses all cores)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per setting, alternating the process counts; medians are reported (default 2)")
    p.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    return p.parse_args(argv)


def throughput_run(a, nproc: int, size: int, folder: Path, repeat: int) -> dict:
    """One run; rendering rate from its summary.json (images / the slowest rank's seconds, model
    loading excluded) and end-to-end rate (images / wall seconds, process start-up included)."""
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"a photograph of shape {k}\n" for k in range(a.images)))
    outdir = folder / f"out-{nproc}-{size}-{repeat}"
    script = [str(REPO / "scripts" / "txt2img.py"), "--from-file", str(prompts), "--outdir", str(outdir),
              "--n_iter", "1", "--n_samples", str(a.batch), "--ddim_steps", str(a.steps), "--H", str(size), "--W",
              str(size), "--config", str(REPO / "configs/demo/demo-txt2img.yaml"), "--ckpt",
              str(REPO / "models/demo/demo.safetensors"), "--device", a.device, "--precision", a.precision,
              "--skip_grid"]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                             if nproc > 1 else []), *script]
    threads = a.threads or (max(1, (os.cpu_count() or 1) // nproc) if a.device == "cpu" else 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    session = json.loads((outdir / "summary.json").read_text())["runs"]["0"]["sessions"][-1]
    slowest = max(r["seconds"] for r in session["per_rank"])
    done = sum(r["done"] for r in session["per_rank"])
    return {"nproc": nproc, "size": size, "threads": threads, "images": done,
            "render_per_min": 60 * done / slowest, "e2e_per_min": 60 * done / wall}


def throughput_main(argv) -> int:
    import tempfile

    import torch

    a = throughput_args(argv)
    nprocs, sizes = [int(x) for x in a.nprocs.split(",")], [int(x) for x in a.sizes.split(",")]
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for repeat in range(a.repeats):  # A B A B: slow phases of a shared machine hit both sides
                for nproc in nprocs:
                    log.info("throughput: %d process(es), %dx%d, %d images (run %d)", nproc, size, size, a.images,
                             repeat + 1)
                    runs.setdefault((size, nproc), []).append(throughput_run(a, nproc, size, Path(tmp), repeat))
    results = [{**r[0], **{k: statistics.median(x[k] for x in r) for k in ("render_per_min", "e2e_per_min")}}
               for r in runs.values()]
    lines = ["### Measured: batch-run throughput", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"torch {torch.__version__}, device {a.device}",
             f"- run: scripts/txt2img.py --from-file ({a.images} prompts), demo model, DDIM {a.steps} steps, "
             f"--n_samples {a.batch}, --precision {a.precision}, --skip_grid; N processes by torchrun; medians of "
             f"{a.repeats} runs, alternating "
             f"(on the CPU each with {a.threads or 'cpu_count / N'} thread(s))", "",
             "| size | processes | threads each | images/min (rendering) | images/min (end to end) | "
             "speed-up vs 1 process | efficiency (speed-up / N) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = next(b for b in results if b["size"] == r["size"] and b["nproc"] == min(nprocs))
        speedup = r["render_per_min"] / base["render_per_min"]
        lines.append(f"| {r['size']}x{r['size']} | {r['nproc']} | {r['threads']} | {r['render_per_min']:.1f} | "
                     f"{r['e2e_per_min']:.1f} | {speedup:.2f} | {speedup / r['nproc'] * min(nprocs):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        old = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
        block = f"{TP_BEGIN}\n{text}{TP_END}"
        if TP_BEGIN in old and TP_END in old:
            new = old[:old.index(TP_BEGIN)] + block + old[old.index(TP_END) + len(TP_END):]
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
        DOC.write_text(new)
        log.info("wrote %s", DOC)
    return 0


def sdxl_main(argv) -> int:
    """``--family sdxl``: seconds per guided denoising step of the full SDXL base UNet (batch 2 with
    classifier-free guidance: what a sampler step costs), ours (``sgm`` config, ``DiffusionEngine``'s
    network) against diffusers' ``UNet2DConditionModel`` as ``StableDiffusionXLPipeline`` calls it
    (``text_time`` added conditioning), both holding the same random tensors (converted by diffusers'
    single-file functions, so the weights are shared, not copied), at each size and dtype, alternating."""
    p = argparse.ArgumentParser(description=sdxl_main.__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,512", help="comma list of image sides (default 256,512)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (default both)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per side (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from omegaconf import OmegaConf

    from ldm.checkpoint import instantiate_on_meta
    from sgm.modules.encoders.modules import ConcatTimestepEmbedderND

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    config = OmegaConf.load(REPO / "configs" / "inference" / "sd_xl_base.yaml")
    ours = instantiate_on_meta(config.model.params.network_config)
    log.info("random weights for the %s-parameter SDXL UNet", f"{sum(v.numel() for v in ours.state_dict().values()):,}")
    sd = random_state_dict(ours)
    ckpt = {"model.diffusion_model." + k: v for k, v in sd.items()}
    dconfig = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config, resolve=True), ckpt)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dconfig)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dconfig), strict=True, assign=True)
    ours.load_state_dict(sd, assign=True)
    del ckpt, sd
    lines = ["| size | dtype | ours s/step | diffusers s/step | ours/diffusers |", "|---|---|---|---|---|"]
    for name in [d.strip() for d in a.dtypes.split(",")]:
        dtype = getattr(torch, DTYPES[name])
        ours.to(dtype).eval(), theirs.to(dtype).eval()
        for size in [int(v) for v in a.sizes.split(",")]:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
            t = torch.tensor([500, 500])
            context = torch.randn(2, 77, 2048, generator=g).to(dtype)
            pooled = torch.randn(2, 1280, generator=g).to(dtype)
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2)
            y = torch.cat([pooled, ConcatTimestepEmbedderND(256)(time_ids).to(dtype)], dim=1)
            sides = {"ours": lambda: ours(x, timesteps=t, context=context, y=y),
                     "diffusers": lambda: theirs(x, t, encoder_hidden_states=context, added_cond_kwargs={
                         "text_embeds": pooled, "time_ids": time_ids.to(dtype)}).sample}
            times: dict = {"ours": [], "diffusers": []}
            with torch.inference_mode():
                for side in sides.values():
                    side()  # warm-up
                for _ in range(a.repeats):
                    for key, side in sides.items():
                        start = time.perf_counter()
                        side()
                        times[key].append(time.perf_counter() - start)
            o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
            lines.append(f"| {size}x{size} | {name} | {o:.2f} | {d:.2f} | {o / d:.2f} |")
            log.info(lines[-1])
    print("\n".join([f"SDXL base UNet, one guided step (batch 2), torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads, median of {a.repeats}", ""] + lines))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(json.loads(argv[1]))
        return 0
    if "--family" in argv:
        at = argv.index("--family")
        if argv[at + 1:at + 2] != ["sdxl"]:
            print("error: --family takes sdxl (the SD v1 benchmark is the default)", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        return sdxl_main(argv[:at] + argv[at + 2:])
    if "--throughput" in argv:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        return throughput_main([x for x in argv if x != "--throughput"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    s = parse_args(argv)
    if s.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    rows: list[Row] = []
    extra: dict = {"notes": []}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill: report what was measured, like Ctrl-C
    interrupted = False
    try:
        run(s, rows, extra)
    except KeyboardInterrupt:
        interrupted = True
        extra["notes"].append("INTERRUPTED: the run was stopped before the end; partial results (not written)")
    text = report(s, rows, extra, time.perf_counter() - t0)
    print(text)
    if s.write_doc and not interrupted:
        write_doc(text)
        log.info("wrote %s", DOC)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
