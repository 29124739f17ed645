"""The private Lightning attributes finetune uses (finetune/lightning_internals.py) still exist
and still mean what we use them for: fails loudly on a Lightning upgrade that moves them."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from finetune import lightning_internals as internals


def test_the_private_attributes_we_use_are_there(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, log_every_n_steps=1)
    assert internals.is_logging_step(trainer) is True  # no loop running: Lightning logs
    internals.log_now(trainer, {})  # no logger: nothing to write, and no error
    assert trainer.received_sigterm is False
    internals.request_stop(trainer)
    assert trainer.received_sigterm is True  # what Lightning's loops check to raise SIGTERMException
    assert callable(_TrainingEpochLoop._broadcast_sigterm_tensor)  # Lightning 2.6's per-step broadcast
    internals.skip_sigterm_broadcast(trainer)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None
