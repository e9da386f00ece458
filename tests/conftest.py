"""Without CUDA the kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


# Hypothesis profiles for the property-based tests (tests/test_properties.py describes them).
# Registered here so that hypothesis' pytest plugin can select one: --hypothesis-profile=long.
try:
    from hypothesis import HealthCheck, Phase, settings  # noqa: E402
except ImportError:  # the other test files do not need hypothesis
    pass
else:
    # The interpreter makes each example take ~0.1-1 s: too_slow is expected, not a warning sign.
    _SLOW_IS_FINE = [HealthCheck.too_slow]
    settings.register_profile(
        "ci", derandomize=True, deadline=None, max_examples=60, database=None, print_blob=False,
        # No shrinking: on the interpreter it can take minutes; the failing case's repr suffices.
        phases=(Phase.explicit, Phase.reuse, Phase.generate), suppress_health_check=_SLOW_IS_FINE)
    settings.register_profile("dev", settings.get_profile("ci"), phases=tuple(Phase))
    settings.register_profile(
        "long", derandomize=False, deadline=None, max_examples=1500, database=None, print_blob=True,
        suppress_health_check=_SLOW_IS_FINE)
    settings.load_profile("ci")
