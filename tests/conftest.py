"""Shared fixtures: a Generator seeded from the test's id, so every test is reproducible alone."""

from __future__ import annotations

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded by a stable hash of the test's node id."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
