r"""K-FAC Laplace for Pyro models whose likelihood is a ``PyroModule`` network.

:class:`AutoKFACLaplace` fits the MAP and returns a
:class:`~pyro_sgmcmc.gaussian.KFACGaussian` over the unconstrained latents (the
Kronecker-factored posterior itself, its equations and :class:`KFACBlock`, live in
:mod:`pyro_sgmcmc.gaussian.kronecker` and are re-exported here);
:func:`pyro_sgmcmc.laplace.module.module_laplace` with ``structure="kfac"`` does the
same for a plain ``nn.Module`` (the PyTorch path). The layers and the pass over the
data that sums their factors live in :mod:`pyro_sgmcmc.laplace.kfac_passes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor, nn

from pyro_sgmcmc.gaussian.kronecker import KFACBlock, KFACGaussian, blocks_from_factors
from pyro_sgmcmc.laplace.autoguide import LAPLACE_FIX, AutoLaplace, LaplaceError, LaplaceGuide
from pyro_sgmcmc.laplace.chunks import first_indices, grad_leaves, jacobian_rows, log_prior_terms
from pyro_sgmcmc.laplace.kfac_passes import find_kfac_layers, kfac_data_pass
from pyro_sgmcmc.laplace.marglik import optimize_prior_precision
from pyro_sgmcmc.laplace.pyro_curvature import CurvatureResult
from pyro_sgmcmc.potential import PyroPotential
from pyro_sgmcmc.tree import unflatten

__all__ = ["AutoKFACLaplace", "KFACBlock", "KFACGaussian", "blocks_from_factors"]


# ---------------------------------------------------------------------- Pyro autoguide
class AutoKFACLaplace(AutoLaplace):
    r"""Laplace autoguide with a K-FAC precision on a Bayesian network's ``Linear`` layers.

    The model's likelihood is a :class:`pyro.nn.PyroModule` network whose ``nn.Linear``
    layers carry :class:`~pyro.nn.PyroSample` priors on ``weight`` (and ``bias``),
    observed through the data plate. As :class:`AutoDiagonalLaplace`: fit the MAP with
    ``SVI`` (minibatched through the plate), then
    ``guide.laplace_approximation(*args, **kwargs)`` makes one pass over **all** the
    plate's indices in chunks of ``batch_size`` and returns a
    :class:`~pyro_sgmcmc.laplace.autoguide.LaplaceGuide` whose ``posterior`` is a
    :class:`KFACGaussian` over the unconstrained latents: per layer

    .. math::

        \Lambda_\ell = \frac{1}{T}\big(G_\ell \otimes A_\ell + \delta_\ell I\big), \qquad
        A_\ell = \frac1N \sum_i a_i a_i^\top, \quad
        G_\ell = \sum_i \sum_r g_{ir} g_{ir}^\top,

    with :math:`a_i` the layer's input (a 1 appended when the bias is a latent) and
    :math:`g_{ir} = J_{z_i}^\top c_{ir}` the columns :math:`c_{ir}` backpropagated to the
    layer's output :math:`z_i`: for ``curvature="ggn"`` the factor :math:`L_i` of the
    observation distribution's closed-form Fisher in its own parameters (as
    :func:`~pyro_sgmcmc.laplace.pyro_curvature.likelihood_curvature`; the K-FAC
    "KFLR"), for ``"fisher"`` one score per Monte Carlo draw of :math:`y` (over
    :math:`\sqrt S`), for ``"ef"`` the observed score. Every other latent (a noise
    scale, a layer whose weights have a constrained support, ...) gets the diagonal of
    the same curvature, computed exactly per datum. The prior precision
    :math:`\delta_\ell` is the model's own (the diagonal of its Hessian, which must be
    constant over a layer's weight: an isotropic ``Normal`` prior) or the
    ``prior_precision`` given; a layer whose weight and bias priors differ gets
    separate weight and bias blocks (:meth:`KFACBlock.split_bias`), as do all layers
    under ``prior_precision="marglik_per_site"``.

    Write the network's forward so that its weights are sampled *outside* the data
    plate and it runs on the plate's minibatch, e.g.::

        def forward(self, x, y=None, batch=None):
            data = pyro.plate("data", len(x), subsample_size=batch)
            with data as idx:  # draws (or, under the guide, pins) the indices
                pass
            logits = self.fc2(torch.tanh(self.fc1(x[idx])))
            with data:
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y[idx])

    Args:
        model: the model, typically the :class:`~pyro.nn.PyroModule` itself.
        network: the module holding the ``Linear`` layers (default: ``model`` when it
            is an ``nn.Module``). Each layer runs once per model call, on the plate's
            indices (its input's first dimension is the chunk; extra dimensions are
            tokens, as in :func:`~pyro_sgmcmc.curvature.kfac_factors`).
        curvature: ``"ggn"``, ``"fisher"`` or ``"ef"`` (no ``"hessian"``: K-FAC
            factors a Fisher-type matrix).
        temperature: :math:`T > 0`.
        prior_precision: as :class:`~pyro_sgmcmc.laplace.autoguide.AutoLaplace`.
        batch_size: plate indices per chunk (memory: one chunk's activations times
            the columns, plus :math:`O(d_{in}^2 + d_{out}^2)` per layer).
        plate: the data plate's name (found automatically when unambiguous).
        num_samples: Monte Carlo draws per datum for ``"fisher"``.
        newton_steps: cap of the full-data mode search from the SVI point, as
            :class:`~pyro_sgmcmc.laplace.autoguide.AutoLaplace` (``None``: to the
            tolerance; L-BFGS on the full-data objective for networks over 200
            parameters, damped Newton below). A network's posterior has many modes: the
            search refines the one SVI found.
        mode_tol: its tolerance, in posterior sds.
        strict: raise rather than warn when the tolerance is not met.
        seed: seed of the Monte Carlo draws.
        init_loc_fn: Pyro init strategy of the MAP's starting point.

    Attributes:
        mode_report: after :meth:`laplace_approximation`, the mode search's
            :class:`~pyro_sgmcmc.laplace.mode.ModeReport`.
        kfac_layers: after :meth:`laplace_approximation`, ``{layer name: (weight
            site, bias site or None)}`` of the layers given Kronecker blocks.

    Examples:
        A two-layer Bayesian classifier; its K-FAC Laplace guide works with
        ``Predictive``:

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.nn import PyroModule, PyroSample
        >>> from pyro.infer import SVI, Trace_ELBO, Predictive
        >>> class BNN(PyroModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1 = PyroModule[torch.nn.Linear](2, 8)
        ...         self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([8, 2]).to_event(2))
        ...         self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([8]).to_event(1))
        ...         self.fc2 = PyroModule[torch.nn.Linear](8, 3)
        ...         self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 8]).to_event(2))
        ...         self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        ...     def forward(self, x, y=None, batch=None):
        ...         data = pyro.plate("data", len(x), subsample_size=batch)
        ...         with data as idx:
        ...             pass
        ...         logits = self.fc2(torch.tanh(self.fc1(x[idx])))
        ...         with data:
        ...             pyro.sample("obs", dist.Categorical(logits=logits),
        ...                         obs=None if y is None else y[idx])
        ...         return logits
        >>> pyro.set_rng_seed(0)
        >>> x = torch.randn(300, 2)
        >>> y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        >>> bnn = BNN()
        >>> pyro.clear_param_store()
        >>> guide = AutoKFACLaplace(bnn, batch_size=100)
        >>> svi = SVI(bnn, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
        >>> for _ in range(200):
        ...     _ = svi.step(x, y, batch=64)
        >>> laplace = guide.laplace_approximation(x, y)
        >>> type(laplace.posterior).__name__, sorted(laplace.posterior.blocks)
        ('KFACGaussian', ['fc1', 'fc2'])
        >>> draws = Predictive(bnn, guide=laplace, num_samples=20)(x[:5])
        >>> draws["fc1.weight"].shape, draws["obs"].shape  # Pyro pads global sites' draws
        (torch.Size([20, 1, 8, 2]), torch.Size([20, 5]))
    """

    structure = "kfac"

    def __init__(
        self,
        model: Callable,
        network: nn.Module | None = None,
        *,
        curvature: str = "ggn",
        temperature: float = 1.0,
        prior_precision: float | Mapping[str, float] | str | None = None,
        batch_size: int = 256,
        plate: str | None = None,
        num_samples: int = 1,
        newton_steps: int | None = None,
        mode_tol: float = 1e-3,
        strict: bool = False,
        seed: int = 0,
        init_loc_fn: Callable = init_to_median,
    ) -> None:
        if curvature not in _KFAC_CURVATURES:
            raise ValueError(
                f"AutoKFACLaplace's curvature must be one of {_KFAC_CURVATURES} (K-FAC factors "
                f"a Fisher-type matrix), got {curvature!r}"
            )
        if network is None:
            if not isinstance(model, nn.Module):
                raise ValueError(
                    "model is not an nn.Module: pass network=... (the PyroModule holding "
                    "the Linear layers)"
                )
            network = model
        super().__init__(
            model,
            curvature=curvature,
            temperature=temperature,
            prior_precision=prior_precision,
            batch_size=batch_size,
            plate=plate,
            num_samples=num_samples,
            newton_steps=newton_steps,
            mode_tol=mode_tol,
            strict=strict,
            seed=seed,
            init_loc_fn=init_loc_fn,
        )
        self._network = (network,)  # a tuple: never registered as a submodule
        self.kfac_layers: dict[str, tuple[str, str | None]] = {}

    # ------------------------------------------------------------------ the prior
    def _model_prior(
        self, pot: PyroPotential, phi: Mapping[str, Tensor], block_sites: set[str]
    ) -> dict[str, Tensor]:
        r"""The model prior's precision per site: a scalar for block sites, else a diagonal.

        Block sites: :math:`H_{ss}\mathbf 1` and one Rademacher probe (two
        Hessian-vector products) check that the prior Hessian is diagonal and constant
        there. Other sites: the exact diagonal.
        """
        leaves = grad_leaves(phi)
        first = next(iter(leaves.values()))
        trace = pot.trace(leaves, first_indices(pot, first.device))
        lp = log_prior_terms(pot, leaves, trace)
        names = list(leaves)
        grads = torch.autograd.grad(lp, list(leaves.values()), create_graph=True, allow_unused=True)
        grad = dict(zip(names, grads, strict=True))
        gen = torch.Generator().manual_seed(self.seed)
        out: dict[str, Tensor] = {}
        for k in names:
            if k not in block_sites:
                continue
            g = grad[k]
            if g is None or not g.requires_grad:
                out[k] = first.new_zeros(())
                continue
            ones = torch.ones_like(g)
            probe = torch.randint(0, 2, g.shape, generator=gen).to(g) * 2 - 1
            (h1,) = torch.autograd.grad(-(g * ones).sum(), leaves[k], retain_graph=True)
            (hp,) = torch.autograd.grad(-(g * probe).sum(), leaves[k], retain_graph=True)
            scale = h1.abs().max().clamp_min(torch.finfo(h1.dtype).tiny)
            if not torch.allclose(hp, h1 * probe, atol=1e-6 * scale, rtol=1e-6) or not (
                torch.allclose(h1, h1.reshape(-1)[0].expand_as(h1), atol=1e-6 * scale, rtol=1e-6)
            ):
                raise LaplaceError(
                    f"the model's prior on '{k}' does not have a constant diagonal Hessian (an "
                    "isotropic Normal prior), which a Kronecker block needs: set "
                    "prior_precision=... (or 'marglik'), or use AutoDiagonalLaplace"
                )
            out[k] = h1.reshape(-1)[0].detach()
        rest = {k: leaves[k] for k in names if k not in block_sites}
        if rest:
            flat = torch.cat(
                [
                    (-grad[k]).reshape(-1)
                    if grad[k] is not None
                    else leaves[k].new_zeros(leaves[k].numel())
                    for k in rest
                ]
            )
            diag = flat.new_zeros(flat.numel())
            for start, stop, jac in jacobian_rows(flat, rest):
                r = torch.arange(stop - start)
                diag[start:stop] = jac[r, start + r]
            out.update(unflatten(diag, rest))
        return {k: out[k] for k in names}

    # ------------------------------------------------------------------ the approximation
    def laplace_approximation(self, *args: Any, **kwargs: Any) -> LaplaceGuide:
        r"""The K-FAC Gaussian guide around the fitted MAP, from one pass over all data.

        Args:
            *args: the model's positional arguments (those SVI used, or the full data).
            **kwargs: the model's keyword arguments.

        Returns:
            A :class:`~pyro_sgmcmc.laplace.autoguide.LaplaceGuide` whose ``posterior``
            is a :class:`KFACGaussian` (``curvature.curvature`` holds the same factors
            as a :class:`KFACGaussian` at temperature 1, for the evidence).

        Raises:
            RuntimeError: called before the guide was fitted (or run once).
            ModelError: no data plate, local latents, a layer not run on the plate's
                minibatch, or no Linear layer with a real-valued PyroSample weight.
            LaplaceError: the model's prior is not isotropic on a layer (set
                ``prior_precision``), or the precision is not positive definite.
        """
        pot, phi = self._fitted(args, kwargs)
        layers = find_kfac_layers(self._network[0], pot, phi)
        phi = self._refine_mode(pot, phi)
        blocks, diagonal, log_lik, methods = kfac_data_pass(
            pot,
            phi,
            layers,
            curvature=self.curvature,
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            seed=self.seed,
        )
        self.kfac_layers = {n: (lay.weight, lay.bias) for n, lay in layers.items()}

        delta: Any = self.prior_precision
        block_sites = {k for blk in blocks.values() for k in (blk.weight, blk.bias) if k}
        if delta is None:
            prior: Any = self._model_prior(pot, phi, block_sites)
        elif isinstance(delta, Mapping):
            prior = {k: torch.as_tensor(delta[k]) for k in phi}
        else:
            prior = delta
        if isinstance(prior, Mapping) or delta == "marglik_per_site":
            blocks = _split_where_needed(blocks, prior, split_all=delta == "marglik_per_site")
        # The likelihood curvature alone (a placeholder prior of 1 keeps it invertible).
        curvature = KFACGaussian(phi, blocks, diagonal, prior_precision=1.0)
        if isinstance(delta, str):
            delta = optimize_prior_precision(
                log_lik, phi, curvature, per_site=delta == "marglik_per_site"
            )
            prior = delta
        try:
            posterior = curvature.with_prior_precision(prior).tempered(self.temperature)
        except ValueError as e:
            raise LaplaceError(f"{e}. {LAPLACE_FIX}") from e
        res = CurvatureResult(curvature, log_lik, methods)
        return self._laplace_guide(pot, phi, res, prior, delta, posterior)


_KFAC_CURVATURES = ("ggn", "fisher", "ef")


def _split_where_needed(
    blocks: dict[str, KFACBlock], prior: Mapping[str, Tensor], split_all: bool
) -> dict[str, KFACBlock]:
    out = {}
    for name, blk in blocks.items():
        if blk.bias is not None and (
            split_all
            or not torch.equal(torch.as_tensor(prior[blk.weight]), torch.as_tensor(prior[blk.bias]))
        ):
            out[f"{name}:weight"], out[f"{name}:bias"] = blk.split_bias()
        else:
            out[name] = blk
    return out
