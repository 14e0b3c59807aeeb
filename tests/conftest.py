import pytest

from backends import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
