"""Leave-one-out retrieval metrics (recall@k, MAP@R) at scale: the implementation before issue 20
against today's, on the same embeddings.

    python benchmarks/retrieval.py                    # 10k and 100k embeddings, D 512: 5-9 min on 2 cores
    python benchmarks/retrieval.py --sizes 20000 --device cuda

Embeddings: identities of 50-150 items (~100), each item its identity's random centre plus
noise 3 times the centre's scale (recall@1 ~0.9, MAP@R ~0.3 at 10k: neither saturated nor at
chance). The previous implementation is read from git (commit `PREVIOUS`) into a temporary
module; it ran on the CPU (the task moved the embeddings there), so it is timed there whatever
`--device` says. It is O(N^2): where its time extrapolated from the smallest size passes
`--previous-limit` seconds, it is skipped and the table says so. Under DDP the previous code
ran the whole computation on every process; today's ranks 1/W of the queries on each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from finetune.metrics import retrieval_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREVIOUS = "c8315fb987d2506d93b871b73c045e9b6276c8e8"  # last commit of finetune/metrics/embedding.py before issue 20


def previous_implementation():
    """`retrieval_metrics` as of PREVIOUS, or None (and why) without git or that commit."""
    try:
        source = subprocess.run(
            ["git", "show", f"{PREVIOUS}:finetune/metrics/embedding.py"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"previous implementation unavailable ({error}); timing today's only", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "previous_embedding_metrics.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("previous_embedding_metrics", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.retrieval_metrics


def identity_embeddings(num_items: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(50, 151, (num_items // 50 + 1,), generator=generator)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:num_items]
    labels = labels[torch.randperm(num_items, generator=generator)]
    centres = torch.randn(len(sizes), dim, generator=generator)
    return centres[labels] + 3 * torch.randn(num_items, dim, generator=generator), labels


def seconds_of(function, *args, synchronise=lambda: None) -> tuple[float, dict]:
    synchronise()
    start = time.perf_counter()
    result = function(*args)
    synchronise()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--previous-limit", type=float, default=300.0, help="seconds; skip the previous code past it")
    args = parser.parse_args()
    previous = previous_implementation()
    device = torch.device(args.device)
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"today's on {device}{name}, previous on cpu; fastest of 3 runs (2 at > 20k), the two interleaved\n")
    print("| embeddings | previous (CPU) | today's | previous / today's | max abs difference of the metrics |")
    print("|---:|---:|---:|---:|---:|")
    first_previous = None  # (size, seconds), to extrapolate the previous code's O(N^2) time
    for size in sorted(args.sizes):
        embeddings, labels = identity_embeddings(size, args.dim)
        on_device = embeddings.to(device), labels.to(device)
        estimate = None if first_previous is None else first_previous[1] * (size / first_previous[0]) ** 2
        run_previous = previous is not None and (estimate is None or estimate <= args.previous_limit)
        today, old = [], []
        for _ in range(3 if size <= 20_000 else 2):  # interleaved: a disturbance on a shared machine hits both
            today.append(seconds_of(retrieval_metrics, *on_device, synchronise=synchronise))
            if run_previous:
                old.append(seconds_of(previous, embeddings, labels))
        seconds, metrics = min(today, key=lambda run: run[0])
        if old:
            old_seconds, old_metrics = min(old, key=lambda run: run[0])
            first_previous = first_previous or (size, old_seconds)
            difference = max(abs(old_metrics[name] - value) for name, value in metrics.items())
            columns = f"{old_seconds:.2f} s | {seconds:.2f} s | {old_seconds / seconds:.2f} | {difference:.1e}"
        else:
            why = "no git" if previous is None else f"~{estimate:.0f} s extrapolated"
            columns = f"not run ({why}) | {seconds:.2f} s | - | -"
        figures = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"| {size:,} ({figures}) | {columns} |", flush=True)


if __name__ == "__main__":
    main()
