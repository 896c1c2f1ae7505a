r"""Kronecker-factored (K-FAC) Gaussian posteriors, for ``nn.Module``\ s and Pyro networks.

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

:class:`~pyro_sgmcmc.laplace.kfac.AutoKFACLaplace` builds such a posterior for a Pyro
model whose likelihood is a ``PyroModule`` network (the Pyro path);
:func:`pyro_sgmcmc.laplace.module.module_laplace` with ``structure="kfac"`` for a plain
``nn.Module`` (the PyTorch path).

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

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_sgmcmc.curvature.kfac import KFACFactors
from pyro_sgmcmc.gaussian.base import GaussianPosterior, Params
from pyro_sgmcmc.tree import flatten, unflatten

__all__ = ["KFACBlock", "KFACGaussian", "PriorPrecision", "blocks_from_factors"]

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


def _check_block(name: str, blk: KFACBlock, mean: Mapping[str, Tensor]) -> None:
    """Raise unless ``blk``'s factors and bias fit its weight's shape in ``mean``."""
    w = mean[blk.weight]
    m = w.shape[0] if w.dim() else 1
    n = w.numel() // m + (blk.bias is not None)
    if blk.G.shape != (m, m) or blk.A.shape != (n, n):
        raise ValueError(
            f"block {name!r}: {blk.weight!r} {tuple(w.shape)}"
            + (f" with bias {blk.bias!r}" if blk.bias else "")
            + f" needs A ({n}, {n}) and G ({m}, {m}); got A {tuple(blk.A.shape)}, "
            f"G {tuple(blk.G.shape)}"
        )
    if blk.bias is not None and mean[blk.bias].shape != (m,):
        raise ValueError(
            f"block {name!r}: bias {blk.bias!r} must have shape ({m},), got "
            f"{tuple(mean[blk.bias].shape)}"
        )


def _eigendecompose(blk: KFACBlock) -> _Eigen:
    alpha, u_a = torch.linalg.eigh(0.5 * (blk.A + blk.A.T).detach())
    gamma, u_g = torch.linalg.eigh(0.5 * (blk.G + blk.G.T).detach())
    return _Eigen(alpha.clamp_min(0), u_a, gamma.clamp_min(0), u_g)


def _check_positive(lam: Tensor, where: str) -> None:
    if not bool(torch.all(lam.detach() > 0)):
        raise ValueError(
            f"the precision of {where} is not positive definite (zero curvature and a "
            "zero prior precision): use a positive prior_precision"
        )


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
            _check_block(name, blk, self.mean)
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
        self._eigen = {name: _eigendecompose(blk) for name, blk in self.blocks.items()}
        self._set_hyperparameters(prior_precision, temperature)

    # ------------------------------------------------------------------ construction
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
            _check_positive(lam, f"block {name!r}")
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
            _check_positive(lam, repr(key))
            self._diag_lambda[key] = lam.expand_as(c)

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
