"""Metrics the tasks compute at validation end that torchmetrics has no object for."""

from finetune.metrics.embedding import (
    balanced_pairs,
    read_lfw_pairs,
    retrieval_metrics,
    roc_curve,
    verification_metrics,
)

__all__ = ["balanced_pairs", "read_lfw_pairs", "retrieval_metrics", "roc_curve", "verification_metrics"]
