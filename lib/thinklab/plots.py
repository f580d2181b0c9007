"""Figure export, shared by every notebook: HTML always, PNG/SVG through kaleido.

HTML loads plotly.js from the CDN by default (a few KB per file); `embed_plotlyjs=True`
makes it self-contained (about 5 MB). Static images need a Chromium that kaleido can
drive (Debian: `apt-get install chromium`; elsewhere `plotly_get_chrome`); one browser
session is started on first use and reused for every later figure. Where no browser
exists, HTML is still written and the static step says what to install, once.

Two environment variables let `thinklab batch` keep each parameter set's figures apart
without touching the notebooks: `THINKLAB_FIGURE_SUBDIR` puts them under
figures/<study>/<subdir>/, and `THINKLAB_FIGURE_LOG` names a file that gets one line per
file written, so the batch index lists exactly what a set produced.
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
) -> list[Path]:
    """Write `fig` as figures/<study>/<name>.<fmt> for each format; return the files written."""
    target = Path(out_dir) if out_dir else paths.figures_dir(study) / os.environ.get("THINKLAB_FIGURE_SUBDIR", "")
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
    log = os.environ.get("THINKLAB_FIGURE_LOG")
    if log and written:
        with open(log, "a", encoding="utf-8") as fh:
            fh.writelines(f"{p.resolve()}\n" for p in written)
    return written


def static_export_status() -> str:
    """'ok' if PNG/SVG export works here, else why not and what to install."""
    return "ok" if _start_kaleido() else str(_STATIC_DISABLED_REASON)
