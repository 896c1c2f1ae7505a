"""The README's quickstart, timed as written, next to the ``pyro-sgmcmc pima`` NUTS row
(Pyro NUTS, jit, 1000 warm-up + 8000 draws) on the same data, in one process.

Run: ``python benchmarks/quickstart.py``. Prints both wall times, their ratio, and the
snippet's largest posterior-mean error in NUTS sds.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pyro
import torch

README = Path(__file__).parents[1] / "README.md"


def readme_snippet() -> str:
    """The README's first Python block: the quickstart a user copies."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def main() -> None:
    from pyro.infer import MCMC, NUTS

    from pyro_sgmcmc.datasets import load_pima, logistic_regression_model

    code = readme_snippet().replace("mcmc.summary()", "")
    pyro.set_rng_seed(0)
    t = time.perf_counter()
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README, as written
    snippet = time.perf_counter() - t
    w = scope["mcmc"].get_samples()["w"]

    X, y, _ = load_pima()
    pyro.set_rng_seed(0)
    t = time.perf_counter()
    nuts = MCMC(NUTS(logistic_regression_model, jit_compile=True, ignore_jit_warnings=True),
                num_samples=8000, warmup_steps=1000, disable_progbar=True)  # fmt: skip
    nuts.run(X, y)
    nuts_time = time.perf_counter() - t
    ref = nuts.get_samples()["w"]
    err = float(((w.mean(0) - ref.mean(0)) / ref.std(0)).abs().max())
    print(f"README snippet: {snippet:.1f} s; Pyro NUTS (CLI row): {nuts_time:.1f} s; "
          f"ratio {snippet / nuts_time:.2f}; max mean error {err:.3f} NUTS sd; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip


if __name__ == "__main__":
    main()
