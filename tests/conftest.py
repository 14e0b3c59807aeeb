import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors; it is chosen
# when triton is imported, so this must come before anything imports lrfluct_fast or triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from backends import BACKENDS  # noqa: E402


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
