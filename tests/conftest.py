"""Shared fixtures: tiny teachers and data, small enough for 2 CPU cores."""
import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # tiny models: one thread is fastest and fair to other processes


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs that take more than a few seconds")


@pytest.fixture
def bn_teacher():
    """A frozen, randomly initialised lenet5_bn teacher for 10 classes of 1x32x32 images,
    with non-trivial BatchNorm running statistics."""
    from teachers import build_model, freeze

    torch.manual_seed(0)
    model = build_model("lenet5_bn", 10, 1, 32, (0.3,), (0.35,))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(64, 1, 32, 32))
    return freeze(model)


@pytest.fixture
def student():
    from teachers import build_model

    torch.manual_seed(1)
    return build_model("lenet5_half", 10, 1, 32, (0.3,), (0.35,))


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """Each test starts with Python's default Ctrl-C handler (runs defer Ctrl-C only over that one):
    pytest started in the background by a non-interactive shell inherits SIGINT ignored, and a test
    that leaves another handler installed is named in a warning; the default is restored either way."""
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        warnings.warn("this test left a non-default SIGINT handler installed; restored", stacklevel=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
