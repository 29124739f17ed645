"""What changes when several processes train one model (DDP): checked strategies, gradients of
stages that unfreeze after DDP wrapped the model, and evaluation without padded duplicates."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import DistributedSampler

from finetune.errors import FinetuneError


def check_strategy(strategy) -> None:
    """One line at start for a strategy the freeze/unfreeze schedule cannot run under.

    Stages that unfreeze after DDP wrapped the model have their gradients averaged here
    (`average_gradients`); FSDP shards and DeepSpeed owns the gradients, so the schedule would
    silently train each shard or replica apart.
    """
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise FinetuneError(
            f"trainer.strategy: {type(strategy).__name__} is not supported (the freeze/unfreeze schedule needs DDP's "
            "replicated gradients); use auto (one device), ddp, ddp_spawn or ddp_notebook"
        )


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce gradients that DDP does not: of parameters unfrozen after it wrapped the model.

    DDP registers only the parameters that required grad when it was built, so stages that
    unfreeze later would otherwise train with each rank's own gradient and drift apart. One
    flat all-reduce; no barrier, no host sync (Lightning's `strategy.reduce` adds a barrier).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world_size < 2:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def samples_on_this_rank(loader) -> int | None:
    """How many samples of `loader`'s dataset this rank holds, padding left out; None when its
    sampler does not pad (one process, or not a DistributedSampler).

    Under DDP, Lightning gives evaluation loaders a DistributedSampler that pads the index list
    to a multiple of the world size with samples from its start, then deals it out round-robin:
    rank r gets global positions r, r + W, r + 2W, ..., and the positions >= len(dataset) are
    duplicates. So this rank's real samples are the first len(range(r, N, W)) it sees, and the
    padding is a tail that a slice drops: no index lookup, no boolean mask, no host sync.
    (An unpadded sampler would give ranks different batch counts, and DDP, which broadcasts
    buffers on every forward, would hang.)
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or sampler.num_replicas < 2:
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


class PaddingCounter:
    """Tells, batch by batch, how many samples of an evaluation pass are real (see above)."""

    def __init__(self, loader=None):
        self.real = samples_on_this_rank(loader)
        self.seen = 0

    def keep(self, batch_size: int) -> int:
        """How many leading samples of the next batch (of `batch_size`) are not padding."""
        start, self.seen = self.seen, self.seen + batch_size
        if self.real is None:
            return batch_size
        return max(0, min(batch_size, self.real - start))
