"""Experiments behind the product's design choices; each runs as `python -m finetune.experiments.<name>`."""
