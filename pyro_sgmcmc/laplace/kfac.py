r"""Kronecker-factored (K-FAC) Laplace posteriors, for ``nn.Module``\ s and Pyro networks.

A layer :math:`z = W a + b` with :math:`\tilde W = [W, b]` (``(m, n)``, the bias the last
column) gets the precision block

.. math::

    \Lambda_\ell = \frac{1}{T}\big(s\, G \otimes A + \delta I\big),
    \qquad A = U_A \operatorname{diag}(\alpha) U_A^\top,\quad
    G = U_G \operatorname{diag}(\gamma) U_G^\top,

over :math:`\mathrm{vec}_r(\tilde W)` (row-major, as :func:`~pyro_sgmcmc.curvature.kfac_to_dense`),
where :math:`A` and :math:`G` are the layer's K-FAC factors
(:func:`~pyro_sgmcmc.curvature.kfac_factors`: :math:`A` a mean over data, :math:`G` a
sum, so that :math:`G \otimes A` approximates the summed curvature), :math:`s` a
curvature scale (1 for those conventions; :math:`N / n` for a curvature accumulated
over :math:`n` of :math:`N` data), :math:`\delta` the prior precision and :math:`T`
the temperature. The Kronecker eigenbasis diagonalises the block:
:math:`\Lambda_\ell = (U_G \otimes U_A)\, \operatorname{diag}(\lambda)\,
(U_G \otimes U_A)^\top` with :math:`\lambda_{oj} = (s\, \gamma_o \alpha_j + \delta) / T`,
so with :math:`\mathrm{vec}_r(U_G M U_A^\top) = (U_G \otimes U_A)\mathrm{vec}_r(M)`:

.. math::

    \log\det\Lambda_\ell = \sum_{oj} \log \lambda_{oj}, \qquad
    \theta = \mu + U_G\, (Z \oslash \sqrt{\lambda})\, U_A^\top, \qquad
    \operatorname{diag}\Lambda_\ell^{-1} = (U_G^{\odot 2})\, \lambda^{\odot -1}\,
        (U_A^{\odot 2})^\top, \\
    (\theta - \mu)^\top \Lambda_\ell (\theta - \mu) = \textstyle\sum_{oj}
        \lambda_{oj}\, \big(U_G^\top D\, U_A\big)_{oj}^2, \quad D = \tilde\theta - \tilde\mu,

all in :math:`O(m^3 + n^3)` once and :math:`O(mn(m + n))` per use, never the
:math:`mn \times mn` block. Parameters outside every block (layer norms, a noise
scale, ...) get a diagonal precision :math:`(s\, c + \delta) / T`. Changing
:math:`\delta` or :math:`T` (:meth:`KFACGaussian.with_prior_precision`,
:meth:`KFACGaussian.tempered`) reuses the eigendecompositions, which is what makes
marginal-likelihood tuning of :math:`\delta` cheap. A block takes one isotropic
:math:`\delta`; a weight and a bias with different prior precisions (or one
precision per site, as ``optimize_prior_precision(..., per_site=True)`` tunes them)
need separate weight and bias blocks, :meth:`KFACBlock.split_bias`.

:class:`AutoKFACLaplace` builds such a posterior for a Pyro model whose likelihood is a
``PyroModule`` network (the Pyro path); :func:`pyro_sgmcmc.laplace.module.module_laplace`
with ``structure="kfac"`` for a plain ``nn.Module`` (the PyTorch path).

Examples:
    A K-FAC posterior of a small network, checked against its dense precision:

    >>> import torch
    >>> from pyro_sgmcmc.curvature import kfac_factors
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
    ...                           torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(32, 3), torch.randint(2, (32,))
    >>> factors = kfac_factors(net, [(x, y)], "categorical", variant="ggn")
    >>> q = KFACGaussian(dict(net.named_parameters()), blocks_from_factors(factors),
    ...                  prior_precision=1.0)
    >>> q.sample(5, torch.Generator().manual_seed(0))["0.weight"].shape
    torch.Size([5, 4, 3])
    >>> dense = torch.linalg.inv(q.precision_matrix())
    >>> torch.allclose(q.covariance(), dense, atol=1e-5)
    True
    >>> q2 = q.with_prior_precision(10.0)  # same eigendecompositions
    >>> bool(q2.log_det_precision() > q.log_det_precision())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor, nn

from pyro_sgmcmc.curvature import KFACFactors, _add, _backprop, flatten, unflatten
from pyro_sgmcmc.gaussian import GaussianPosterior
from pyro_sgmcmc.laplace.autoguide import _FIX, AutoLaplace, LaplaceError, LaplaceGuide
from pyro_sgmcmc.laplace.marglik import optimize_prior_precision
from pyro_sgmcmc.laplace.pyro_curvature import (
    CurvatureResult,
    _Accumulator,
    _check_local_latents,
    _chunk_curvature,
    _chunk_sites,
    _chunks,
    _first_indices,
    _ggn_outputs,
    _jacobian_rows,
    _leaves,
    _log_prior_terms,
    _Site,
    _site_rows,
    _weighted,
    model_plate_subsample_size,
)
from pyro_sgmcmc.potential import ModelError, PyroPotential, is_identity_transform

__all__ = ["AutoKFACLaplace", "KFACBlock", "KFACGaussian", "blocks_from_factors"]

Params = dict[str, Tensor]
#: A scalar prior precision, or one per parameter (a scalar, or for parameters with
#: a diagonal precision a tensor shaped like the parameter).
PriorPrecision = float | Tensor | Mapping[str, "float | Tensor"]


class KFACBlock(NamedTuple):
    r"""One Kronecker-factored block: parameters ``weight`` (and ``bias``) with :math:`G \otimes A`.

    The block is over :math:`\tilde W = [W, b]` row-major, :math:`W` being
    ``mean[weight].reshape(m, -1)`` (a ``Conv2d`` kernel flattens as
    ``F.unfold`` does) and ``b`` ``mean[bias]`` of shape ``(m,)`` appended as the
    last column.

    Attributes:
        weight: the key of the weight (any shape with ``m`` rows first).
        bias: the key of the bias, or ``None``.
        A: ``(n, n)``, PSD, :math:`n` = columns of :math:`W` (+1 with a bias).
        G: ``(m, m)``, PSD.
    """

    weight: str
    bias: str | None
    A: Tensor
    G: Tensor

    def split_bias(self) -> tuple[KFACBlock, KFACBlock]:
        r"""Separate weight and bias blocks (dropping their correlation).

        For a weight and a bias with different prior precisions: a Kronecker block
        takes one isotropic :math:`\delta`. The bias becomes a block of its own,
        :math:`G \otimes A_{bb}` over ``(m, 1)``.

        Examples:
            >>> blk = KFACBlock("w", "b", torch.eye(3), torch.eye(2))
            >>> [(k.weight, k.bias, tuple(k.A.shape)) for k in blk.split_bias()]
            [('w', None, (2, 2)), ('b', None, (1, 1))]
        """
        if self.bias is None:
            raise ValueError(f"block of {self.weight!r} has no bias to split off")
        return (
            KFACBlock(self.weight, None, self.A[:-1, :-1], self.G),
            KFACBlock(self.bias, None, self.A[-1:, -1:], self.G),
        )


def blocks_from_factors(
    factors: Mapping[str, KFACFactors], names: Mapping[str, str] | None = None
) -> dict[str, KFACBlock]:
    """Blocks keyed by layer from :func:`~pyro_sgmcmc.curvature.kfac_factors`.

    Args:
        factors: ``{layer name: KFACFactors}``.
        names: layer name -> the prefix of its parameters' keys (default: the layer
            name itself, as in ``module.named_parameters()``); e.g. Pyro site names.

    Examples:
        >>> f = {"fc": KFACFactors(torch.eye(3), torch.eye(2), bias=True)}
        >>> blk = blocks_from_factors(f)["fc"]
        >>> blk.weight, blk.bias
        ('fc.weight', 'fc.bias')
    """
    blocks = {}
    for layer, f in factors.items():
        prefix = layer if names is None else names[layer]
        prefix = f"{prefix}." if prefix else ""
        bias = prefix + "bias" if f.bias else None
        blocks[layer] = KFACBlock(prefix + "weight", bias, f.A, f.G)
    return blocks


class _Eigen(NamedTuple):
    alpha: Tensor  # eigenvalues of A, clamped at 0
    u_a: Tensor
    gamma: Tensor  # eigenvalues of G, clamped at 0
    u_g: Tensor


def _scalar(value: float | Tensor, like: Tensor, what: str) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() != 0:
        raise ValueError(
            f"{what} must be a scalar (a Kronecker block takes one isotropic prior "
            f"precision), got shape {tuple(t.shape)}"
        )
    return t


class KFACGaussian(GaussianPosterior):
    r"""A Gaussian whose precision is Kronecker-factored per layer, diagonal elsewhere.

    See the module docs for the equations. Memory is :math:`O(m^2 + n^2)` per layer and
    :math:`O(P)` for the rest; :meth:`precision_matrix` and :meth:`covariance` are
    dense :math:`(P, P)` and refuse above :attr:`max_dense_params` parameters.

    Args:
        mean: the mean (the MAP), a flat parameter dict; detached and kept as given.
        blocks: ``{name: KFACBlock}``, e.g. :func:`blocks_from_factors`; each
            parameter in at most one block.
        diagonal: the curvature :math:`c \ge 0` of every parameter of ``mean`` not in
            a block, shaped like it (missing ones: zero curvature, the prior only).
        prior_precision: :math:`\delta`: a scalar, or a dict over ``mean``'s keys (a
            scalar per parameter; a tensor shaped like the parameter is allowed
            outside blocks). A block's weight and bias need the same :math:`\delta`
            (else :meth:`KFACBlock.split_bias`). Tensors may require grad: the
            log-determinant and log-density are differentiable in :math:`\delta`.
        curvature_scale: :math:`s`, multiplies every curvature (blocks and diagonal).
        temperature: :math:`T > 0`; the precision is divided by it.

    Raises:
        ValueError: a parameter in two blocks, shapes that do not match ``mean``, or a
            precision that is not positive definite (zero curvature and zero prior).

    Examples:
        >>> mean = {"w": torch.zeros(2, 2), "b": torch.zeros(2), "s": torch.zeros(())}
        >>> blk = KFACBlock("w", "b", A=torch.eye(3), G=2 * torch.eye(2))
        >>> q = KFACGaussian(mean, {"layer": blk}, {"s": torch.tensor(3.0)}, 1.0)
        >>> q.variance()["w"], q.variance()["s"]  # 1 / (2 * 1 + 1), 1 / (3 + 1)
        (tensor([[0.3333, 0.3333],
                [0.3333, 0.3333]]), tensor(0.2500))
        >>> q.tempered(2.0).variance()["s"]
        tensor(0.5000)
    """

    #: Above this many parameters :meth:`precision_matrix` and :meth:`covariance` refuse.
    max_dense_params: int = 20_000

    def __init__(
        self,
        mean: Mapping[str, Tensor],
        blocks: Mapping[str, KFACBlock],
        diagonal: Mapping[str, Tensor] | None = None,
        prior_precision: PriorPrecision = 1.0,
        *,
        curvature_scale: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        self.mean = {k: v.detach().clone() for k, v in mean.items()}
        if not self.mean:
            raise ValueError("mean is empty")
        self.blocks = dict(blocks)
        owner: dict[str, str] = {}
        for name, blk in self.blocks.items():
            if not isinstance(blk, KFACBlock):
                raise TypeError(f"blocks[{name!r}] must be a KFACBlock, got {type(blk)}")
            for key in (blk.weight, blk.bias):
                if key is None:
                    continue
                if key not in self.mean:
                    raise ValueError(f"block {name!r} covers {key!r}, which mean does not have")
                if key in owner:
                    raise ValueError(f"{key!r} is in two blocks, {owner[key]!r} and {name!r}")
                owner[key] = name
            self._check_block(name, blk)
        diagonal = {} if diagonal is None else dict(diagonal)
        for key, c in diagonal.items():
            if key in owner:
                raise ValueError(f"{key!r} has a diagonal curvature and is in block {owner[key]!r}")
            if key not in self.mean or c.shape != self.mean[key].shape:
                want = tuple(self.mean[key].shape) if key in self.mean else "absent from mean"
                raise ValueError(f"diagonal[{key!r}] has shape {tuple(c.shape)}; mean: {want}")
        self.diagonal = {
            k: diagonal[k].detach().clamp_min(0) if k in diagonal else torch.zeros_like(m)
            for k, m in self.mean.items()
            if k not in owner
        }
        if not curvature_scale >= 0:
            raise ValueError(f"curvature_scale must be non-negative, got {curvature_scale}")
        self.curvature_scale = float(curvature_scale)
        self._eigen = {name: self._eigendecompose(blk) for name, blk in self.blocks.items()}
        self._set_hyperparameters(prior_precision, temperature)

    # ------------------------------------------------------------------ construction
    def _check_block(self, name: str, blk: KFACBlock) -> None:
        w = self.mean[blk.weight]
        m = w.shape[0] if w.dim() else 1
        n = w.numel() // m + (blk.bias is not None)
        if blk.G.shape != (m, m) or blk.A.shape != (n, n):
            raise ValueError(
                f"block {name!r}: {blk.weight!r} {tuple(w.shape)}"
                + (f" with bias {blk.bias!r}" if blk.bias else "")
                + f" needs A ({n}, {n}) and G ({m}, {m}); got A {tuple(blk.A.shape)}, "
                f"G {tuple(blk.G.shape)}"
            )
        if blk.bias is not None and self.mean[blk.bias].shape != (m,):
            raise ValueError(
                f"block {name!r}: bias {blk.bias!r} must have shape ({m},), got "
                f"{tuple(self.mean[blk.bias].shape)}"
            )

    @staticmethod
    def _eigendecompose(blk: KFACBlock) -> _Eigen:
        alpha, u_a = torch.linalg.eigh(0.5 * (blk.A + blk.A.T).detach())
        gamma, u_g = torch.linalg.eigh(0.5 * (blk.G + blk.G.T).detach())
        return _Eigen(alpha.clamp_min(0), u_a, gamma.clamp_min(0), u_g)

    def _delta_of(self, key: str) -> Tensor:
        d = self._prior
        value = d.get(key) if isinstance(d, Mapping) else d
        if value is None:
            raise ValueError(f"prior_precision has no entry for {key!r}")
        return torch.as_tensor(value, dtype=self.mean[key].dtype, device=self.mean[key].device)

    def _set_hyperparameters(self, prior_precision: PriorPrecision, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for a Gaussian posterior, got {temperature}")
        if isinstance(prior_precision, Mapping):
            extra = set(prior_precision) - set(self.mean)
            if extra:
                raise ValueError(f"prior_precision has keys that mean does not: {sorted(extra)}")
        self._prior = prior_precision
        self.temperature = float(temperature)
        s, t = self.curvature_scale, self.temperature
        self._block_lambda: dict[str, Tensor] = {}
        for name, blk in self.blocks.items():
            w = self.mean[blk.weight]
            delta = _scalar(self._delta_of(blk.weight), w, f"prior precision of {blk.weight!r}")
            if blk.bias is not None:
                db = _scalar(self._delta_of(blk.bias), w, f"prior precision of {blk.bias!r}")
                if bool(db.detach() != delta.detach()):
                    raise ValueError(
                        f"block {name!r}: {blk.weight!r} and {blk.bias!r} have prior precisions "
                        f"{float(delta):.4g} and {float(db):.4g}; a Kronecker block takes one "
                        "isotropic prior precision: give them the same value, or split the "
                        "block with KFACBlock.split_bias() (dropping their correlation)"
                    )
            eig = self._eigen[name]
            lam = (s * torch.outer(eig.gamma, eig.alpha) + delta) / t
            self._check_positive(lam, f"block {name!r}")
            self._block_lambda[name] = lam
        self._diag_lambda: dict[str, Tensor] = {}
        for key, c in self.diagonal.items():
            delta = self._delta_of(key)
            if delta.dim() and delta.shape != c.shape:
                raise ValueError(
                    f"prior precision of {key!r} must be a scalar or shaped "
                    f"{tuple(c.shape)}, got {tuple(delta.shape)}"
                )
            lam = (s * c + delta) / t
            self._check_positive(lam, repr(key))
            self._diag_lambda[key] = lam.expand_as(c)

    @staticmethod
    def _check_positive(lam: Tensor, where: str) -> None:
        if not bool(torch.all(lam.detach() > 0)):
            raise ValueError(
                f"the precision of {where} is not positive definite (zero curvature and a "
                "zero prior precision): use a positive prior_precision"
            )

    def _replace(self, prior_precision: PriorPrecision, temperature: float) -> KFACGaussian:
        new = object.__new__(KFACGaussian)
        new.__dict__.update(self.__dict__)
        new._set_hyperparameters(prior_precision, temperature)
        return new

    @property
    def prior_precision(self) -> PriorPrecision:
        r"""The prior precision :math:`\delta` as given."""
        return self._prior

    def with_prior_precision(self, prior_precision: PriorPrecision) -> KFACGaussian:
        r"""The same curvature with another :math:`\delta`; eigendecompositions are reused.

        Args:
            prior_precision: as in the constructor (tensors may require grad).
        """
        return self._replace(prior_precision, self.temperature)

    def tempered(self, temperature: float) -> KFACGaussian:
        r"""The Gaussian :math:`\propto q^{1/T}`: temperature multiplied by ``temperature``."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for a Gaussian posterior, got {temperature}")
        return self._replace(self._prior, self.temperature * temperature)

    # ------------------------------------------------------------------ block views
    def _to_block(self, blk: KFACBlock, d: Mapping[str, Tensor], lead: tuple[int, ...]) -> Tensor:
        """``(*lead, m, n)``: :math:`[W, b]` of a dict whose entries carry ``lead`` dims."""
        m = self._eigen_rows(blk)
        w = d[blk.weight].reshape(*lead, m, -1)
        if blk.bias is None:
            return w
        return torch.cat([w, d[blk.bias].reshape(*lead, m, 1)], dim=-1)

    def _from_block(self, blk: KFACBlock, mat: Tensor, out: dict[str, Tensor]) -> None:
        lead = mat.shape[:-2]
        shape = self.mean[blk.weight].shape
        if blk.bias is None:
            out[blk.weight] = mat.reshape(*lead, *shape)
        else:
            out[blk.weight] = mat[..., :-1].reshape(*lead, *shape)
            out[blk.bias] = mat[..., -1]

    def _eigen_rows(self, blk: KFACBlock) -> int:
        return blk.G.shape[0]

    def _map(self, flat: Tensor, block_fn, diag_fn) -> Tensor:
        """Apply per-block and per-diagonal maps to a flat ``(..., P)`` vector."""
        lead = tuple(flat.shape[:-1])
        d = unflatten(flat, self.mean)
        out: dict[str, Tensor] = {}
        for name, blk in self.blocks.items():
            self._from_block(blk, block_fn(name, self._to_block(blk, d, lead)), out)
        for key in self.diagonal:
            out[key] = diag_fn(key, d[key])
        return flatten({k: out[k] for k in self.mean}, len(lead))

    # ------------------------------------------------------------------ GaussianPosterior
    def variance(self) -> Params:
        out: dict[str, Tensor] = {}
        for name, blk in self.blocks.items():
            e = self._eigen[name]
            var = e.u_g.square() @ self._block_lambda[name].reciprocal() @ e.u_a.square().T
            self._from_block(blk, var, out)
        for key, lam in self._diag_lambda.items():
            out[key] = lam.reciprocal()
        return {k: out[k] for k in self.mean}

    def _whitened_to_flat(self, z: Tensor) -> Tensor:
        def block(name: str, zb: Tensor) -> Tensor:
            e = self._eigen[name]
            return e.u_g @ (zb * self._block_lambda[name].rsqrt()) @ e.u_a.T

        return self._map(z, block, lambda key, zd: zd * self._diag_lambda[key].rsqrt())

    def _mahalanobis(self, delta: Tensor) -> Tensor:
        lead = tuple(delta.shape[:-1])
        d = unflatten(delta, self.mean)
        total = delta.new_zeros(lead)
        for name, blk in self.blocks.items():
            e = self._eigen[name]
            rotated = e.u_g.T @ self._to_block(blk, d, lead) @ e.u_a
            total = total + (self._block_lambda[name] * rotated.square()).sum((-2, -1))
        for key, lam in self._diag_lambda.items():
            x = d[key].reshape(*lead, -1)
            total = total + (lam.reshape(-1) * x.square()).sum(-1)
        return total

    def log_det_precision(self) -> Tensor:
        terms = [lam.log().sum() for lam in self._block_lambda.values()]
        terms += [lam.log().sum() for lam in self._diag_lambda.values()]
        return torch.stack(terms).sum()

    def _block_indices(self) -> dict[str, Tensor]:
        """Each block's positions in :func:`flatten` order, ``[W, b]`` row-major."""
        offsets, start = {}, 0
        for k, m in self.mean.items():
            offsets[k] = start
            start += m.numel()
        idx = {}
        for name, blk in self.blocks.items():
            m = self._eigen_rows(blk)
            n_w = self.mean[blk.weight].numel() // m
            w = offsets[blk.weight] + torch.arange(m * n_w).reshape(m, n_w)
            if blk.bias is not None:
                w = torch.cat([w, (offsets[blk.bias] + torch.arange(m)).unsqueeze(1)], dim=1)
            idx[name] = w.reshape(-1)
        return idx

    def _dense(self, power: int) -> Tensor:
        p = self.num_params
        if p > self.max_dense_params:
            raise ValueError(
                f"a dense ({p}, {p}) matrix is too large (KFACGaussian.max_dense_params = "
                f"{self.max_dense_params}); use variance(), sample() or log_prob(), which "
                "stay per layer"
            )
        ref = next(iter(self.mean.values()))
        dense = torch.zeros(p, p, dtype=ref.dtype, device=ref.device)
        idx = self._block_indices()
        for name in self.blocks:
            e = self._eigen[name]
            u = torch.kron(e.u_g, e.u_a)
            lam = self._block_lambda[name].detach().reshape(-1) ** power
            i = idx[name].to(ref.device)
            dense[i[:, None], i[None, :]] = (u * lam) @ u.T
        start = 0
        for k, m in self.mean.items():
            if k in self._diag_lambda:
                i = torch.arange(start, start + m.numel(), device=ref.device)
                dense[i, i] = self._diag_lambda[k].detach().reshape(-1) ** power
            start += m.numel()
        return dense

    def precision_matrix(self) -> Tensor:
        """The dense :math:`(P, P)` precision over :func:`flatten` order (small models)."""
        return self._dense(1)

    def covariance(self) -> Tensor:
        """The dense :math:`(P, P)` covariance over :func:`flatten` order (small models)."""
        return self._dense(-1)

    def __repr__(self) -> str:
        return (
            f"KFACGaussian(num_params={self.num_params}, blocks={list(self.blocks)}, "
            f"temperature={self.temperature:g})"
        )


