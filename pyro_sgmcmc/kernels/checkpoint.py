"""A kernel's run state for checkpoint/resume: every component's own state and the
generators' states, restored after ``setup`` with the same arguments so that the run
continues exactly as it would have."""

from __future__ import annotations

from typing import Any

from pyro_sgmcmc.kernels.whitening import Whitening


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of
    :class:`~pyro_sgmcmc.kernels.base.SGMCMCKernel`."""

    def state_dict(self) -> dict[str, Any]:
        """The kernel's run state, with its generators' states, for checkpointing.

        Restored by :meth:`load_state_dict` after ``setup`` with the same arguments, the
        run continues exactly as it would have.
        """
        self._flush_fused()
        state = {
            k: getattr(self, k)
            for k in (
                "_t",
                "_calls",
                "_divergences",
                "_num_nonfinite",
                "_warm_nonfinite",
                "_bad_streak",
                "_step_scale",
                "_beta",
                "_step_cut",
                "_state",
                "_prev_state",
                "_last_u",
                "warmup_report",
                "_alpha",
                "_clipped_warned",
                "_lr_scale",
            )  # fmt: skip
            if hasattr(self, k)
        }
        state["whitening"] = self.whitening.state_dict()
        state["estimator"] = self.estimator.state_dict()
        state["adapter"] = None if self.adapter is None else self.adapter.state_dict()
        state["generator"] = self._generator.get_state()
        state["chain_generators"] = [g.get_state() for g in self._chain_generators or []]
        indices = getattr(self.potential, "indices", None)
        if indices is not None:
            state["indices"] = indices.state_dict()
            state["indices_generator"] = (
                None if indices.generator is self._generator else indices.generator.get_state()
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (call after ``setup`` with the same arguments)."""
        state = dict(state)
        self.whitening = Whitening.from_state_dict(self._like, state.pop("whitening"))
        self.estimator.load_state_dict(state.pop("estimator"))
        adapter = state.pop("adapter")
        if adapter is not None:
            self.adapter.load_state_dict(adapter)
        self._generator.set_state(state.pop("generator"))
        for g, g_state in zip(
            self._chain_generators or [], state.pop("chain_generators"), strict=True
        ):
            g.set_state(g_state)
        indices = getattr(self.potential, "indices", None)
        if indices is not None and "indices" in state:
            indices.load_state_dict(state.pop("indices"))
            gen_state = state.pop("indices_generator")
            if gen_state is not None:
                indices.generator.set_state(gen_state)
        for k, v in state.items():
            setattr(self, k, v)
        self._noise_std_key = None
        self._update_log()
