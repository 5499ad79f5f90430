"""Shared test fixtures: where the reference spec lives, and the recorded reference outputs.

The spec folder (``../shared/spec`` beside the checkout, or ``$SD_SPEC_DIR``) holds the key
manifests of the official checkpoints and the tiny reference fixture; see its README.md.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_CONFIG  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _spec_dir() -> Path:
    env = os.environ.get("SD_SPEC_DIR")
    return Path(env) if env else REPO.parent / "shared" / "spec"


SPEC_DIR = _spec_dir()
FIXTURES = SPEC_DIR / "fixtures"
TINY_CKPT = FIXTURES / "sd-v1-tiny-random.ckpt"
PARITY = FIXTURES / "sd-v1-tiny-parity.pt"


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    if not SPEC_DIR.is_dir():
        pytest.fail(f"reference spec not found at {SPEC_DIR}; set SD_SPEC_DIR to the shared/spec folder")
    return SPEC_DIR


@pytest.fixture(scope="session")
def parity(spec_dir) -> dict:
    """Every input and output the reference recorded on the tiny random model."""
    return torch.load(PARITY, weights_only=True)


@pytest.fixture(scope="session")
def tiny_ckpt(spec_dir) -> Path:
    return TINY_CKPT


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size checks; skipped unless SD_RUN_SLOW=1 (see README, Tests)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SD_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="full-size check; run with SD_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
