"""Headless Chromium for page tests: the DOM of a local page after its scripts ran.

Chromium is Debian's `chromium` package (`make test` installs it where apt-get exists).
The browser runs with name resolution switched off, so a page that needs the network shows
it; `--no-sandbox` because the tests may run as root in a container, and the page is ours.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium() -> str | None:
    """$CHROMIUM, else the first Chromium on PATH."""
    return os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, NAMES)), None)


def dump_dom(page: Path, *, binary: str, timeout_s: float = 120) -> str:
    """The serialised DOM once the page has loaded and its scripts have run (up to 10 s of
    the page's own timers). The browser's process group ends with the call."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000",
             "--dump-dom", page.resolve().as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its renderer and helper processes too
            except ProcessLookupError:
                pass
            proc.wait()
    if proc.returncode != 0 or "</html>" not in out:
        raise RuntimeError(f"{binary} --dump-dom exited {proc.returncode}: {err[-2000:]}")
    return out


@dataclass
class Page:
    """What a test reads off a dumped DOM."""
    text: list[str] = field(default_factory=list)
    """Text a reader sees (not inside <script> or <style>), SVG labels included."""
    by_id: dict[str, str] = field(default_factory=dict)
    """Text of each element with an id."""
    plots: dict[str, dict] = field(default_factory=dict)
    """Each plotly graph div by id: its classes and how many <svg class="main-svg"> it holds."""
    rows: list[list[str]] = field(default_factory=list)
    """The cells of each body row of the table with id "trials"."""


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page, self.stack = Page(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if "plotly-graph-div" in classes:
            self.page.plots[attrs["id"]] = {"classes": classes, "main_svg": 0}
        if tag == "svg" and "main-svg" in classes:
            plot = next((a["id"] for _, a in reversed(self.stack) if a.get("id") in self.page.plots), None)
            if plot is not None:
                self.page.plots[plot]["main_svg"] += 1
        if tag == "tr" and self._inside("tbody") and self._inside_id("trials"):
            self.page.rows.append([])
        if tag == "td" and self.page.rows and self._inside_id("trials"):
            self.page.rows[-1].append("")
        if tag not in VOID:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if any(t in ("script", "style") for t, _ in self.stack):
            return
        self.page.text.append(data)
        for _, attrs in self.stack:
            if "id" in attrs:
                self.page.by_id[attrs["id"]] = self.page.by_id.get(attrs["id"], "") + data
        if self._inside("td") and self._inside_id("trials"):
            self.page.rows[-1][-1] += data

    def _inside(self, tag: str) -> bool:
        return any(t == tag for t, _ in self.stack)

    def _inside_id(self, id_: str) -> bool:
        return any(a.get("id") == id_ for _, a in self.stack)


def read_page(dom: str) -> Page:
    reader = _Reader()
    reader.feed(dom)
    return reader.page
