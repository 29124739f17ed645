"""Where in the data order a checkpoint was taken, kept in the DataModule's own state.

Lightning 2.6 restores its batch counter from a checkpoint taken mid-epoch but restarts a
plain DataLoader's order from the top. Every checkpoint therefore holds (epoch, batches of it
already trained), and a resumed run's train sampler starts that epoch after those batches
(finetune.data.sampling.train_sampler). Lightning saves `state_dict()` in the checkpoint under
the DataModule's class name and hands it back to `load_state_dict()` before it builds the
dataloaders.
"""

from __future__ import annotations

from finetune.lightning_internals import data_position

POSITION_KEY = "data_position"  # [epoch, batches of it already trained]


class ResumePosition:
    """DataModule mixin: the data position in `state_dict()`; `take_resume_position()` hands the
    restored one over once (to the train sampler of the resumed run, not to a later fit)."""

    _resume_position: tuple[int, int] | None = None

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        return {POSITION_KEY: list(data_position(self.trainer))}

    def load_state_dict(self, state_dict: dict) -> None:
        position = state_dict.get(POSITION_KEY)
        self._resume_position = tuple(position) if position else None

    def take_resume_position(self) -> tuple[int, int] | None:
        position, self._resume_position = self._resume_position, None
        return position
