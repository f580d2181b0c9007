"""Figure export, shared by every notebook: HTML always, PNG/SVG through kaleido.

HTML loads plotly.js from the CDN by default (a few KB per file); `embed_plotlyjs=True`
makes it self-contained (about 5 MB). Static images need a Chromium that kaleido can
drive (Debian: `apt-get install chromium`; elsewhere `plotly_get_chrome`); one browser
session is started on first use and reused for every later figure. Where no browser
exists, HTML is still written and the static step says what to install, once.

`export(..., subdir=, log=)` keeps a parameter set's figures apart (under
figures/<study>/<subdir>/) and appends one line per file written to `log`, so a sweep's
index lists exactly what a set produced. Left unset, they fall back to the environment
variables `THINKLAB_FIGURE_SUBDIR` and `THINKLAB_FIGURE_LOG`, which `thinklab batch` sets
today.

`show` exports and displays a figure (the one call a notebook's figure loop makes);
`titled` puts a figure's title and its count line (n, truncated share) together;
`placeholder` is the figure drawn when a study's table has nothing for a panel.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterable

from thinklab import paths

_KALEIDO_STARTED = False
_STATIC_DISABLED_REASON: str | None = None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"


def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _start_kaleido() -> bool:
    """Start kaleido's persistent browser once; False (with a reason recorded) if impossible."""
    global _KALEIDO_STARTED, _STATIC_DISABLED_REASON
    if _KALEIDO_STARTED:
        return True
    if _STATIC_DISABLED_REASON:
        return False
    try:
        import kaleido
    except ImportError:
        _STATIC_DISABLED_REASON = "kaleido is not installed (pip install kaleido)"
        return False
    if _browser_path() is None:
        _STATIC_DISABLED_REASON = (
            "no Chromium found for PNG/SVG export: install it (Debian/Ubuntu: apt-get install chromium; "
            "or run `plotly_get_chrome`); HTML figures are written regardless"
        )
        return False
    try:
        kaleido.start_sync_server(silence_warnings=True)
    except Exception as exc:  # kaleido raises several types when the browser cannot start
        _STATIC_DISABLED_REASON = f"kaleido could not start Chromium ({exc}); HTML figures are written regardless"
        return False
    _KALEIDO_STARTED = True
    return True


def export(
    fig,
    name: str,
    study: str,
    formats: Iterable[str] = ("html", "png"),
    embed_plotlyjs: bool = False,
    out_dir: Path | str | None = None,
    width: int = 900,
    height: int = 550,
    subdir: str | None = None,
    log: Path | str | None = None,
) -> list[Path]:
    """Write `fig` as figures/<study>/[<subdir>/]<name>.<fmt> for each format (or under
    `out_dir`); append the files written to `log` if given; return them."""
    if subdir is None:
        subdir = os.environ.get("THINKLAB_FIGURE_SUBDIR", "")
    if log is None:
        log = os.environ.get("THINKLAB_FIGURE_LOG") or None
    target = Path(out_dir) if out_dir else paths.figures_dir(study) / subdir
    target.mkdir(parents=True, exist_ok=True)
    written = []
    base = _slug(name)
    for fmt in formats:
        path = target / f"{base}.{fmt}"
        if fmt == "html":
            fig.write_html(path, include_plotlyjs=True if embed_plotlyjs else "cdn")
            written.append(path)
        elif fmt in ("png", "svg", "pdf"):
            if not _start_kaleido():
                warnings.warn(f"{fmt.upper()} skipped for {base}: {_STATIC_DISABLED_REASON}", stacklevel=2)
                continue
            with warnings.catch_warnings():  # plotly warns that kaleido's server ignores per-call options
                warnings.simplefilter("ignore", UserWarning)
                fig.write_image(path, format=fmt, width=width, height=height)
            written.append(path)
        else:
            raise ValueError(f"format {fmt!r} is not valid; choose from html, png, svg, pdf")
    if log and written:
        with open(log, "a", encoding="utf-8") as fh:
            fh.writelines(f"{p.resolve()}\n" for p in written)
    return written


def static_export_status() -> str:
    """'ok' if PNG/SVG export works here, else why not and what to install."""
    return "ok" if _start_kaleido() else str(_STATIC_DISABLED_REASON)


def show(
    fig,
    name: str,
    study: str,
    formats: Iterable[str] = ("html", "png"),
    subdir: str | None = None,
    log: Path | str | None = None,
) -> list[Path]:
    """Export `fig` (see `export`) and display it; return the files written."""
    written = export(fig, name, study, formats=formats, subdir=subdir, log=log)
    fig.show()
    return written


def titled(fig, title: str, caption: str | None = None):
    """`fig` with `title` and, on a smaller second line, `caption` (the counts behind it)."""
    text = title if not caption else f"{title}<br><sup>{caption}</sup>"
    return fig.update_layout(title=dict(text=text), margin=dict(t=90 if caption else 60))


def placeholder(title: str, message: str, caption: str | None = None):
    """An empty figure that says why there is nothing to draw."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=15))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return titled(fig, title, caption)
