"""Self-contained HTML pages (reports): headings, text, tables and PNG pictures.

A page has inline CSS and no external URL (no scripts, fonts or stylesheets from elsewhere; the
favicon is an empty data URL so a browser asks for nothing). Pictures are referenced by paths
relative to the page's folder, inside it (``fig.png``, ``previews/epoch001.png``), so the folder
can be moved or zipped as a whole. All text is HTML-escaped. :meth:`Page.write` checks that every
picture exists and writes the page atomically.

Example::

    page = Page("cryoden evaluate")
    page.paragraph("Split SNR per method.")
    page.table(["method", "split SNR (dB)"], [["raw", -12.3], ["unet", -2.1]])
    page.image("frc.png", "FRC curves", caption="FRC of each method")
    page.write(outdir / "report.html")
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from . import io

CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em;
       color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
p.note { color: #555; font-size: 0.9em; }
"""

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _cell(v) -> str:
    """Table cell text: floats to 4 significant digits, NaN/None as an empty cell."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def check_relative(src: str) -> str:
    """``src`` as a relative POSIX path inside the page's folder; ValueError otherwise."""
    p = PurePosixPath(src)
    if not src or _SCHEME.match(src) or p.is_absolute() or "\\" in src or ".." in p.parts:
        raise ValueError(f"picture path {src!r} must be relative, inside the page's folder")
    return str(p)


class Page:
    """An HTML page built in order; :meth:`html` gives the text, :meth:`write` writes it."""

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        self.images: list[str] = []

    def heading(self, text: str, level: int = 2) -> Page:
        level = min(max(int(level), 1), 6)
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def paragraph(self, text: str, note: bool = False) -> Page:
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def preformatted(self, text: str) -> Page:
        self._parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> Page:
        """A table: ``header`` (n,) column names, ``rows`` each (n,) values (floats: 4 digits)."""
        out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)]
        for row in rows:
            if len(row) != len(header):
                raise ValueError(f"table row has {len(row)} cells, header has {len(header)}")
            out.append("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row))
        out.append("</table>")
        self._parts.append("\n".join(out))
        return self

    def image(
        self, src: str, alt: str, caption: str | None = None, width: int | None = None
    ) -> Page:
        """A picture at ``src`` (relative to the page's folder), with alt text and caption."""
        src = check_relative(str(src))
        self.images.append(src)
        w = f' width="{int(width)}"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure><img src="{html.escape(src, quote=True)}" alt="{html.escape(alt)}"'
            f' loading="eager"{w}>{cap}</figure>'
        )
        return self

    def html(self) -> str:
        body = "\n".join(self._parts)
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n"
            '<link rel="icon" href="data:,">\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page atomically to ``path``; ValueError (naming the picture) if a picture
        is missing from the page's folder. -> ``path``."""
        path = Path(path)
        for src in self.images:
            if not (path.parent / src).is_file():
                raise ValueError(f"{path}: picture {src} is missing")
        with io.atomic(path) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
        return path
