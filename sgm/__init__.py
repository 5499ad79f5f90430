"""``sgm``: the target paths of Stability-AI/generative-models (SDXL 1.0 base and refiner), so the
original ``configs/inference/sd_xl_*.yaml`` files and ``sd_xl_*_1.0.safetensors`` checkpoints load
unchanged.

Nothing here is a second implementation: every class is a thin subclass or adapter over the
``ldm`` building blocks (the one UNet, attention, VAE, text towers and sampler core); see
docs/architecture.md, "SDXL and the sgm package".
"""
