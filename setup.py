from setuptools import find_packages, setup

setup(
    name="latent-diffusion",
    version="0.1.0",
    description="Stable Diffusion sampling toolkit: loads the original CompVis checkpoints and configs",
    packages=find_packages(include=["ldm", "ldm.*", "sgm", "sgm.*"]),
    package_data={"ldm": ["modules/encoders/clip-vit-large-patch14/*", "data/*.txt"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "omegaconf>=2.1",
        "einops",
        "safetensors",
        "pillow",
        "tqdm",
        "ftfy",
        "regex",
        "invisible-watermark",
    ],
    extras_require={
        "train": ["pytorch-lightning>=2.0"],
        "test": ["pytest", "diffusers", "transformers", "pytorch-lightning>=2.0"],
    },
)
