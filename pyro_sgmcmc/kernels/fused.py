r"""``jit_compile=True``: each sampling step as one compiled graph.

One step of a kernel after warm-up is a pure function of the sampler state, the
minibatch indices and the injected noise:

.. math::

    (s_{t+1}, s^{\text{prev}}_{t+1}, \tilde U_t, \text{ok}_t)
        = F(s_t, s^{\text{prev}}_t, B_t, \xi_t),

with the minibatch gather, potential and gradient (``torch.func`` for vectorised
chains), the control-variate correction, the whitening :math:`\theta = \mu + L z`, the
finiteness check and the sampler update inside :math:`F`. A non-finite step is undone
inside the graph with ``torch.where`` (serial: back to the previous point, momenta at
rest; vectorised: that chain keeps its point, momenta at rest), so no step waits for
the host. :math:`F` is recorded once with ``make_fx`` (like ``torch.jit.trace``, one path
through the model's Python, hence the agreement check below) and compiled with
``torch.compile`` (inductor), or run as a TorchScript graph where inductor fails.

The random draws stay outside the graph, drawn from the kernel's generators in the
eager step's order (indices, then each noise tensor the sampler asks for), so a fused
run makes the same draws as an eager one with the same seed (up to floating-point
rounding, and until the first non-finite step, after which the eager step draws no
noise). The host reads the per-step finiteness flags every :data:`FLUSH_EVERY` steps
(and before diagnostics and checkpoints): divergences are counted and
``max_divergences`` raises then.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import pyro
import torch
from torch import Tensor

from pyro_sgmcmc.kernels.chain_batch import expand_mask, finite, reset_momenta, select_chains
from pyro_sgmcmc.samplers._common import normal_like

#: Steps between host reads of the finiteness flags.
FLUSH_EVERY = 100


def state_leaves(state) -> list[Tensor]:
    """A sampler state's tensors (fields that are dicts of tensors or tensors), in order.

    Examples:
        >>> from pyro_sgmcmc.samplers import sgnht
        >>> state = sgnht.init({"z": torch.zeros(3)})
        >>> [tuple(x.shape) for x in state_leaves(state)]
        [(3,), (3,), ()]
        >>> state_from_leaves(state, state_leaves(state)).xi
        tensor(1.)
    """
    out = []
    for x in state:
        out.extend(x.values() if isinstance(x, dict) else [x])
    return out


def state_from_leaves(like, leaves: list[Tensor]):
    """The state of ``like``'s structure holding ``leaves`` (inverse of :func:`state_leaves`)."""
    it = iter(leaves)
    fields = [
        {k: next(it) for k in x} if isinstance(x, dict) else next(it) for x in like
    ]  # fmt: skip
    return type(like)(*fields)


class NoiseFeed:
    """The sampler's noise source inside the graph: hands out given tensors in order.

    While recording (``tensors=None``) it draws from ``source`` and remembers the shapes,
    so :meth:`draw` later makes the same draws, outside the graph, for each step.
    """

    def __init__(self, source, tensors: list[Tensor] | None = None) -> None:
        self.source, self.tensors = source, tensors
        self.shapes: list[Tensor] = []
        self.drawn: list[Tensor] = []
        self._i = 0

    def normal_like(self, x: Tensor) -> Tensor:
        if self.tensors is not None:
            self._i += 1
            return self.tensors[self._i - 1]
        self.shapes.append(torch.empty_like(x))
        self.drawn.append(normal_like(x, self.source))
        return self.drawn[-1]

    def draw(self, templates: list[Tensor]) -> list[Tensor]:
        """This step's noise, drawn as the eager step would."""
        return [normal_like(t, self.source) for t in templates]


class FusedStep:
    """The compiled sampling step of a kernel (see the module docstring).

    Built by :meth:`build` at the first sampling step with fixed step size and
    sampler arguments; the kernel rebuilds it when those change (a step-size schedule
    that changes every step is not fused).

    Attributes:
        backend: ``"inductor"`` or ``"torchscript"``, what compiled the graph.
        compile_seconds: time to record, compile and check the graph.
    """

    def __init__(self, kernel, step_size: float, kwargs: dict[str, Any], backend: str) -> None:
        self.kernel = kernel
        self.step_size = step_size
        self.kwargs = kwargs
        self.batched = kernel.num_chains is not None
        self.backend = backend
        self.compile_seconds = 0.0
        self.fn = None
        self.templates: list[Tensor] = []

    # ------------------------------------------------------------------ the graph
    def _step(self, leaves: list[Tensor], idx, noise: list[Tensor] | None, feed=None):
        """The eager step as a function of tensors: ``leaves`` are the state's then (serial)
        the previous state's."""
        k = self.kernel
        like = k._state
        n = len(state_leaves(like))
        state = state_from_leaves(like, leaves[:n])
        z = state.params["z"]
        theta = k.whitening.to_params(z)
        u, grads = k.estimator(theta, idx)
        gz = k.whitening.grad_to_z(grads)
        ok = finite(u, gz)
        gz = torch.where(expand_mask(ok, gz), gz, torch.zeros_like(gz))
        feed = feed if feed is not None else NoiseFeed(None, noise)
        new = k._sampler.step(
            state, {"z": gz}, self.step_size, temperature=k.temperature,
            num_data=k.potential.num_data, generator=feed, **self.kwargs,
        )  # fmt: skip
        if self.batched:
            out = select_chains(ok, new, reset_momenta(state))
            extra = []
        else:
            prev = state_from_leaves(like, leaves[n:])
            out = select_chains(ok, new, reset_momenta(prev))
            extra = state_leaves(select_chains(ok, state, prev))
        theta_out = k.whitening.to_params(out.params["z"])
        return [*state_leaves(out), *extra, u, ok, *theta_out.values()]

    def _inputs(self) -> list[Tensor]:
        k = self.kernel
        leaves = state_leaves(k._state)
        if not self.batched:
            leaves += state_leaves(k._prev_state)
        return leaves

    def build(self, check_steps: int = 2) -> bool:
        """Record and compile the step; check it against the eager step on fresh batches
        (the draws are then replayed, so the run is unchanged). False, with a warning
        saying why, when the model cannot be fused."""
        k = self.kernel
        start = time.perf_counter()
        pot = k.potential
        jit = getattr(pot, "jit_compile", None)
        gen_states = _generator_states(k)
        probe = torch.Generator(device=k._generator.device).manual_seed(0)
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            if jit is not None:
                pot.jit_compile = False  # record the model's own ops, not a TorchScript call
            idx = k._next_indices()
            feed = NoiseFeed(k._noise_source())
            # Distinct tensors: the recorder would merge inputs that are one object (the
            # state and the previous state at the first step).
            leaves = [x.clone() for x in self._inputs()]
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                expected = self._step(leaves, idx, None, feed)
                self.templates = feed.shapes
                noise = feed.drawn
                self.with_idx = idx is not None
                if self.with_idx:
                    graph = make_fx(lambda ls, i, e: self._step(ls, i, e))(leaves, idx, noise)
                else:  # no data plate: TorchScript cannot take a None
                    graph = make_fx(lambda ls, e: self._step(ls, None, e))(leaves, noise)
                self.fn = self._compile(graph, self._args(leaves, idx, noise))
                got = self._run(leaves, idx, noise)
                if not _agree(got, expected):
                    raise RuntimeError("the recorded step differs from the eager step")
                for _ in range(check_steps):  # fresh batches and noise at a moved point
                    idx = k._next_indices()
                    noise = NoiseFeed(k._noise_source()).draw(self.templates)
                    moved = [_moved(x, probe) for x in leaves]
                    if not _agree(self._run(moved, idx, noise), self._step(moved, idx, noise)):
                        raise RuntimeError(
                            "the recorded step differs from the eager step on another "
                            "minibatch (value-dependent Python control flow in the model?)"
                        )
        except Exception as e:  # noqa: BLE001 - any model the recorder cannot handle
            warnings.warn(
                f"jit_compile=True: the sampling step could not be fused into one graph "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "running it eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            self.fn = None
            return False
        finally:
            if jit is not None:
                pot.jit_compile = jit
            _set_generator_states(k, gen_states)
        self.compile_seconds = time.perf_counter() - start
        return True

    def _args(self, leaves, idx, noise) -> tuple:
        return (leaves, idx, noise) if self.with_idx else (leaves, noise)

    def _run(self, leaves, idx, noise) -> list[Tensor]:
        return self.fn(*self._args(leaves, idx, noise))

    def _compile(self, graph, example):
        if self.backend == "inductor":
            try:
                fn = torch.compile(graph, dynamic=False)
                fn(*example)  # compile now, so a failure falls back here
                return fn
            except Exception as e:  # noqa: BLE001 - no C++ compiler, unsupported op, ...
                warnings.warn(
                    f"jit_compile=True: torch.compile failed ({type(e).__name__}); the fused "
                    "step runs as a TorchScript graph instead",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self.backend = "torchscript"
        return torch.jit.trace(graph, example, check_trace=False)

    # ------------------------------------------------------------------ running it
    def __call__(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step of the kernel's chains; returns ``(u, ok, params)`` and updates its
        state in place."""
        k = self.kernel
        idx = k._next_indices()
        noise = NoiseFeed(k._noise_source()).draw(self.templates)
        out = self._run(self._inputs(), idx, noise)
        n = len(state_leaves(k._state))
        k._state = state_from_leaves(k._state, out[:n])
        if not self.batched:
            k._prev_state = state_from_leaves(k._state, out[n : 2 * n])
            n *= 2
        u, ok = out[n], out[n + 1]
        params = dict(zip(k._like, out[n + 2 :], strict=True))
        return u, ok, params


def _moved(x: Tensor, generator: torch.Generator) -> Tensor:
    if not x.is_floating_point():
        return x
    return x + 0.01 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _agree(got: list[Tensor], expected: list[Tensor]) -> bool:
    return len(got) == len(expected) and all(
        a.shape == b.shape
        and bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6, equal_nan=True))
        for a, b in zip(got, expected, strict=True)
    )


def _generator_states(kernel) -> tuple[list, Any]:
    """The kernel's random state (generators, and an epoch stream's position)."""
    gens = [kernel._generator, *(kernel._chain_generators or [])]
    indices = getattr(kernel.potential, "indices", None)
    stream = None
    if indices is not None:
        stream = indices.state_dict()
        if indices.generator is not None and indices.generator not in gens:
            gens.append(indices.generator)
    return [(g, g.get_state()) for g in gens], stream


def _set_generator_states(kernel, states: tuple[list, Any]) -> None:
    gens, stream = states
    for g, state in gens:
        g.set_state(state)
    if stream is not None:
        kernel.potential.indices.load_state_dict(stream)
