"""Shared fixtures: tiny models for fast checks, the demo mix of real light models for the rest."""

import os

# Before TVM creates a thread pool: pinning would serialize the stream workers on one core.
os.environ.setdefault("TVM_BIND_THREADS", "0")

import pytest

import cosched
from cosched.compare import make_inputs
from cosched.models import light_model, tiny_cnn

DEMO_MIX = ("squeezenet", "shufflenet", "inception_v1")
__all__ = ["DEMO_MIX", "make_inputs"]


@pytest.fixture(scope="session")
def tiny_models():
    return {
        "alpha": tiny_cnn("alpha", seed=1, width=8, depth=2),
        "beta": tiny_cnn("beta", seed=2, width=12, depth=3),
        "gamma": tiny_cnn("gamma", seed=3, width=8, depth=1, size=20),
    }


@pytest.fixture(scope="session")
def tiny_tenants(tiny_models):
    return [cosched.load_onnx(m, name=n) for n, m in tiny_models.items()]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_tenants):
    return cosched.compile(tiny_tenants, num_streams=2)


@pytest.fixture(scope="session")
def demo_models():
    return {name: light_model(name, seed=0) for name in DEMO_MIX}


@pytest.fixture(scope="session")
def demo_tenants(demo_models):
    return [cosched.load_onnx(m, name=n) for n, m in demo_models.items()]


@pytest.fixture(scope="session")
def demo_bundle(demo_tenants):
    return cosched.compile(demo_tenants, num_streams=2)


@pytest.fixture(scope="session")
def demo_inputs(demo_tenants):
    return make_inputs(demo_tenants)
