r"""The likelihood families, in one table.

:class:`Likelihood` is a family in its natural parameter (the output of a network or a
linear model): per-example log-density, sampling, the output Hessian and its factor,
used by the curvature, Laplace, EKF and predictive code. The functional
log-likelihoods of the PyTorch path (:func:`bernoulli_log_likelihood`, ...) and the
recognition of ``torch.distributions`` / Pyro observation distributions (their family
and parameters, the closed-form Fisher factor of each) live here too, so that every
module reads one table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal, Poisson

__all__ = [
    "LIKELIHOODS",
    "PYRO_FAMILIES",
    "Likelihood",
    "LogLikelihood",
    "as_likelihood",
    "bernoulli_log_likelihood",
    "categorical_log_likelihood",
    "distribution_members",
    "fisher_factor",
    "match_target",
    "mean_parameter",
    "normal_log_likelihood",
    "observation_family",
    "observation_parameters",
    "per_example_sum",
    "unwrap_observation",
]

#: ``(output, y) -> per-example log-likelihoods of shape (B,)``.
LogLikelihood = Callable[[Tensor, Tensor], Tensor]

LIKELIHOODS = ("bernoulli", "categorical", "normal", "poisson")


@dataclass(frozen=True)
class Likelihood:
    r"""A likelihood in its natural parameter: log-density, sampler and output Hessian.

    Outputs have the batch first. ``bernoulli``, ``normal`` and ``poisson`` act
    elementwise on outputs of any shape ``(B, ...)``, with targets of the same shape;
    ``categorical`` takes logits ``(B, ..., C)`` (classes last) and integer labels
    ``(B, ...)``. Extra dimensions are independent and summed per example.

    Args:
        name: ``"bernoulli"``, ``"categorical"``, ``"normal"`` or ``"poisson"``.
        scale: the noise standard deviation :math:`s` of ``"normal"`` (ignored otherwise).

    Examples:
        >>> lik = Likelihood("normal", scale=0.5)
        >>> lik.hessian_mvp(torch.zeros(2, 1), torch.ones(2, 1))  # H = 1 / s^2
        tensor([[4.],
                [4.]])
        >>> Likelihood("categorical").log_prob(torch.zeros(1, 4), torch.tensor([2]))
        tensor([-1.3863])
    """

    name: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.name!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    def _target(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "categorical":
            if y.is_floating_point() or out.shape[:-1] != y.shape:
                raise ValueError(
                    f"categorical needs integer labels of shape {tuple(out.shape[:-1])} "
                    f"for logits {tuple(out.shape)} (classes last), got {y.dtype} "
                    f"{tuple(y.shape)}"
                )
            return y
        if y.shape != out.shape:
            if y.numel() != out.numel() or y.shape[:1] != out.shape[:1]:
                raise ValueError(
                    f"{self.name}: output shape {tuple(out.shape)} does not match the "
                    f"target shape {tuple(y.shape)}"
                )
            y = y.reshape(out.shape)  # a (B, 1) head against (B,) targets
        return y.to(out.dtype)

    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-example log-likelihoods ``(B,)`` of targets ``y`` given outputs ``out``."""
        y = self._target(out, y)
        if self.name == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(out, y, reduction="none")
        elif self.name == "categorical":
            lp = out.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        elif self.name == "normal":
            lp = (
                -0.5 * ((y - out) / self.scale) ** 2
                - math.log(self.scale)
                - 0.5 * math.log(2 * math.pi)
            )
        else:
            lp = y * out - out.exp() - torch.lgamma(y + 1)
        return lp.reshape(lp.shape[0], -1).sum(1)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One target per example drawn from the model given outputs ``out``."""
        out = out.detach()
        if self.name == "bernoulli":
            return torch.bernoulli(torch.sigmoid(out), generator=generator)
        if self.name == "categorical":
            p = out.softmax(-1).reshape(-1, out.shape[-1])
            return torch.multinomial(p, 1, generator=generator).reshape(out.shape[:-1])
        if self.name == "normal":
            return out + self.scale * torch.randn(
                out.shape, generator=generator, dtype=out.dtype, device=out.device
            )
        return torch.poisson(out.exp(), generator=generator)

    def _elementwise_hessian(self, out: Tensor) -> Tensor:
        if self.name == "bernoulli":
            return torch.sigmoid(out) * torch.sigmoid(-out)  # p(1 - p), stable in the tails
        if self.name == "normal":
            return torch.full_like(out, 1.0 / self.scale**2)
        return out.exp()

    def hessian_mvp(self, out: Tensor, u: Tensor) -> Tensor:
        r""":math:`H u` per example, with ``u`` shaped ``out.shape + (R,)`` or ``out.shape``.

        For ``categorical``, :math:`Hu = p \odot u - p\,(p^\top u)` per class vector:
        :math:`O(C)` memory, never the :math:`C \times C` matrix.
        """
        out = out.detach()
        squeeze = u.shape == out.shape
        if squeeze:
            u = u.unsqueeze(-1)
        if self.name == "categorical":
            p = out.softmax(-1).unsqueeze(-1)
            hu = p * u - p * (p * u).sum(-2, keepdim=True)
        else:
            hu = self._elementwise_hessian(out).unsqueeze(-1) * u
        return hu.squeeze(-1) if squeeze else hu

    def hessian_factor(self, out: Tensor) -> Tensor:
        r"""Columns :math:`L_r`, shape ``(R,) + out.shape``, with :math:`\sum_r L_r L_r^\top = H`.

        :math:`R` is the number of outputs per example. Elementwise likelihoods have
        :math:`L_r = \sqrt{h_r}\, e_r`; ``categorical`` has :math:`L_c = \sqrt{p_c}\,
        (e_c - p)` per class vector, since :math:`\sum_c p_c (e_c - p)(e_c - p)^\top =
        \mathrm{diag}(p) - pp^\top`.
        """
        out = out.detach()
        b = out.shape[0]
        if self.name == "categorical":
            c = out.shape[-1]
            m = out[0].numel() // c
            p = out.softmax(-1).reshape(b, m, c)
            eye_c = torch.eye(c, dtype=out.dtype, device=out.device)
            block = p.sqrt().unsqueeze(-1) * (eye_c - p.unsqueeze(-2))  # (B, M, C_col, C)
            eye_m = torch.eye(m, dtype=out.dtype, device=out.device)
            cols = torch.einsum("nm,bmcd->ncbmd", eye_m, block)
            return cols.reshape(m * c, *out.shape)
        k = out[0].numel()
        eye = torch.eye(k, dtype=out.dtype, device=out.device).reshape(k, 1, *out.shape[1:])
        return eye * self._elementwise_hessian(out).sqrt().unsqueeze(0)


def as_likelihood(likelihood: str | Likelihood, *, need_scale: bool = False) -> Likelihood:
    """A :class:`Likelihood` from itself or its name.

    Args:
        likelihood: a :class:`Likelihood` or one of :data:`LIKELIHOODS`.
        need_scale: refuse the bare name ``"normal"`` (scale 1), where the Gaussian's
            noise must be explicit because it is added to a predictive.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(
            f"likelihood must be a name {LIKELIHOODS} or a Likelihood, got {type(likelihood)}"
        )
    if likelihood == "normal" and need_scale:
        raise ValueError(
            "the normal likelihood's noise is part of the predictive: pass "
            "Likelihood('normal', scale=s) with the noise standard deviation s "
            "(scale=1.0 if that is what you mean)"
        )
    return Likelihood(likelihood)


