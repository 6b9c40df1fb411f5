"""Load HTML pages in real headless Chromium and report what a reader would see go wrong.

Not a test module (no ``test_`` prefix): the report tests import :func:`check_pages`.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``; ``CRYODEN_CHROMIUM``
names another binary), driven by the ``playwright`` package (test extra). Nothing is skipped:
a missing browser fails the calling test with a message saying how to install it.
Each page is opened from a ``file://`` URL with the network blocked; a page is clean when it has
no console error, no uncaught script error, no failed or external request, and every ``<img>``
has decoded (``complete`` and ``naturalWidth > 0``).

When playwright's driver cannot start, :func:`check_pages` falls back to ``chromium --headless
--dump-dom`` (backend ``dump-dom``): a copy of the page with a probe script that, on load,
writes every image's ``naturalWidth`` into the DOM, and Chromium's console log on stderr (every
console message counts as an error: our pages have no scripts). That backend sees no failed
requests, only their effect on the images.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CRYODEN_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# every <img> once it has loaded or failed: [src attribute, complete, naturalWidth]
_IMAGES_JS = """async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
    i.addEventListener('load', r); i.addEventListener('error', r); })));
  return imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);
}"""


@dataclasses.dataclass
class PageCheck:
    """What one page did in the browser."""

    path: Path
    console_errors: list[str]
    failed_requests: list[str]  # failed loads and any request that left file://
    images: list[tuple[str, int]]  # (src, naturalWidth) of every <img>

    @property
    def broken_images(self) -> list[str]:
        return [src for src, width in self.images if width <= 0]

    @property
    def problems(self) -> list[str]:
        return (
            [f"console: {m}" for m in self.console_errors]
            + [f"request: {r}" for r in self.failed_requests]
            + [f"image does not decode: {s}" for s in self.broken_images]
        )


def chromium() -> str:
    """Path of the Chromium binary; fails the test (never skips) when it is missing."""
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's package "
            "(sudo apt-get install -y chromium; .ci/run does) or set CRYODEN_CHROMIUM",
            pytrace=False,
        )
    return path


def check_pages(paths: list[str | os.PathLike], backend: str = "playwright") -> list[PageCheck]:
    """Open each HTML file in headless Chromium; -> one :class:`PageCheck` per page.

    backend: ``playwright`` (falls back to ``dump-dom`` when its driver cannot start) or
    ``dump-dom``.
    """
    exe = chromium()
    if backend == "playwright":
        try:
            from playwright.sync_api import Error, sync_playwright
        except ImportError:
            pytest.fail("the playwright package is missing: pip install -e '.[test]'",
                        pytrace=False)  # fmt: skip
        try:
            return _with_playwright(exe, paths, sync_playwright)
        except (Error, OSError) as e:  # the driver (a node process) did not run
            warnings.warn(f"playwright could not drive Chromium ({e}); using --dump-dom",
                          stacklevel=2)  # fmt: skip
    return [_dump_dom(exe, Path(p)) for p in paths]


_PROBE = """<script>window.addEventListener('load', () => {
  const out = Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth]);
  const pre = document.createElement('pre'); pre.id = 'cryoden-probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre); });</script>"""


def _dump_dom(exe: str, path: Path) -> PageCheck:
    """One page through ``chromium --dump-dom`` with the probe script (module doc)."""
    path = path.resolve()
    probe = path.with_name(f".{path.stem}.probe.html")  # beside it: relative images resolve
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"))
    try:
        p = subprocess.run(
            [exe, *ARGS, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        probe.unlink()
    found = re.search(r'<pre id="cryoden-probe">(.*?)</pre>', p.stdout, re.S)
    if found is None:
        pytest.fail(f"{path}: chromium --dump-dom gave no probe result: {p.stderr[-500:]}",
                    pytrace=False)  # fmt: skip
    images = [(src, int(w)) for src, w in json.loads(html.unescape(found.group(1)))]
    console = [m.group(1) for m in re.finditer(r":CONSOLE[^\]]*\] (.*)", p.stderr)]
    return PageCheck(path, console, [], images)


def _with_playwright(exe: str, paths, sync_playwright) -> list[PageCheck]:
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS, headless=True)
        try:
            for path in paths:
                path = Path(path).resolve()
                page = browser.new_page()
                errors, failed = [], []
                page.on("console", lambda m, e=errors: m.type == "error" and e.append(m.text))
                page.on("pageerror", lambda exc, e=errors: e.append(f"uncaught: {exc}"))
                page.on("requestfailed", lambda r, f=failed: f.append(f"{r.url} ({r.failure})"))

                def route(r, f=failed):
                    if r.request.url.startswith(("file:", "data:")):
                        return r.continue_()
                    f.append(f"external {r.request.url}")
                    return r.abort()

                page.route("**/*", route)
                page.goto(path.as_uri(), wait_until="load", timeout=30_000)
                images = [(src, int(w)) for src, _, w in page.evaluate(_IMAGES_JS)]
                out.append(PageCheck(path, errors, failed, images))
                page.close()
        finally:
            browser.close()
    return out
