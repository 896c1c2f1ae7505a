"""The fused sampling step of ``jit_compile=True`` (pyro_sgmcmc/kernels/fused.py): the
same draws as the eager step, serial and vectorised, every sampler; divergences counted
from the deferred flags; a clear fallback where a model cannot be fused; and every
random draw on the device of its generator."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

from pyro_sgmcmc import MCMC as VectorMCMC
from pyro_sgmcmc import BAOAKernel, SGHMCKernel, SGLDKernel, SGNHTKernel
from pyro_sgmcmc.potential import NonFiniteError


def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, s), obs=y[idx])


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 3, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.2]) + 0.5 * torch.randn(300, generator=g)
    return X, y


def _serial(kernel_cls, data, jit, backend="torchscript", **kw):
    pyro.set_rng_seed(1)
    kernel = kernel_cls(model, subsample_size=20, jit_compile=jit, compile_backend=backend, **kw)
    mcmc = MCMC(kernel, num_samples=150, warmup_steps=100, disable_progbar=True)
    mcmc.run(*data)
    return mcmc.get_samples(), kernel


@pytest.mark.parametrize("kernel_cls", [SGHMCKernel, SGLDKernel, SGNHTKernel, BAOAKernel])
def test_fused_serial_same_draws_as_eager(kernel_cls, data):
    eager, _ = _serial(kernel_cls, data, False)
    fused, kernel = _serial(kernel_cls, data, True)
    assert kernel.fused_backend == "torchscript"
    for k in eager:
        torch.testing.assert_close(fused[k], eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fused_serial_inductor(data):
    eager, _ = _serial(SGHMCKernel, data, False)
    fused, kernel = _serial(SGHMCKernel, data, True, backend="inductor")
    assert kernel.fused_backend in ("inductor", "torchscript")  # torchscript: no compiler
    assert kernel.diagnostics()["compile_seconds"] > 0
    for k in eager:
        torch.testing.assert_close(fused[k], eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options", [{}, {"chain_rng": "per_chain"}, {"chain_coupling": "antithetic"}]
)
@pytest.mark.parametrize("kernel_cls", [SGHMCKernel, SGNHTKernel])
def test_fused_vectorised_same_draws_as_eager(kernel_cls, options, data):
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(2)
        kernel = kernel_cls(model, subsample_size=20, jit_compile=jit,
                            compile_backend="torchscript")  # fmt: skip
        mcmc = VectorMCMC(kernel, num_samples=60, warmup_steps=60, num_chains=4,
                          disable_progbar=True, **options)  # fmt: skip
        mcmc.run(*data)
        draws.append(mcmc.get_samples(group_by_chain=True))
        if jit:
            assert kernel.fused_backend == "torchscript"
    for k in draws[0]:
        torch.testing.assert_close(draws[1][k], draws[0][k], rtol=1e-4, atol=1e-5)


def _cliff(params):
    # -log p of N(0, 1) with a NaN cliff at x > 1.2: written with torch.where, so the
    # recorded graph is exact and the fused step meets the NaN.
    x = params["x"]
    return torch.where(x > 1.2, torch.full_like(x, float("nan")), 0.5 * x * x).sum()


def test_fused_counts_divergences_and_raises():
    kernel = SGLDKernel(potential_fn=_cliff, step_size=0.5, jit_compile=True,
                        compile_backend="torchscript", adapt_mass_matrix=False,
                        rng_seed=0, max_divergences=10_000)  # fmt: skip
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True,
                initial_params={"x": torch.zeros(1)})  # fmt: skip
    mcmc.run()
    diag = kernel.diagnostics()
    assert kernel.fused_backend == "torchscript"
    assert diag["num_nonfinite_steps"] > 0
    assert diag["divergences"] and all(0 <= i < 300 for i in diag["divergences"])
    x = mcmc.get_samples()["x"]
    assert bool(torch.isfinite(x).all()) and x.std() > 0.3  # the chain goes on moving

    kernel = SGLDKernel(potential_fn=_cliff, step_size=0.5, jit_compile=True,
                        compile_backend="torchscript", adapt_mass_matrix=False,
                        rng_seed=0, max_divergences=2)  # fmt: skip
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=0, disable_progbar=True,
                initial_params={"x": torch.zeros(1)})  # fmt: skip
    with pytest.raises(NonFiniteError, match="fused step"):
        mcmc.run()


def branchy(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    scale = 1.0 if float(w.sum()) > 0 else 2.0  # value-dependent Python control flow
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, scale), obs=y[idx])


def test_fused_falls_back_with_a_clear_message(data):
    pyro.set_rng_seed(3)
    kernel = SGHMCKernel(branchy, subsample_size=20, jit_compile=True,
                         compile_backend="torchscript", adapt_mass_matrix=False)  # fmt: skip
    mcmc = MCMC(kernel, num_samples=30, warmup_steps=10, disable_progbar=True,
                initial_params={"w": torch.tensor([-0.01, 0.0, 0.0])})  # fmt: skip
    with pytest.warns(RuntimeWarning, match="could not be fused"):
        mcmc.run(*data)
    assert kernel.fused_backend is None


def test_schedule_changing_every_step_is_not_fused(data):
    pyro.set_rng_seed(4)
    kernel = SGLDKernel(model, subsample_size=20, jit_compile=True,
                        compile_backend="torchscript",
                        step_size=lambda t: 0.05 / (1 + t) ** 0.55)  # fmt: skip
    mcmc = MCMC(kernel, num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run(*data)
    assert kernel.fused_backend is None
    assert any("change every step" in n for n in kernel.diagnostics()["warmup"]["notes"])


def test_random_draws_name_their_device(data, monkeypatch):
    """Every draw that takes a generator says on which device (a CUDA generator needs
    ``device=``): a fake check that runs on the CPU."""
    missing = []
    for name in ("randint", "randn", "rand", "randperm"):
        original = getattr(torch, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            if kwargs.get("generator") is not None and "device" not in kwargs:
                import traceback

                frame = traceback.extract_stack(limit=2)[0]
                if "pyro_sgmcmc" in frame.filename:
                    missing.append(f"{_name} at {frame.filename}:{frame.lineno}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, wrapped)
    for chain_rng in ("batched", "per_chain"):
        pyro.set_rng_seed(5)
        mcmc = VectorMCMC(SGHMCKernel(model, subsample_size=20), num_samples=20,
                          warmup_steps=150, num_chains=4, chain_rng=chain_rng,
                          disable_progbar=True)  # fmt: skip
        mcmc.run(*data)
    pyro.set_rng_seed(5)
    MCMC(SGHMCKernel(model, subsample_size=20, batching="epoch"), num_samples=20,
         warmup_steps=150, disable_progbar=True).run(*data)  # fmt: skip
    assert not missing, sorted(set(missing))


@pytest.mark.parametrize("ensemble", [pytest.param(False, marks=pytest.mark.slow), True])
def test_compiled_module_step_same_draws_as_eager(ensemble):
    from pyro_sgmcmc.nn import ModulePotential, categorical_log_likelihood
    from pyro_sgmcmc.samplers import sghmc
    from pyro_sgmcmc.samplers.compiled import compiled_step

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    pot = ModulePotential(net, categorical_log_likelihood, prior=1.0, num_data=100)
    x, y = torch.randn(16, 5), torch.randint(3, (16,))
    start = pot.params()
    if ensemble:
        start = {k: v + 0.1 * torch.randn(4, *v.shape) for k, v in start.items()}
    grad = torch.func.grad(pot.potential)
    if ensemble:
        grad = torch.func.vmap(grad, in_dims=(0, None))
    step = compiled_step(pot, sghmc, 0.05, ensemble=ensemble, num_data=100, alpha=1.0)
    fused, eager = sghmc.init(start), sghmc.init(start)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        fused, u = step(fused, (x, y), g1)
        eager = sghmc.step(eager, grad(eager.params, (x, y)), 0.05, num_data=100, alpha=1.0,
                           generator=g2)  # fmt: skip
    assert u.shape == ((4,) if ensemble else ())
    for k in start:
        torch.testing.assert_close(fused.params[k], eager.params[k], rtol=1e-4, atol=1e-5)


def test_fused_resume_from_checkpoint_reproduces_the_run(tmp_path, data):
    """A fused run stopped mid-sampling resumes from its checkpoint to exactly the draws
    of the uninterrupted fused run (the build's check replays its draws)."""

    def run(checkpoint, stop_at=None):
        def hook(kernel, params, stage, i):
            if stage == "Sample" and i == stop_at:
                raise KeyboardInterrupt

        pyro.set_rng_seed(6)
        kernel = SGHMCKernel(model, subsample_size=20, jit_compile=True,
                             compile_backend="torchscript")  # fmt: skip
        mcmc = VectorMCMC(kernel, num_samples=40, warmup_steps=60, num_chains=3,
                          checkpoint=checkpoint, checkpoint_every=7, hook_fn=hook,
                          disable_progbar=True)  # fmt: skip
        mcmc.run(*data)
        return mcmc.get_samples(group_by_chain=True)

    reference = run(None)
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(path, stop_at=25)
    resumed = run(path)
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=0)
