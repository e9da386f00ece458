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


@pytest.fixture
def either_path(request):
    """Runs the test on one of the two kernel paths for small slabs, on chip or split
    (kernels/onchip.py, stats.py...), picked by a hash of the test id: a parametrized grid
    then covers both paths at no extra cost. Yields True when on chip was allowed."""
    import zlib
    from triton_bn.kernels.tuning import use_onchip
    onchip = zlib.crc32(request.node.nodeid.encode()) % 2 == 0
    with use_onchip(onchip):
        yield onchip


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
