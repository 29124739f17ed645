"""index.html: the figures, the final metrics as a table, and any extra sections."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
"""


def format_value(value: float) -> str:
    """Counts as whole numbers (11,178,051 trainable parameters), the rest to 6 significant digits."""
    return f"{int(value):,}" if value.is_integer() and abs(value) >= 1e6 else f"{value:.6g}"


def metrics_table(metrics: Mapping[str, float]) -> str:
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td class="value">{format_value(value)}</td></tr>'
        for name, value in sorted(metrics.items())
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def figure_html(filename: str, caption: str) -> str:
    return f'<figure><img src="{escape(filename)}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'


def render_index(
    title: str,
    metrics: Mapping[str, float],
    figures: Sequence[tuple[str, str]],
    sections: Sequence[tuple[str, str]] = (),
    history_csv: str | None = None,
) -> str:
    """The page: `figures` as (file name, caption) in order; `sections` as (title, HTML body)."""
    written = datetime.datetime.now().isoformat(timespec="seconds")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1><p>Written {written}.</p>",
        "<h2>Final metrics</h2>",
        metrics_table(metrics) if metrics else "<p>No metrics were logged.</p>",
    ]
    if history_csv:
        parts.append(f'<p>Every epoch: <a href="{escape(history_csv)}">{escape(history_csv)}</a></p>')
    parts.append("<h2>Figures</h2>")
    parts += [figure_html(name, caption) for name, caption in figures] or ["<p>No figures were drawn.</p>"]
    parts += [f"<h2>{escape(heading)}</h2>\n{body}" for heading, body in sections]
    parts.append("</body></html>\n")
    return "\n".join(parts)

