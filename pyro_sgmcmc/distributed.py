"""Chains spread over processes and hosts with ``torch.distributed``.

``pyro_sgmcmc.MCMC(..., chain_method="distributed")`` splits ``num_chains`` into one
contiguous block per process (rank ``r`` of ``W`` runs chains ``offset_r ...
offset_r + count_r - 1``, as even as possible) and runs each block as vectorised chains.
The processes stay one run:

* warm-up adaptation is pooled over *all* chains: window means and variances are
  all-reduced, and the gradient-noise and Fisher estimates come from global chain 0
  (on rank 0) and are broadcast, exactly what one process with all the chains does;
* one seed (rank 0's) drives every rank; with ``chain_rng="per_chain"`` chain ``c``
  draws from a generator seeded ``rng_seed + c`` whichever process runs it, so the
  run does not depend on how many processes there are;
* the draws are gathered on rank 0 (``gather=True``) or written per rank
  (``stream_to=DIR`` writes ``DIR/rank-00000`` ..., joined by
  :func:`pyro_sgmcmc.store.load_draws`).

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...)::

    torchrun --nproc_per_node=4 my_script.py            # one host
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 my_script.py

If the script has not called ``torch.distributed.init_process_group``, the run does it
(``gloo`` on CPU, ``nccl`` when the model's tensors are on CUDA).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ChainGroup", "chain_blocks"]


def chain_blocks(num_chains: int, world_size: int) -> list[tuple[int, int]]:
    """``(offset, count)`` of each rank's block of chains, sizes differing by at most 1.

    Examples:
        >>> chain_blocks(10, 3)
        [(0, 4), (4, 3), (7, 3)]
    """
    if num_chains < world_size:
        raise ValueError(
            f"num_chains={num_chains} is smaller than the number of processes ({world_size}): "
            "every process needs at least one chain"
        )
    base, extra = divmod(num_chains, world_size)
    counts = [base + (r < extra) for r in range(world_size)]
    offsets = [sum(counts[:r]) for r in range(world_size)]
    return list(zip(offsets, counts, strict=True))


def _ensure_initialized(device: torch.device) -> None:
    if dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError(
            "chain_method='distributed' needs a PyTorch build with torch.distributed"
        )
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "chain_method='distributed' runs under torchrun (which sets RANK, WORLD_SIZE, "
            "MASTER_ADDR, MASTER_PORT), or after torch.distributed.init_process_group()"
        )
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


class ChainGroup:
    """This process's block of a distributed run's chains, and the collectives over all.

    Args:
        num_chains: the total number of chains over all processes.
        device: where the model's tensors live (``nccl`` collectives need CUDA tensors).
    """

    def __init__(self, num_chains: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        _ensure_initialized(self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.num_chains = num_chains
        self.blocks = chain_blocks(num_chains, self.world_size)
        self.offset, self.count = self.blocks[self.rank]
        if self.device.type == "cuda" and dist.get_backend() == "nccl":
            torch.cuda.set_device(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chain_mean(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over every process's chains of per-chain values ``{k: (count, ...)}``."""
        sums = {k: v.sum(0) for k, v in local.items()}
        flat = torch.cat([v.reshape(-1) for v in sums.values()]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat / self.num_chains
        out, start = {}, 0
        for k, v in sums.items():
            out[k] = flat[start : start + v.numel()].reshape(v.shape).to(v.device, v.dtype)
            start += v.numel()
        return out

    def broadcast(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rank 0's ``values`` on every rank (same keys and shapes everywhere)."""
        out = {}
        for k, v in values.items():
            t = v.detach().clone().to(self.device)
            dist.broadcast(t, src=0)
            out[k] = t.to(v.device)
        return out

    def broadcast_object(self, obj):
        """Rank 0's picklable ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` in rank order on rank 0; ``None`` elsewhere."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        dist.barrier()