def mean_parameter(lik: Likelihood, out: Tensor) -> Tensor:
    """The likelihood's mean parameter: probabilities, the mean, or the rate."""
    if lik.name == "bernoulli":
        return torch.sigmoid(out)
    if lik.name == "categorical":
        return out.softmax(-1)
    if lik.name == "poisson":
        return out.exp()
    return out


# ---------------------------------------------------------------------- closed-form Fisher
def unwrap_observation(fn):
    """The base distribution under ``Independent``/``Expanded`` wrappers (None if masked)."""
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            return None
        if isinstance(fn, (torch.distributions.Independent, ExpandedDistribution)):
            fn = fn.base_dist
            continue
        return fn


def _chol2(f11: Tensor, f12: Tensor, f22: Tensor) -> Tensor:
    """Lower Cholesky factors ``(..., 2, 2)`` of 2x2 Fisher blocks."""
    l11 = f11.clamp_min(0).sqrt()
    l21 = f12 / l11.clamp_min(torch.finfo(l11.dtype).tiny)
    l22 = (f22 - l21.square()).clamp_min(0).sqrt()
    zero = torch.zeros_like(l11)
    return torch.stack([torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)], -2)


def observation_family(base) -> tuple[str, list[Tensor], list[Tensor]] | None:
    """``(name, parameters, fixed)``: the differentiated parameters and fixed extras."""
    D = torch.distributions
    if isinstance(base, D.Bernoulli):
        return "bernoulli", [base.logits], []
    if isinstance(base, D.Binomial):
        return "binomial", [base.logits], [base.total_count]
    if isinstance(base, (D.Categorical, D.OneHotCategorical)):
        return "categorical", [base.logits], []
    if isinstance(base, (D.Normal, D.LogNormal)):
        return "normal", [base.loc, base.scale], []
    if isinstance(base, D.Poisson):
        return "poisson", [base.rate], []
    if isinstance(base, D.Exponential):
        return "exponential", [base.rate], []
    if isinstance(base, D.Gamma):
        return "gamma", [base.concentration, base.rate], []
    if isinstance(base, D.Beta):
        return "beta", [base.concentration1, base.concentration0], []
    return None


