"""A run's pictures and numbers as files (PNG, CSV, index.html), with no logger needed:
finetune.callbacks.report.RunReport writes them under `<default_root_dir>/report/`."""
