"""pytest: the doctests of :mod:`pyro_sgmcmc.hf` need the ``llm`` extra.

``.ci/run`` installs it (``pip install -e ".[dev,docs,llm]"``). Without transformers or
peft these doctests skip on a developer's machine, naming the install command, and fail
under CI (``CI`` set), so a missing install step cannot hide behind a green run.
"""

import importlib.util
import os

import pytest


@pytest.fixture(autouse=True)
def _needs_llm_extra():
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f'needs {missing}: pip install "pyro-sgmcmc[llm]"')
