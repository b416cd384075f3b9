"""Self-contained static HTML reports: page skeleton, tables, figures, PNGs, atomic output.

Shared by the dataset report (`python -m pipeline.inspect`) and the trainer's run page. A report
is one directory holding `index.html` and the PNGs it shows by relative path. Nothing refers
to the network: CSS is inline, fonts are the system's, there are no scripts, so the page opens
from a file, a web server or a zip archive, and prints cleanly (see the `@media print` rules).

Plots are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through `pyplot`, so
no GUI backend is touched and figures are freed as soon as they are saved.

    page = Page("Run 42", subtitle="SpectralGPT pretraining")
    with atomic_dir(out) as tmp:
        fig = new_figure(8, 3)
        ...
        page.section("loss", "Loss", figure_html(save_png(fig, tmp / "loss.png"), alt="loss curves"))
        (tmp / "index.html").write_text(page.render(), encoding="utf-8")
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

COPERNICUS_CREDIT = "Contains modified Copernicus Sentinel data"

# Colour-blind-safe categorical palette (Okabe & Ito 2008), also used for splits in plots.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]

# Laptop-first layout (max ~1200 px column); print rules hide navigation, keep figures and
# table rows whole and shrink text to fit A4.
CSS = """
:root { --fg: #1b1f24; --muted: #59636e; --line: #d0d7de; --bg: #ffffff; --band: #f6f8fa; --accent: #0072B2; }
* { box-sizing: border-box; }
html { font-size: 15px; }
body { margin: 0; color: var(--fg); background: var(--bg);
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Helvetica Neue", Arial, sans-serif;
       line-height: 1.45; }
header.page { padding: 1.2rem 2rem 0.8rem; border-bottom: 1px solid var(--line); background: var(--band); }
header.page h1 { margin: 0 0 0.2rem; font-size: 1.6rem; }
header.page p { margin: 0.15rem 0; color: var(--muted); }
.headline { font-size: 1.1rem; color: var(--fg) !important; }
.headline strong { font-size: 1.35rem; }
nav.toc { position: sticky; top: 0; z-index: 1; background: var(--bg); border-bottom: 1px solid var(--line);
          padding: 0.4rem 2rem; font-size: 0.9rem; }
nav.toc a { margin-right: 1.1rem; color: var(--accent); text-decoration: none; white-space: nowrap; }
nav.toc a:hover { text-decoration: underline; }
main { max-width: 1240px; padding: 0 2rem 2rem; }
section { margin-top: 1.6rem; }
section > h2 { font-size: 1.3rem; border-bottom: 2px solid var(--fg); padding-bottom: 0.2rem; margin-bottom: 0.6rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 0.4rem; }
p.note, figcaption, .muted { color: var(--muted); font-size: 0.9rem; }
figure { margin: 0.6rem 0 1rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { margin-top: 0.3rem; max-width: 70rem; }
table { border-collapse: collapse; margin: 0.4rem 0 1rem; font-size: 0.88rem; }
caption { text-align: left; font-weight: 600; padding: 0.2rem 0; }
th, td { border-bottom: 1px solid var(--line); padding: 0.22rem 0.6rem; text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid var(--fg); background: var(--band); }
tbody tr:nth-child(even) { background: var(--band); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mono, code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.84rem; }
.scroll { overflow-x: auto; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 0.15rem 1.2rem; margin: 0.4rem 0 1rem; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; overflow-wrap: anywhere; }
.warn { border-left: 4px solid #D55E00; background: #fff4ec; padding: 0.4rem 0.8rem; margin: 0.6rem 0; }
details summary { cursor: pointer; color: var(--accent); }
footer.page { margin-top: 2rem; padding: 0.8rem 2rem; border-top: 1px solid var(--line); color: var(--muted);
              font-size: 0.85rem; }
@media (max-width: 700px) { main, header.page, nav.toc, footer.page { padding-left: 0.8rem; padding-right: 0.8rem; } }
@page { size: A4; margin: 12mm; }
@media print {
  html { font-size: 10pt; }
  nav.toc { display: none; }
  header.page { background: none; padding: 0 0 0.4rem; }
  main { max-width: none; padding: 0; }
  footer.page { padding: 0.4rem 0 0; }
  a { color: inherit; text-decoration: none; }
  figure, tr, dl.kv, .warn { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
  section.pagebreak { break-before: page; }
  .scroll { overflow: visible; }
  tbody tr:nth-child(even) { background: none; }
  details summary { color: inherit; }  /* collapsed details (chip keys, config) stay collapsed on paper */
}
"""


def esc(value: Any) -> str:
    """HTML-escape any value's `str()`; `None` renders as an em dash.

    Every value interpolated into a page goes through this, numbers too: report values come
    from manifests, sample JSON and metrics files written by others, and a "number" there can
    be any JSON value. Only `Cell`, captions and headlines carry pre-rendered markup, built by
    the caller with `esc` around each value.
    """
    return "\u2014" if value is None else html.escape(str(value), quote=True)


@dataclass
class Cell:
    """A table cell with pre-escaped HTML content (use for links, code, markup)."""

    html: str
    numeric: bool = False


def fmt_num(v: Any, digits: int = 4) -> str:
    """Numbers for tables: ints with thin thousands separators, floats with `digits` significant places."""
    if v is None:
        return "\u2014"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}".replace(",", "\u202f")
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def fmt_bytes(n: int | float | None) -> str:
    """Human-readable size in binary units (KiB, MiB, ...)."""
    if n is None:
        return "\u2014"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    caption: str | None = None,
    numeric: Sequence[int] = (),
    mono: Sequence[int] = (),
    table_id: str | None = None,
) -> str:
    """An HTML table. Cells are escaped unless they are `Cell`; numbers are formatted with `fmt_num`.

    Args:
        header: column titles.
        rows: one sequence per row.
        caption: optional caption above the table.
        numeric: column indices to right-align with tabular digits (ints/floats detected too).
        mono: column indices shown in a monospace font (ids, hashes).
        table_id: optional `id` attribute.
    """
    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    out = [f'<div class="scroll"><table{id_attr}>']
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(
        f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>" for i, h in enumerate(header)
    ) + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = []
            if isinstance(v, Cell):
                content = v.html
                if v.numeric or i in numeric:
                    cls.append("num")
            else:
                is_num = isinstance(v, (int, float)) and not isinstance(v, bool)
                content = esc(fmt_num(v)) if (is_num or v is None or isinstance(v, bool)) else esc(v)
                if is_num or i in numeric:
                    cls.append("num")
            if i in mono:
                cls.append("mono")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{content}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column definition list; values are escaped unless they are `Cell`."""
    items = "".join(
        f"<dt>{esc(k)}</dt><dd>{v.html if isinstance(v, Cell) else esc(v)}</dd>" for k, v in pairs
    )
    return f'<dl class="kv">{items}</dl>'


@dataclass(frozen=True)
class Png:
    """A PNG written into the report directory: its name relative to `index.html` and pixel size."""

    name: str
    width: int
    height: int


def new_figure(width_in: float, height_in: float, *, dpi: int = 100, layout: str | None = "constrained") -> Figure:
    """A pyplot-free matplotlib figure on the Agg canvas (safe in threads and without a display).

    `layout=None` turns the layout engine off, for figures placed in pixel coordinates.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, target: Path | BinaryIO, *, dpi: int | None = None) -> Png:
    """Save `fig` as PNG to a path or binary file object; return its name and pixel size.

    Sizes are read back from the PNG header (constrained layout changes them). A file
    object gets the name `""`.
    """
    fig.savefig(target, format="png", dpi=dpi or fig.dpi, facecolor="white", metadata={"Software": None})
    fig.clear()
    if isinstance(target, (str, Path)):
        return png_info(Path(target))
    return _png_from_header("", target.getvalue()[:24] if hasattr(target, "getvalue") else b"")


def png_info(path: Path) -> Png:
    """Name and pixel size of an existing PNG (read from its IHDR chunk)."""
    with open(path, "rb") as f:
        return _png_from_header(path.name, f.read(24))


def _png_from_header(name: str, head: bytes) -> Png:
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{name or 'data'} is not a PNG file")
    return Png(name, int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))


def figure_html(png: Png, *, alt: str, caption: str | None = None, max_css_width: int | None = None) -> str:
    """An `<img>` of a report PNG (relative path, explicit size so the layout does not jump)."""
    width = png.width if max_css_width is None else min(png.width, max_css_width)
    height = round(png.height * width / png.width) if png.width else png.height
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure><img src="{esc(png.name)}" width="{esc(width)}" height="{esc(height)}" alt="{esc(alt)}" '
        f'loading="eager" decoding="sync">{cap}</figure>'
    )


@dataclass
class Section:
    """One titled section of a page; `html` is already-rendered content."""

    id: str
    title: str
    html: str
    page_break: bool = False


@dataclass
class Page:
    """A report page: header (title, subtitle, headline), table of contents, sections, footer.

    Args:
        title: `<title>` and `<h1>`.
        subtitle: plain text line under the title.
        headline: pre-rendered HTML line under the subtitle (key numbers, e.g. the chip count).
        credits: plain text lines in the footer (data licences, software versions).
    """

    title: str
    subtitle: str | None = None
    headline: str | None = None
    credits: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def section(self, id: str, title: str, *blocks: str, page_break: bool = False) -> None:
        """Append a section made of pre-rendered HTML blocks."""
        self.sections.append(Section(id, title, "\n".join(blocks), page_break))

    def render(self) -> str:
        """The complete HTML document (UTF-8, no external references)."""
        toc = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in self.sections)
        pb = ' class="pagebreak"'
        body = "\n".join(
            f'<section id="{esc(s.id)}"{pb if s.page_break else ""}>'
            f"<h2>{esc(s.title)}</h2>\n{s.html}\n</section>"
            for s in self.sections
        )
        sub = f"<p>{esc(self.subtitle)}</p>" if self.subtitle else ""
        head = f'<p class="headline">{self.headline}</p>' if self.headline else ""
        credits = "".join(f"<p>{esc(c)}</p>" for c in self.credits)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head>\n"
            f'<body><header class="page"><h1>{esc(self.title)}</h1>{sub}{head}</header>\n'
            f'<nav class="toc">{toc}</nav>\n<main>\n{body}\n</main>\n'
            f'<footer class="page">{credits}</footer>\n</body></html>\n'
        )


@contextlib.contextmanager
def atomic_dir(out: Path, *, markers: Sequence[str] = ("index.html",)) -> Iterator[Path]:
    """Build a report in a temporary sibling of `out`, then swap it in place of `out`.

    Readers never see a half-written report: the new directory appears by `rename`. A
    previous report at `out` is replaced only if it holds one of `markers` (or is empty), so a
    mistyped `--out` cannot wipe an unrelated directory. On any error the temporary
    directory is removed and `out` is left as it was.

    Raises:
        FileExistsError: `out` exists and is not a previous report.
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and (any((out / m).exists() for m in markers) or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a report (no {' or '.join(markers)}): choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a report is meant to be shared
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` via a temporary file in the same directory and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
