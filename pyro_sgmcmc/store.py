"""Where the draws of a run go: memory, or ``.npy`` files streamed to disk.

:class:`pyro_sgmcmc.MCMC` keeps draws in memory by default. With ``stream_to=DIR`` it
writes them instead, every ``stream_every`` draws, into one ``.npy`` file per site of
shape ``(chains, draws, *site_shape)`` (``numpy.lib.format.open_memmap``), so a run
holds at most ``stream_every`` draws in memory however long it is. The files are
ordinary NumPy arrays: :func:`load_draws` opens them lazily (memory-mapped) in another
process, also while the run is still going (it returns the draws written so far), and
concatenates the per-process directories of a ``torch.distributed`` run along the
chain dimension.

Layout of ``DIR``::

    meta.json          {"sites": {name: shape}, "num_chains": C, "num_draws": S,
                        "written": s, "complete": bool}
    <site>.npy         (C, S, *shape), the first `written` draws filled
    rank-00000/ ...    the same, once per process, for a distributed run

Examples:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> sink = DiskSink(d, num_chains=2, num_draws=3, flush_every=2)
    >>> for s in range(3):
    ...     sink.append({"w": torch.full((2, 4), float(s))})
    >>> sink.close()
    >>> load_draws(d)["w"].shape
    torch.Size([2, 3, 4])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DiskSink", "MemorySink", "load_draws"]

_META = "meta.json"


class MemorySink:
    """Draws kept in memory: ``append`` one draw ``{site: (C, *shape)}`` at a time."""

    def __init__(self) -> None:
        self.kept: dict[str, list[Tensor]] = {}

    def append(self, draw: dict[str, Tensor]) -> None:
        for name, value in draw.items():
            self.kept.setdefault(name, []).append(value.detach().clone())

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = state["kept"]

    def result(self) -> dict[str, Tensor]:
        """``{site: (C, S, *shape)}``."""
        return {n: torch.stack(v, dim=1) for n, v in self.kept.items()}


class DiskSink:
    """Draws streamed to ``.npy`` files in ``directory`` (see the module docs).

    Args:
        directory: created if missing; files of an earlier run there are overwritten
            (unless resuming through :meth:`load_state_dict`).
        num_chains: ``C``.
        num_draws: ``S``, the draws per chain the run will write.
        flush_every: draws buffered in memory between writes.
    """

    def __init__(
        self, directory: str | os.PathLike, num_chains: int, num_draws: int, flush_every: int = 100
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"stream_every must be >= 1, got {flush_every}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_chains, self.num_draws, self.flush_every = num_chains, num_draws, flush_every
        self.written = 0
        self._buffer: list[dict[str, Tensor]] = []
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes: dict[str, list[int]] = {}

    def _open(self, draw: dict[str, Tensor], mode: str) -> None:
        for name, value in draw.items():
            if value.shape[0] != self.num_chains:
                raise ValueError(
                    f"draw of {name!r} has shape {tuple(value.shape)}; expected a leading "
                    f"chain dimension of {self.num_chains}"
                )
            shape = (self.num_chains, self.num_draws, *value.shape[1:])
            dtype = torch.empty((), dtype=value.dtype).numpy().dtype
            path = self.directory / f"{name}.npy"
            if mode == "w+":
                self._arrays[name] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=dtype, shape=shape
                )
            else:
                self._arrays[name] = np.load(path, mmap_mode="r+")
            self._shapes[name] = list(value.shape[1:])

    def append(self, draw: dict[str, Tensor]) -> None:
        if not self._arrays:
            self._open(draw, "w+")
            self._write_meta(complete=False)
        if self.written + len(self._buffer) >= self.num_draws:
            raise ValueError(f"all {self.num_draws} draws are already written")
        self._buffer.append({n: v.detach().cpu() for n, v in draw.items()})
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered draws and make them durable (``meta.json`` last)."""
        if not self._buffer:
            return
        start, stop = self.written, self.written + len(self._buffer)
        for name, array in self._arrays.items():
            block = torch.stack([d[name] for d in self._buffer], dim=1).numpy()
            array[:, start:stop] = block
            array.flush()
        self.written = stop
        self._buffer.clear()
        self._write_meta(complete=False)

    def close(self) -> None:
        self.flush()
        self._write_meta(complete=self.written == self.num_draws)

    def _write_meta(self, complete: bool) -> None:
        meta = {
            "sites": self._shapes,
            "num_chains": self.num_chains,
            "num_draws": self.num_draws,
            "written": self.written,
            "complete": complete,
        }
        tmp = self.directory / f"{_META}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.directory / _META)

    def state_dict(self) -> dict[str, Any]:
        """Flushes, so that a checkpoint never refers to draws still in memory."""
        self.flush()
        return {"written": self.written, "sites": list(self._arrays)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: reopen the files and overwrite anything past the checkpoint."""
        self.written = state["written"]
        if state["sites"]:
            meta = json.loads((self.directory / _META).read_text())
            for name in state["sites"]:
                self._arrays[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r+")
                self._shapes[name] = meta["sites"][name]

    def result(self) -> dict[str, Tensor]:
        """The written draws, memory-mapped (copy-on-write: editing them leaves the files)."""
        return load_draws(self.directory)


def _load_one(directory: Path) -> dict[str, Tensor]:
    meta = json.loads((directory / _META).read_text())
    out = {}
    for name in meta["sites"]:
        array = np.load(directory / f"{name}.npy", mmap_mode="c")
        out[name] = torch.from_numpy(array[:, : meta["written"]])
    return out


def load_draws(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Open streamed draws: ``{site: (C, S, *shape)}``, memory-mapped.

    Only the draws written so far are returned (a running or killed run has fewer than
    ``num_draws``). The per-process directories of a distributed run (``rank-*``) are
    joined along the chain dimension, in rank order.

    Args:
        directory: the ``stream_to`` directory of a run.
    """
    directory = Path(directory)
    ranks = sorted(directory.glob("rank-*"))
    if (directory / _META).exists():
        return _load_one(directory)
    if not ranks:
        raise FileNotFoundError(f"no streamed draws in {directory} (no {_META})")
    parts = [_load_one(r) for r in ranks]
    written = min(next(iter(p.values())).shape[1] for p in parts)
    return {n: torch.cat([p[n][:, :written] for p in parts], dim=0) for n in parts[0]}
