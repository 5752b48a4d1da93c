"""Shared fixtures: tiny diffusers-format Stable Diffusion folders, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COMPINV_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))

import pytest
import torch

# Tests run two xdist workers on two cores: one thread each avoids OpenMP oversubscription,
# which otherwise slows small-model runs several-fold.
torch.set_num_threads(1)


def _build(tmp_path_factory, name: str, prediction_type: str):
    from compinv_rt.models.architectures import save_model, tiny_components

    return save_model(tiny_components(seed=0, prediction_type=prediction_type),
                      tmp_path_factory.mktemp(name) / "model")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """SD 1.x-like: epsilon prediction, x8 VAE, 128x128 native size."""
    return _build(tmp_path_factory, "tiny-eps", "epsilon")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory):
    """SD 2.x-like: v-prediction."""
    return _build(tmp_path_factory, "tiny-v", "v_prediction")


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A private copy of the tiny model that a test may damage."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


@pytest.fixture(scope="session")
def stock_pipeline_cls():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline
