"""Minibatch indices of a data plate: :class:`IndexStream` (one chain's batches, iid or
epoch-wise permutations) and :func:`chain_indices` (one iid batch per vectorised chain),
as ``PyroPotential.next_indices`` draws them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_sgmcmc.pyro_model import ModelError

if TYPE_CHECKING:
    from pyro_sgmcmc.potential import PyroPotential

__all__ = ["IndexStream", "chain_indices", "generator_device"]


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where ``generator`` draws (the CPU for ``None``, torch's default generator): a draw
    from a CUDA generator must say ``device=`` (``torch.randint(..., generator=g,
    device=generator_device(g))``)."""
    return torch.device("cpu") if generator is None else generator.device


class IndexStream:
    """Minibatch indices over ``range(size)``: iid, or epoch-wise permutations.

    Each call returns ``batch_size`` indices. With ``replacement=True`` each batch is
    drawn independently with replacement. Otherwise batches come from a stream of
    permutations and never change size (the last batch of an epoch continues into
    the next permutation). Either way every index slot is uniform over the data, so
    minibatch estimates are unbiased.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> stream = IndexStream(10, 4, generator=g)
        >>> sorted(torch.cat([stream() for _ in range(5)]).tolist()) == sorted(2 * list(range(10)))
        True
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        replacement: bool = False,
    ) -> None:
        if not 1 <= batch_size <= size:
            raise ValueError(f"batch_size must lie in [1, {size}], got {batch_size}")
        self.size, self.batch_size, self.replacement = size, batch_size, replacement
        self.generator, self.device = generator, device
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def _new_epoch(self) -> Tensor:
        perm = torch.randperm(
            self.size, generator=self.generator, device=generator_device(self.generator)
        )
        return perm.to(self.device) if self.device is not None else perm

    def __call__(self) -> Tensor:
        if self.replacement:
            idx = torch.randint(
                self.size, (self.batch_size,), generator=self.generator,
                device=generator_device(self.generator),
            )  # fmt: skip
            return idx.to(self.device) if self.device is not None else idx
        if self.batch_size == self.size:
            if self._perm.numel() == 0:
                self._perm = torch.arange(self.size, device=self.device)
            return self._perm
        end = self._pos + self.batch_size
        if end <= self._perm.numel():
            batch = self._perm[self._pos : end]
            self._pos = end
            return batch
        head = self._perm[self._pos :]
        self._perm = self._new_epoch()
        self._pos = self.batch_size - head.numel()
        return (
            torch.cat([head, self._perm[: self._pos]]) if head.numel() else self._perm[: self._pos]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self._perm.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._perm, self._pos = state["perm"].clone(), state["pos"]


def chain_indices(
    potential: PyroPotential, num_chains: int | None = None, generators: list | None = None
) -> Tensor | None:
    """The next minibatch of ``potential``'s data-plate indices (``None`` without a data
    plate).

    With ``num_chains``, one independent iid batch per chain, shape ``(C, B)`` (full
    batch: the shared ``(N,)`` indices); with ``generators``, chain ``c``'s batch comes
    from ``generators[c]`` as a single chain's would.
    """
    stream = potential.indices
    if stream is None:
        return None
    if num_chains is None or potential.subsample_size is None:
        return stream()
    if not stream.replacement:
        raise ModelError("vectorised chains draw iid minibatches: use batching='iid'")
    n, b = potential.plate_size, potential.subsample_size
    if generators is not None:
        idx = torch.stack(
            [torch.randint(n, (b,), generator=g, device=generator_device(g)) for g in generators]
        )
    else:
        gen = potential.generator
        idx = torch.randint(n, (num_chains, b), generator=gen, device=generator_device(gen))
    return idx.to(stream.device) if stream.device is not None else idx