def fisher_factor(name: str, v: Tensor, fixed: list[Tensor]) -> Tensor:
    r"""``L`` with :math:`LL^\top = F` per element: values ``(..., k) -> (..., k, r)``."""
    v = v.detach()
    tiny = torch.finfo(v.dtype).tiny
    if name == "bernoulli":
        return (torch.sigmoid(v) * torch.sigmoid(-v)).sqrt().unsqueeze(-1)
    if name == "binomial":
        n = fixed[0].detach().to(v.dtype)
        return (n * torch.sigmoid(v[..., 0]) * torch.sigmoid(-v[..., 0])).sqrt()[..., None, None]
    if name == "categorical":
        p = v.softmax(-1)
        eye = torch.eye(p.shape[-1], dtype=v.dtype, device=v.device)
        # column c is sqrt(p_c) (e_c - p): sum_c L_c L_c^T = diag(p) - p p^T
        return (eye - p.unsqueeze(-1)) * p.sqrt().unsqueeze(-2)
    if name == "normal":
        inv = 1.0 / v[..., 1].clamp_min(tiny)
        return torch.diag_embed(torch.stack([inv, math.sqrt(2.0) * inv], -1))
    if name == "poisson":
        return v[..., 0].clamp_min(tiny).rsqrt()[..., None, None]
    if name == "exponential":
        return (1.0 / v[..., 0].clamp_min(tiny))[..., None, None]
    if name == "gamma":
        a, b = v[..., 0], v[..., 1]
        return _chol2(torch.polygamma(1, a), -1.0 / b, a / b.square())
    if name == "beta":
        a, b = v[..., 0], v[..., 1]
        ab = torch.polygamma(1, a + b)
        return _chol2(torch.polygamma(1, a) - ab, -ab, torch.polygamma(1, b) - ab)
    raise AssertionError(name)


# ------------------------------------------------------------ functional log-likelihoods
def per_example_sum(ll: Tensor) -> Tensor:
    """Sum every dimension but the batch's: one log-likelihood per example."""
    return ll.reshape(ll.shape[0], -1).sum(1) if ll.dim() != 1 else ll


def match_target(output: Tensor, y: Tensor, name: str) -> Tensor:
    """``output`` in ``y``'s shape; a ``(B, 1)`` head against ``(B,)`` targets is reshaped,
    because broadcasting the two would silently give a ``(B, B)`` likelihood."""
    if output.shape == y.shape:
        return output
    if output.numel() == y.numel() and output.shape[:1] == y.shape[:1]:
        return output.reshape(y.shape)
    raise ValueError(
        f"{name}: output shape {tuple(output.shape)} does not match target shape "
        f"{tuple(y.shape)}: make the module return one value per target (or use "
        "output_transform=... to reshape it)"
    )


