"""Shared fixtures: tiny diffusers-format Stable Diffusion folders, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COMPINV_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))

import pytest
import torch

# Hypothesis profiles for tests/test_fuzz.py: `ci` (default) is derandomized and bounded so the
# suite stays fast; `long` (HYPOTHESIS_PROFILE=long) is random and multiplies every example count
# by COMPINV_FUZZ_SCALE (default 20).
from hypothesis import settings as _hyp  # noqa: E402

_hyp.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
_hyp.register_profile("long", deadline=None, print_blob=True)
_hyp.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FUZZ_SCALE = (int(os.environ.get("COMPINV_FUZZ_SCALE", "20"))
              if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1)

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


TOKEN = "<my-heart>"


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    from compinv_rt.apps.world.photos import make_photos

    d = tmp_path_factory.mktemp("photos")
    make_photos(d, count=3, size=64)
    return d


@pytest.fixture(scope="session")
def trained(tiny_model, photos, tmp_path_factory):
    """Two vectors, a few steps: enough for every vector to move."""
    from compinv_rt.train.config import TrainConfig
    from compinv_rt.train.loop import prepare, train_concept

    cfg = TrainConfig(token=TOKEN, class_word="heart", vectors=2, steps=4, batch=2,
                      resolution=64, variants=2, checkpoint_every=2)
    out = tmp_path_factory.mktemp("trained") / "concept"
    return train_concept(prepare(cfg, photos, tiny_model), out, device="cpu")


