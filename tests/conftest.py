"""Test setup: the XLA device is the CPU here (PJRT_DEVICE=CPU); each test starts with a
fresh Dynamo cache so compile counts do not leak between tests."""
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
