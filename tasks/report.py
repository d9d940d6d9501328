"""The data-governance report on disk: plots (:mod:`tasks.report_plots`) and the HTML + Markdown renderings
(:mod:`tasks.report_format`) of :mod:`storage.report` rows, written as one folder.

``write_report`` writes one folder: ``report.html`` (self-contained: inline CSS, plots as PNG data URIs,
no script, no external address, opens offline), ``report.md`` (the same content, plots as files under
``plots/``) and ``report.json`` (the rows, for scripts). The folder is written beside the target and
swapped in when complete, so a killed run leaves the previous report (or none), never half of one.
:func:`render_markdown` without plots is the summary the flows publish as a Prefect artifact.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.lock import announce_wait, exclusive
from storage.report import ReportData
from tasks.report_format import render_html, render_markdown

MARKER = "report.json"


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put the report."""

    folder: Path
    html: Path
    markdown: Path
    data: Path
    plots: tuple[Path, ...]


# -- files --------------------------------------------------------------------------------------------------


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that is not empty and not a report of ours."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise ValueError(f"{out_dir} exists and is not a DDA lineage report folder: choose another output folder")


def write_report(
    data: ReportData, out_dir: str | Path, progress: bool = False, lock_timeout: float = 300.0
) -> ReportFiles:
    """Render ``data`` and write ``report.html``, ``report.md``, ``report.json`` and ``plots/`` into ``out_dir``.

    The folder is built beside ``out_dir`` and swapped in at the end: a previous report is replaced whole.
    Writers of one report folder take turns (a lock file ``.<name>.lock`` beside it, waited for up to
    ``lock_timeout`` seconds); the store itself is only read.
    """
    out_dir = Path(out_dir).resolve()
    _check_target(out_dir)
    from tasks.report_plots import make_plots  # matplotlib: imported by the report only

    plots = make_plots(data, progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir.with_name(f".{out_dir.name}.lock"), "dda report", lock_timeout, announce_wait):
        _check_target(out_dir)
        _swap_in(data, plots, out_dir)
    return ReportFiles(out_dir, out_dir / "report.html", out_dir / "report.md", out_dir / MARKER,
                       tuple(out_dir / "plots" / f"{stem}.png" for stem in plots))  # fmt: skip


def _swap_in(data: ReportData, plots: dict[str, bytes], out_dir: Path) -> None:
    """Write the report into a temporary folder beside ``out_dir``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-report-", dir=out_dir.parent))
    try:
        (tmp / "plots").mkdir()
        for stem, png in plots.items():
            (tmp / "plots" / f"{stem}.png").write_bytes(png)
        (tmp / "report.html").write_text(render_html(data, plots), encoding="utf-8")
        files = {stem: f"plots/{stem}.png" for stem in plots}
        (tmp / "report.md").write_text(render_markdown(data, files), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(asdict(data), indent=1, default=str, ensure_ascii=False), encoding="utf-8")
        old = out_dir.with_name(f".old-{out_dir.name}")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
