r"""The split of predictive uncertainty into aleatoric and epistemic parts."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import (
    Distribution,
)

from pyro_sgmcmc.likelihoods import (
    Likelihood,
    as_likelihood,
    distribution_members,
)

__all__ = ["Uncertainty", "decompose_uncertainty"]


class Uncertainty(NamedTuple):
    """Predictive uncertainty, ``total = aleatoric + epistemic``, per prediction.

    Entropies in nats for ``bernoulli`` and ``categorical``, variances for ``normal``
    and ``poisson``; each of shape ``(B, ...)`` (no draw or class dimension).

    Attributes:
        total: of the mixture predictive: the entropy of the mean probabilities, or the
            total variance.
        aleatoric: the members' own (expected) uncertainty.
        epistemic: the members' disagreement: the mutual information, or the variance
            of the members' means; never negative.
    """

    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def _entropy_terms(log_p: Tensor) -> tuple[Tensor, Tensor]:
    r"""Aleatoric and epistemic parts from member log-probabilities ``(S, ..., C)``.

    The epistemic part is computed as :math:`\frac1S \sum_s \mathrm{KL}(p_s \,\|\, \bar p)`
    (equal to the mutual information) with :math:`\log \bar p` taken relative to the
    members' maximum, so that identical members give exactly 0.
    """

    def plogq(p: Tensor, log_q: Tensor) -> Tensor:
        return torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0

    p = log_p.exp()
    ref = log_p.amax(0)
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
    log_mean = ref + (log_p - ref).exp().mean(0).log()
    aleatoric = 0.0 - plogq(p, log_p).mean(0)  # 0.0 - 0.0 is +0.0, not -0.0
    epistemic = plogq(p, log_p - log_mean).mean(0).clamp_min(0)
    return aleatoric, epistemic


def decompose_uncertainty(
    members: Tensor | Distribution,
    likelihood: str | Likelihood | None = None,
    *,
    variances: Tensor | float | None = None,
    logits: bool = False,
) -> Uncertainty:
    r"""Split predictive uncertainty into aleatoric and epistemic parts.

    The members are :math:`S` equally weighted predictive distributions (the first
    dimension): SGMCMC samples, ensemble members, draws of a Laplace/VI posterior, or
    draws of a linearised predictive (:meth:`FunctionGaussian.sample`). Classification
    (entropies, nats): total :math:`\mathbb H[\bar p]`, aleatoric
    :math:`\frac1S\sum_s \mathbb H[p_s]`, epistemic the mutual information, their
    difference. Regression (variances): aleatoric :math:`\frac1S\sum_s v_s`, epistemic
    :math:`\frac1S\sum_s (m_s - \bar m)^2` (the mixture's law of total variance, so
    with divisor :math:`S`); for ``poisson`` :math:`v_s = m_s` (the rates). See the
    module docs for the equations.

    Args:
        members: per-member predictions with the members first, ``(S, B, ...)``. With
            a ``likelihood``: probabilities (``categorical``: classes last;
            ``bernoulli``: of :math:`y = 1`), means (``normal``) or rates
            (``poisson``), or with ``logits=True`` the natural parameters (logits,
            log-rates) as :func:`mc_predictive` returns them. Or a
            ``torch.distributions`` ``Bernoulli``, ``Categorical``, ``Normal`` or
            ``Poisson`` with batch shape ``(S, B, ...)``, e.g. from
            :func:`pyro_predictive_distributions` (then no ``likelihood``).
        likelihood: ``"bernoulli"``, ``"categorical"``, ``"normal"`` or ``"poisson"``
            (or a :class:`~pyro_sgmcmc.curvature.Likelihood`).
        variances: the members' noise variances for ``normal``, broadcastable to
            ``members``; defaults to ``scale**2`` of a ``Likelihood("normal", scale)``.
        logits: ``members`` are natural parameters, not probabilities/rates.

    Returns:
        :class:`Uncertainty` ``(total, aleatoric, epistemic)``, each ``(B, ...)``.

    Examples:
        Two confident members that disagree: all the uncertainty is epistemic.

        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, B=1, C=2)
        >>> decompose_uncertainty(probs, "categorical")
        Uncertainty(total=tensor([0.6931]), aleatoric=tensor([0.]), epistemic=tensor([0.6931]))
        >>> means, noise = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])
        >>> decompose_uncertainty(means, Likelihood("normal"), variances=noise)
        Uncertainty(total=tensor([2.]), aleatoric=tensor([1.]), epistemic=tensor([1.]))
    """
    if isinstance(members, Distribution):
        if likelihood is not None or variances is not None or logits:
            raise ValueError(
                "members is a distribution: its family sets the likelihood; pass no "
                "likelihood, variances or logits"
            )
        values, lik, noise = distribution_members(members)
        return decompose_uncertainty(values, lik, variances=noise)
    if likelihood is None:
        raise ValueError(
            "pass the likelihood ('bernoulli', 'categorical', 'normal', 'poisson') that "
            "members are predictions of, or members as a torch distribution"
        )
    lik = as_likelihood(likelihood, need_scale=False)
    if variances is not None and lik.name != "normal":
        raise ValueError(f"variances apply to normal members only, not {lik.name}")
    if not isinstance(members, Tensor) or members.dim() < 2:
        got = tuple(members.shape) if isinstance(members, Tensor) else type(members).__name__
        raise ValueError(f"members must be a tensor (S, B, ...) with the members first, got {got}")
    if lik.name == "categorical" and members.dim() < 3:
        raise ValueError(
            f"categorical members must be (S, B, ..., C), classes last; got {tuple(members.shape)}"
        )
    if lik.name == "categorical":
        if logits:
            log_p = members.log_softmax(-1)
        else:
            _check_probs(members, simplex=True)
            log_p = members.log()
        aleatoric, epistemic = _entropy_terms(log_p)
    elif lik.name == "bernoulli":
        if logits:
            log_p = torch.stack([F.logsigmoid(members), F.logsigmoid(-members)], -1)
        else:
            _check_probs(members, simplex=False)
            log_p = torch.stack([members.log(), torch.log1p(-members)], -1)
        aleatoric, epistemic = _entropy_terms(log_p)
    else:
        means = members.exp() if (logits and lik.name == "poisson") else members
        if lik.name == "poisson":
            v = means
        elif variances is not None:
            v = torch.as_tensor(variances, dtype=means.dtype, device=means.device)
            try:
                v = v.expand_as(means)
            except RuntimeError as err:
                raise ValueError(
                    f"variances must broadcast to members {tuple(means.shape)}, got "
                    f"{tuple(v.shape)}"
                ) from err
        elif isinstance(likelihood, Likelihood):
            v = torch.full_like(means, lik.scale**2)
        else:
            raise ValueError(
                "normal members need their noise: pass variances= (per member, or one "
                "value) or Likelihood('normal', scale=s)"
            )
        aleatoric = v.mean(0)
        dev = means - means[:1]  # centred on a member: identical members give exactly 0
        epistemic = (dev - dev.mean(0)).square().mean(0)
        return Uncertainty(aleatoric + epistemic, aleatoric, epistemic)
    return Uncertainty(aleatoric + epistemic, aleatoric, epistemic)


def _check_probs(p: Tensor, simplex: bool) -> None:
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(
            "members must be probabilities in [0, 1]; pass logits=True for logits (e.g. the "
            "outputs of mc_predictive)"
        )
    if simplex:
        tol = 1e-3 if p.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6
        if not bool(((p.sum(-1) - 1).abs() <= tol).all()):
            raise ValueError(
                "categorical members must sum to 1 over the last (class) dimension; pass "
                "logits=True for logits"
            )
