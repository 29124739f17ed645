"""The report's "Learn from the run" section (single-label classification): at the end of fit,
the validation split's top losses, most confused pairs and likely mislabelled images, as
`finetune interpret --split val` writes them, and the same as W&B tables when W&B logs the run."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from pathlib import Path

from finetune.interpretation import Interpretation
from finetune.report.html import figure_html

log = logging.getLogger(__name__)

TITLE = "Learn from the run: top losses, confusions, likely mislabelled (validation)"
SHOWN = 10  # rows of each table on the page; the CSV has every image


def interpretation_section(trainer, pl_module) -> Callable[[Path], str] | None:
    """A RunReport section for a classification task with a DataModule, else None. It runs the
    network once more over the whole validation split (an unshuffled loader, no DDP sampler:
    rank 0 writes the report) when the report is written."""
    contract = getattr(pl_module, "contract", None)
    datamodule = trainer.datamodule
    if contract is None or contract.name != "classification" or datamodule is None:
        return None

    def write(folder: Path) -> str:
        from finetune.interpret_command import interpret_module

        # Lightning's teardown has moved the model to the CPU before on_fit_end: back to the
        # training device for this pass (a GPU run's validation set on a CPU would take long).
        pl_module.to(trainer.strategy.root_device)
        try:
            result = interpret_module(pl_module, datamodule.val_dataloader())
        finally:
            pl_module.cpu()
        samples = result.write_csv(folder / "interpret-val.csv")
        confused = result.write_confused_csv(folder / "confused-val.csv")
        figure = result.top_losses_figure(folder / "top_losses-val.png", k=9)
        _log_to_wandb(trainer, result)
        return _section_html(result, samples.name, confused.name, figure.name)

    return write


def _table(columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _rows(rows) -> list[list]:
    return [[r.path, r.true, r.predicted, f"{r.p_predicted:.3f}", f"{r.p_true:.3f}", f"{r.loss:.3f}"] for r in rows]


def _section_html(result: Interpretation, samples: str, confused: str, figure: str) -> str:
    columns = ["path", "true", "predicted", "p(predicted)", "p(true)", "loss"]
    doubtful = result.likely_mislabelled()
    pairs = [[t, p, n] for t, p, n in result.most_confused()[:SHOWN]]
    return (
        f"{figure_html(figure, 'the highest-loss validation images: true / predicted / p / loss')}"
        f"<h3>Most confused (true as predicted)</h3>{_table(['true', 'predicted', 'count'], pairs) if pairs else '<p>none</p>'}"
        f"<h3>Likely mislabelled: {len(doubtful)} (confident learning)</h3>"
        f"{_table(columns, _rows(doubtful[:SHOWN])) if doubtful else '<p>none</p>'}"
        f"<h3>Top losses</h3>{_table(columns, _rows(result.top_losses(SHOWN)))}"
        f'<p>Every image, highest loss first: <a href="{samples}">{samples}</a>; all confused pairs: '
        f'<a href="{confused}">{confused}</a>. The same for any split: '
        f"<code>finetune interpret --ckpt_path ... --split train</code>.</p>"
    )


def _log_to_wandb(trainer, result: Interpretation) -> None:
    from finetune.callbacks.media import _wandb_logger

    logger = _wandb_logger(trainer)
    if logger is None:
        return
    import wandb

    columns = ["image", "path", "true", "predicted", "p_predicted", "p_true", "loss"]

    def table(rows) -> wandb.Table:
        return wandb.Table(columns=columns, data=[[wandb.Image(r.path), *r] for r in rows])

    logger.experiment.log({
        "interpretation/top_losses": table(result.top_losses(2 * SHOWN)),
        "interpretation/likely_mislabelled": table(result.likely_mislabelled()[: 5 * SHOWN]),
        "interpretation/most_confused": wandb.Table(columns=["true", "predicted", "count"],
                                                    data=[list(c) for c in result.most_confused()]),
    })
