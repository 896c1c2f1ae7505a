"""Everything on a CUDA device: the kernels, vectorised chains, warm-up (curvature,
noise and Laplace draws from CUDA generators), the fused step and the compiled PyTorch
step follow the device of the user's tensors. Skipped without a GPU."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

from pyro_sgmcmc import MCMC as VectorMCMC
from pyro_sgmcmc import SGHMCKernel, SGLDKernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 4, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5, 0.0])), generator=g)
    return X.cuda(), y.cuda()


@pytest.mark.parametrize("kernel_cls", [SGHMCKernel, SGLDKernel])
@pytest.mark.parametrize("jit", [False, "auto", True])
def test_serial_on_cuda(kernel_cls, jit, data):
    pyro.set_rng_seed(0)
    kernel = kernel_cls(model, subsample_size=32, jit_compile=jit)
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=200, disable_progbar=True)
    mcmc.run(*data)
    w = mcmc.get_samples()["w"]
    assert w.device.type == "cuda" and bool(torch.isfinite(w).all())
    assert kernel.diagnostics()["num_nonfinite_steps"] == 0
    if jit is True:
        assert kernel.fused_backend in ("inductor", "torchscript")


@pytest.mark.parametrize("chain_rng", ["batched", "per_chain"])
@pytest.mark.parametrize("jit", [False, True])
def test_vectorised_on_cuda(chain_rng, jit, data):
    pyro.set_rng_seed(0)
    kernel = SGHMCKernel(model, subsample_size=32, jit_compile=jit)
    mcmc = VectorMCMC(kernel, num_samples=50, warmup_steps=200, num_chains=8,
                      chain_rng=chain_rng, disable_progbar=True)  # fmt: skip
    mcmc.run(*data)
    w = mcmc.get_samples(group_by_chain=True)["w"]
    assert w.shape == (8, 50, 4) and w.device.type == "cuda"
    assert bool(torch.isfinite(w).all())


def test_fused_same_draws_as_eager_on_cuda(data):
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(1)
        kernel = SGHMCKernel(model, subsample_size=32, jit_compile=jit)
        mcmc = MCMC(kernel, num_samples=100, warmup_steps=100, disable_progbar=True)
        mcmc.run(*data)
        draws.append(mcmc.get_samples()["w"])
    torch.testing.assert_close(draws[1], draws[0], rtol=1e-3, atol=1e-4)


def test_epoch_batching_on_cuda(data):
    pyro.set_rng_seed(2)
    kernel = SGHMCKernel(model, subsample_size=32, batching="epoch")
    MCMC(kernel, num_samples=50, warmup_steps=100, disable_progbar=True).run(*data)
    assert kernel.potential.indices.generator.device.type == "cuda"


def test_compiled_module_step_on_cuda():
    from pyro_sgmcmc.nn import ModulePotential, categorical_log_likelihood
    from pyro_sgmcmc.samplers import sghmc
    from pyro_sgmcmc.samplers.compiled import compiled_step

    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    pot = ModulePotential(net.cuda(), categorical_log_likelihood, prior=1.0, num_data=100,
                          check_finite=False)  # fmt: skip
    x, y = torch.randn(16, 5, device="cuda"), torch.randint(3, (16,), device="cuda")
    start = {k: v.expand(4, *v.shape).clone() for k, v in pot.params().items()}
    step = compiled_step(pot, sghmc, 0.05, ensemble=True, num_data=100)
    state, g = sghmc.init(start), torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        state, u = step(state, (x, y), g)
    assert u.shape == (4,) and u.device.type == "cuda"
