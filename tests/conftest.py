"""Shared test settings: deterministic, single-threaded, modest hypothesis budgets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from gating_helpers import examples
from hypothesis import HealthCheck, settings

# the benchmark scripts (bench/, not installed) are importable from tests
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(int(os.environ.get("GATEDPRUNE_TEST_THREADS", "1")))

# GATEDPRUNE_HYPOTHESIS_SCALE=k multiplies every hypothesis test's examples (see
# gating_helpers.examples): a long search for rare failures, not for CI
settings.register_profile(
    "default",
    deadline=None,
    max_examples=examples(30),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")