def bernoulli_log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
    """Bernoulli log-likelihood of 0/1 targets ``y`` given ``logits``, per example.

    Extra dimensions (multi-label targets) are summed per example.

    Examples:
        >>> bernoulli_log_likelihood(torch.zeros(2, 1), torch.tensor([0.0, 1.0]))
        tensor([-0.6931, -0.6931])
    """
    logits = match_target(logits, y, "bernoulli_log_likelihood")
    y = y.to(logits.dtype)
    return per_example_sum(-F.binary_cross_entropy_with_logits(logits, y, reduction="none"))


def categorical_log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
    """Categorical log-likelihood of integer labels ``y`` given ``logits``, per example.

    ``logits`` has the classes last, ``(B, ..., C)``, and ``y`` the shape ``(B, ...)``;
    extra dimensions (tokens of a sequence) are summed per example.

    Examples:
        >>> categorical_log_likelihood(torch.zeros(2, 4), torch.tensor([0, 3]))
        tensor([-1.3863, -1.3863])
    """
    if y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"categorical_log_likelihood needs integer class labels, got {y.dtype}: pass y.long()"
        )
    if logits.shape[:-1] != y.shape:
        raise ValueError(
            f"categorical_log_likelihood: logits of shape {tuple(logits.shape)} need labels "
            f"of shape {tuple(logits.shape[:-1])} (classes last), got {tuple(y.shape)}"
        )
    ll = logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return per_example_sum(ll)


def normal_log_likelihood(scale: float | Tensor) -> LogLikelihood:
    """Gaussian log-likelihood ``Normal(output, scale).log_prob(y)`` with known noise scale.

    Args:
        scale: the observation noise standard deviation (a positive float, or a tensor
            that broadcasts against the targets).

    Returns:
        ``(output, y) -> (B,)`` per-example log-likelihoods, extra dimensions summed.

    Examples:
        >>> ll = normal_log_likelihood(1.0)
        >>> ll(torch.zeros(2, 1), torch.tensor([0.0, 1.0]))
        tensor([-0.9189, -1.4189])
    """
    if isinstance(scale, (int, float)) and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")

    def log_likelihood(output: Tensor, y: Tensor) -> Tensor:
        output = match_target(output, y, "normal_log_likelihood")
        s = torch.as_tensor(scale, dtype=output.dtype, device=output.device)
        z = (y - output) / s
        return per_example_sum(-0.5 * z**2 - s.log() - 0.5 * math.log(2 * math.pi))

    return log_likelihood


# ------------------------------------------------------------ torch.distributions families
def distribution_members(d: Distribution) -> tuple[Tensor, Likelihood, Tensor | None]:
    while isinstance(d, Independent):
        d = d.base_dist
    if isinstance(d, Bernoulli):
        return d.probs, Likelihood("bernoulli"), None
    if isinstance(d, Categorical):
        return d.probs, Likelihood("categorical"), None
    if isinstance(d, Normal):
        return d.loc, Likelihood("normal"), d.scale.square()
    if isinstance(d, Poisson):
        return d.rate, Likelihood("poisson"), None
    raise ValueError(
        f"decompose_uncertainty supports Bernoulli, Categorical, Normal and Poisson "
        f"members, got {type(d).__name__}"
    )


PYRO_FAMILIES = "Bernoulli, Categorical, Normal, Poisson"


def observation_parameters(fn: Distribution, site: str) -> tuple[str, tuple[Tensor, ...]]:
    """The observation distribution's family and parameters, broadcast to its full shape."""
    shape = fn.batch_shape + fn.event_shape
    base = fn
    while True:  # Independent (to_event), masks and expansions keep the base's parameters
        if isinstance(base, Independent):
            base = base.base_dist
        elif hasattr(base, "base_dist") and type(base).__name__ in (
            "MaskedDistribution",
            "ExpandedDistribution",
        ):
            base = base.base_dist
        else:
            break
    if isinstance(base, Bernoulli):
        return "bernoulli", (base.probs.expand(shape),)
    if isinstance(base, Categorical):
        return "categorical", (base.probs.expand((*shape, base.probs.shape[-1])),)
    if isinstance(base, Normal):
        return "normal", (base.loc.expand(shape), base.scale.expand(shape))
    if isinstance(base, Poisson):
        return "poisson", (base.rate.expand(shape),)
    raise ValueError(
        f"site {site!r} has a {type(base).__name__} distribution; "
        f"pyro_predictive_distributions supports {PYRO_FAMILIES} observation sites"
    )
