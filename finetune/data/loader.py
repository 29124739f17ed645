"""The DataLoader every DataModule builds: the settings that keep a GPU fed, in one place."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import threading

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data.sampling import default_num_workers, train_sampler


def init_worker(worker_id: int) -> None:
    """In each DataLoader worker, once.

    Workers are the parallelism: OpenCV's own thread pool inside each of them only
    oversubscribes the cores (PyTorch already sets its threads to 1 in workers).

    SLURM, systemd and Ctrl+C signal the whole process group, and torch makes a worker die
    on SIGTERM. The main process then finishes its batch, may validate, and saves a checkpoint
    (finetune/callbacks/interruption.py) with workers it no longer has: "DataLoader worker
    exited unexpectedly". Ignoring the signals, workers are shut down by the main process.
    """
    cv2.setNumThreads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit hook was registered, so it runs before it
def _end_leftover_workers() -> None:
    """At exit multiprocessing ends daemon children (DataLoader workers) with SIGTERM, which
    ours ignore, and waits forever. Lightning shuts workers down itself, but not on every
    exception path. Do as multiprocessing does, then SIGKILL what is left after a second."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed"
    for process in children:
        process.terminate()
    for process in children:
        process.join(timeout=1)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


class DataLoaderWorkers:
    """DataModule mixin: `num_workers` as configured, or (None) this process's share of the
    CPUs, resolved when read: the trainer, attached after construction, says how many
    processes share them."""

    _num_workers: int | None = None

    @property
    def num_workers(self) -> int:
        return default_num_workers(self.trainer) if self._num_workers is None else self._num_workers

    @num_workers.setter
    def num_workers(self, workers: int | None) -> None:
        self._num_workers = workers


def data_loader(datamodule, dataset: Dataset, shuffle: bool, collate_fn=None) -> DataLoader:
    """Training order from EpochShuffleSampler, or BalancedSampler with `sampler: balanced`
    (both resumable, DDP-exact: finetune.data.sampling.train_sampler), persistent workers
    (no re-spawn each epoch), pinned memory when there is a GPU to copy to."""
    batch_size, workers = datamodule.hparams.batch_size, datamodule.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=train_sampler(datamodule, dataset) if shuffle else None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=shuffle and len(dataset) > batch_size,
        collate_fn=collate_fn,
        worker_init_fn=init_worker if workers > 0 else None,
    )