# ---------------------------------------------------------------------- Pyro autoguide
class _KFACLayer(NamedTuple):
    module: nn.Linear
    weight: str  # the weight's sample site
    bias: str | None  # the bias's sample site (None: the bias is not a latent)


def _site_name(layer: nn.Module, attr: str) -> str:
    prefix = layer.__dict__.get("_pyro_name", "")
    return f"{prefix}.{attr}" if prefix else attr


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
        seed: seed of the Monte Carlo draws.
        init_loc_fn: Pyro init strategy of the MAP's starting point.

    Attributes:
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
            seed=seed,
            init_loc_fn=init_loc_fn,
        )
        self._network = (network,)  # a tuple: never registered as a submodule
        self.kfac_layers: dict[str, tuple[str, str | None]] = {}

    # ------------------------------------------------------------------ layers and priors
    def _layers(self, pot: PyroPotential, phi: Mapping[str, Tensor]) -> dict[str, _KFACLayer]:
        """The network's Linear layers whose weight is a real-valued latent of the model."""
        layers = {}
        for name, m in self._network[0].named_modules():
            if not isinstance(m, nn.Linear) or "weight" not in m.__dict__.get("_pyro_samples", {}):
                continue
            w = _site_name(m, "weight")
            if w not in phi or not is_identity_transform(pot._to_constrained[w]):
                continue  # not a latent here, or constrained: its own diagonal
            if phi[w].shape != (m.out_features, m.in_features):
                raise ModelError(
                    f"site '{w}' has shape {tuple(phi[w].shape)}, but layer '{name}' needs "
                    f"({m.out_features}, {m.in_features}): sample each weight once, with "
                    "that shape (PyroSample(prior.expand([out, in]).to_event(2)))"
                )
            b = _site_name(m, "bias") if "bias" in m.__dict__["_pyro_samples"] else None
            if b is not None and (
                b not in phi or not is_identity_transform(pot._to_constrained[b])
            ):
                b = None
            layers[name] = _KFACLayer(m, w, b)
        if not layers:
            raise ModelError(
                "the network has no nn.Linear layer with a real-valued PyroSample weight "
                "among the model's latent sites: AutoKFACLaplace has nothing to factor "
                "(use AutoDiagonalLaplace)"
            )
        return layers

    def _model_prior(
        self, pot: PyroPotential, phi: Mapping[str, Tensor], block_sites: set[str]
    ) -> dict[str, Tensor]:
        r"""The model prior's precision per site: a scalar for block sites, else a diagonal.

        Block sites: :math:`H_{ss}\mathbf 1` and one Rademacher probe (two
        Hessian-vector products) check that the prior Hessian is diagonal and constant
        there. Other sites: the exact diagonal.
        """
        leaves = _leaves(phi)
        first = next(iter(leaves.values()))
        trace = pot._trace(leaves, _first_indices(pot, first.device))
        lp = _log_prior_terms(pot, leaves, trace)
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
            for start, stop, jac in _jacobian_rows(flat, rest):
                r = torch.arange(stop - start)
                diag[start:stop] = jac[r, start + r]
            out.update(unflatten(diag, rest))
        return {k: out[k] for k in names}

    # ------------------------------------------------------------------ the data pass
    def _columns(
        self,
        site: _Site,
        plate: str | None,
        weights: Tensor | None,
        gen: torch.Generator,
        methods: dict[str, str],
    ) -> tuple[Tensor, Tensor] | None:
        """``(target, cotangents (R, *target.shape))`` of one observed site's curvature."""
        fn = site.site["fn"]
        if self.curvature == "ggn":
            closed = _ggn_outputs(site, plate)
            if closed == "constant":
                methods.setdefault(site.name, "ggn")
                return None
            if closed is not None:
                methods[site.name] = "ggn"
                values, factor = closed  # (b, m, k), (b, m, k, r)
                if weights is not None and site.inside and values.shape[0] == weights.numel():
                    factor = factor * weights.to(factor.dtype)[:, None, None, None]
                return values, factor.movedim(-1, 0)
        methods[site.name] = "fisher"
        seed = int(torch.randint(2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            ys = fn.sample((self.num_samples,))
        with pyro.validation_enabled(False):
            lp = fn.log_prob(ys)
        rows = _site_rows(site, plate, lp, sample_dims=1)  # (S, b)
        rows = _weighted(rows, weights, site) / math.sqrt(self.num_samples)
        if not rows.requires_grad:
            return None
        s = self.num_samples
        eye = torch.eye(s, dtype=rows.dtype, device=rows.device)
        return rows, eye[:, :, None].expand(s, s, rows.shape[-1])

    def _data_pass(
        self, pot: PyroPotential, phi: Mapping[str, Tensor], layers: dict[str, _KFACLayer]
    ) -> tuple[dict[str, KFACBlock], dict[str, Tensor], Tensor, dict[str, str]]:
        """K-FAC factors of the layers and the diagonal of the rest, over every plate index."""
        if pot.plate_name is None:
            raise ModelError(
                "AutoKFACLaplace needs a data plate: write the likelihood as `with "
                "pyro.plate('data', N) as idx: pyro.sample('obs', ..., obs=y[idx])`"
            )
        leaves = _leaves(phi)
        first = next(iter(leaves.values()))
        in_blocks = {k for lay in layers.values() for k in (lay.weight, lay.bias) if k}
        others = {k: v for k, v in leaves.items() if k not in in_blocks}
        acc = (
            _Accumulator("diag", sum(v.numel() for v in others.values()), first.detach())
            if others
            else None
        )
        captured: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

        def hook(name: str) -> Callable:
            def record(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
                if name in captured:
                    raise ModelError(
                        f"layer '{name}' ran twice in one model call: K-FAC needs each "
                        "layer to run once, on the plate's minibatch"
                    )
                captured[name] = (args[0].detach(), output, layer.weight)
                return output.clone()  # in-place ops downstream must not touch `output`

            return record

        a_sums: dict[str, Tensor] = {}
        g_sums: dict[str, Tensor] = {}
        methods: dict[str, str] = {}
        log_lik = first.new_zeros(())
        num_data = first.new_zeros(())
        gen = torch.Generator().manual_seed(self.seed)
        fixed = model_plate_subsample_size(pot)
        handles = [lay.module.register_forward_hook(hook(n)) for n, lay in layers.items()]
        try:
            for c, (idx, weights) in enumerate(_chunks(pot, self.batch_size, first.device, fixed)):
                captured.clear()
                trace = pot._trace(leaves, idx)
                if c == 0:
                    _check_local_latents(pot, trace)
                sites = _chunk_sites(pot, trace, first=c == 0)
                b = idx.numel()
                w = first.new_ones(b) if weights is None else weights.to(first.dtype)
                num_data = num_data + w.sum()
                names = [n for n in layers if n in captured]
                for n in names:
                    lay = layers[n]
                    a, _, used = captured[n]
                    if c == 0 and not torch.equal(used, trace.nodes[lay.weight]["value"]):
                        raise ModelError(
                            f"layer '{n}' did not run with the value of site '{lay.weight}'"
                        )
                    if a.dim() < 2 or a.shape[0] != b:
                        raise ModelError(
                            f"layer '{n}' got an input of shape {tuple(a.shape)} for a chunk of "
                            f"{b} plate indices: run the network on the plate's minibatch "
                            "(x[idx]), with the data first"
                        )
                    rows = a.reshape(b, -1, a.shape[-1])
                    if lay.bias is not None:
                        rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=-1)
                    weighted = (rows * w[:, None, None]).reshape(-1, rows.shape[-1])
                    a_sums[n] = _add(a_sums.get(n), weighted.T @ rows.reshape(-1, rows.shape[-1]))
                if names:
                    outputs = [captured[n][1] for n in names]
                    for target, cot in self._site_columns(sites, pot, weights, gen, methods):
                        grads = _backprop(target, outputs, cot)
                        for n, g in zip(names, grads, strict=True):
                            g = g.detach().reshape(-1, g.shape[-1])
                            g_sums[n] = _add(g_sums.get(n), g.T @ g)
                if acc is not None:
                    kind = "fisher" if self.curvature == "fisher" else self.curvature
                    ll = _chunk_curvature(
                        pot, others, sites, weights, kind, acc, self.num_samples, gen, {}
                    )
                else:
                    with pyro.validation_enabled(False):
                        ll = sum(
                            _weighted(
                                _site_rows(
                                    s, pot.plate_name, s.site["fn"].log_prob(s.site["value"])
                                ),
                                weights,
                                s,
                            ).sum()
                            for s in sites
                        )
                log_lik = log_lik + torch.as_tensor(ll).detach()
        finally:
            for h in handles:
                h.remove()
            captured.clear()
        blocks = {}
        for n, lay in layers.items():
            m = lay.module.out_features
            cols = lay.module.in_features + (lay.bias is not None)
            A = a_sums.get(n, first.new_zeros(cols, cols)) / num_data
            G = g_sums.get(n, first.new_zeros(m, m))
            blocks[n] = KFACBlock(lay.weight, lay.bias, A.detach(), G.detach())
        diagonal = unflatten(acc.value, others) if acc is not None else {}
        return blocks, diagonal, log_lik, methods

    def _site_columns(self, sites, pot, weights, gen, methods):
        """``(target, cotangents)`` pairs whose backprops give the g's of every site."""
        if self.curvature == "ef":
            per_datum = None
            for s in sites:
                methods[s.name] = "ef"
                if not s.inside:
                    continue  # a site outside the plate has no per-datum rows
                with pyro.validation_enabled(False):
                    lp = s.site["fn"].log_prob(s.site["value"])
                rows = _weighted(_site_rows(s, pot.plate_name, lp), weights, s)
                per_datum = rows if per_datum is None else per_datum + rows
            if per_datum is not None and per_datum.requires_grad:
                yield per_datum, torch.ones_like(per_datum).unsqueeze(0)
            return
        for s in sites:
            cols = self._columns(s, pot.plate_name, weights, gen, methods)
            if cols is not None:
                yield cols

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
        layers = self._layers(pot, phi)
        blocks, diagonal, log_lik, methods = self._data_pass(pot, phi, layers)
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
            raise LaplaceError(f"{e}. {_FIX}") from e
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
