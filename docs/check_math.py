"""Check that the documentation site's maths renders offline, in a real browser.

Builds the site (``mkdocs build --strict``) or takes a built one, serves it on
127.0.0.1 and opens pages in headless Chromium with every other host unresolvable,
so the browser is offline as far as the site is concerned. For each page it:

* dumps the DOM after the scripts ran and checks that every ``arithmatex`` element
  (the docstrings' ``:math:`` roles and ``.. math::`` blocks, and ``$...$`` in the
  Markdown pages) holds KaTeX output, that none is a ``katex-error``, and that no raw
  ``\\(``, ``\\[`` or ``$$`` delimiter is left in the visible text;
* takes a screenshot (``--out DIR`` keeps them);
* checks from Chromium's network log and the local server's log that the page asked
  for nothing outside the local site, got no 404, and loaded KaTeX's fonts.

It also checks the built HTML and CSS for CDN addresses (jsdelivr, unpkg, Google
Fonts, ...).

Usage (from the repository root, after ``pip install -e ".[docs]"`` and with Debian's
``chromium`` installed)::

    python docs/check_math.py                      # build, check the default pages
    python docs/check_math.py --site DIR --all     # a built site, every page with maths
    python docs/check_math.py --out shots/         # keep the screenshots and DOM dumps

Exits 0 when every check passes, 1 otherwise, 2 when Chromium or mkdocs is missing.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The sampler pages are the heart of the docs; laplace/ has Markdown maths, api/laplace/
# the most formulas (with `\\` line breaks); kernels/ has none and must show no raw TeX.
DEFAULT_PAGES = [
    "api/samplers/sghmc/",
    "api/samplers/sgld/",
    "api/laplace/",
    "laplace/",
    "kernels/",
]
# Pages that must have maths, so a check that found none cannot pass by accident.
MUST_HAVE_MATH = {"api/samplers/sghmc/", "api/samplers/sgld/", "api/laplace/", "laplace/"}

CDN = re.compile(r"(?i)cdn\.|jsdelivr|unpkg|googleapis|gstatic|cdnjs")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}
_HIDDEN = {"script", "style", "code", "pre", "annotation", "textarea", "noscript"}
_RAW_DELIMITER = re.compile(r"\\\(|\\\[|\$\$")


def find_chromium() -> str | None:
    """The Chromium executable: $CHROMIUM, else the first of the usual names on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def build_site(site_dir: Path) -> None:
    """``mkdocs build --strict`` of this repository into ``site_dir``."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--quiet",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(site_dir),
        ],
        check=True,
        cwd=REPO,
        env=env,
    )


@dataclass
class _Math:
    display: bool
    rendered: bool = False
    raw: str = ""


class DomAudit(HTMLParser):
    """Walks a DOM dump: arithmatex elements, KaTeX output and errors, raw delimiters."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.maths: list[_Math] = []
        self.errors: list[str] = []
        self.leftovers: list[str] = []
        self._stack: list[tuple[str, _Math | None, bool]] = []  # tag, maths opened, hidden

    def _hidden(self) -> bool:
        return bool(self._stack) and self._stack[-1][2]

    def _current_math(self) -> _Math | None:
        for _, math, _ in reversed(self._stack):
            if math is not None:
                return math
        return None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        math = self._current_math()
        if math is not None and ("katex" in classes or "katex-display" in classes):
            math.rendered = True
        if "katex-error" in classes:
            self.errors.append(dict(attrs).get("title") or "katex-error")
        if tag in _VOID:
            return
        opened = None
        if "arithmatex" in classes:
            opened = _Math(display=tag == "div")
            self.maths.append(opened)
        self._stack.append((tag, opened, self._hidden() or tag in _HIDDEN))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if self._hidden():
            return
        if self._stack and self._stack[-1][1] is not None:  # text right inside arithmatex
            self._stack[-1][1].raw += data
        if _RAW_DELIMITER.search(data):
            self.leftovers.append(" ".join(data.split())[:120])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[str, int]]

    def log_request(self, code="-", size="-") -> None:  # noqa: ARG002
        self.log.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass


class SiteServer:
    """The built site over HTTP on 127.0.0.1 (a free port), recording each request."""

    def __init__(self, site_dir: Path) -> None:
        self.log: list[tuple[str, int]] = []
        handler = type("Handler", (_QuietHandler,), {"log": self.log})
        self._httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(site_dir))
        )
        self.origin = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> SiteServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _page_requests(net_log: Path, origin: str) -> set[str]:
    """URLs that the page (not the browser's own services) asked for, from a net log."""
    data = json.loads(net_log.read_text())
    start_job = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = set()
    for event in data["events"]:
        params = event.get("params") or {}
        if event["type"] == start_job and str(params.get("initiator", "")).startswith(origin):
            urls.add(params["url"])
    return urls


def check_page(
    chromium: str, server: SiteServer, site_dir: Path, page: str, work: Path
) -> list[str]:
    """Open one page offline; return the failures (empty when it renders)."""
    slug = page.strip("/").replace("/", "_") or "index"
    net_log = work / f"{slug}.netlog.json"
    screenshot = work / f"{slug}.png"
    first_request = len(server.log)
    cmd = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--disable-default-apps",
        f"--user-data-dir={work / ('profile-' + slug)}",
        # Offline: every host but the local server fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--log-net-log={net_log}",
        "--window-size=1280,2000",
        "--virtual-time-budget=10000",
        f"--screenshot={screenshot}",
        "--dump-dom",
        f"{server.origin}/{page}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = run.stdout
    (work / f"{slug}.dom.html").write_text(dom)
    failures = []
    if run.returncode != 0 or "</html>" not in dom:
        return [f"{page}: chromium exited {run.returncode}: {run.stderr[-500:]}"]
    if not screenshot.exists():
        failures.append(f"{page}: no screenshot written")

    audit = DomAudit()
    audit.feed(dom)
    audit.close()
    source = (site_dir / page / "index.html").read_text()
    expected = source.count('class="arithmatex"')
    rendered = sum(m.rendered for m in audit.maths)
    if len(audit.maths) != expected:
        failures.append(
            f"{page}: {len(audit.maths)} arithmatex elements in the DOM, "
            f"{expected} in the built HTML"
        )
    if page in MUST_HAVE_MATH and expected == 0:
        failures.append(f"{page}: no maths on the page (expected some)")
    for math in audit.maths:
        if not math.rendered:
            failures.append(f"{page}: not typeset: {' '.join(math.raw.split())[:120]!r}")
    failures += [f"{page}: KaTeX error: {e[:200]}" for e in audit.errors]
    failures += [f"{page}: raw TeX delimiter in the text: {t!r}" for t in audit.leftovers]

    requests = server.log[first_request:]
    failures += [f"{page}: {path} answered {code}" for path, code in requests if code >= 400]
    if expected and not any(p.startswith("/javascripts/katex/fonts/") for p, _ in requests):
        failures.append(f"{page}: no KaTeX font was loaded from the site")
    outside = sorted(
        u for u in _page_requests(net_log, server.origin) if not u.startswith(server.origin + "/")
    )
    failures += [f"{page}: asked the network for {u}" for u in outside]
    print(
        f"{page}: {rendered}/{expected} formulas typeset, {len(audit.errors)} errors, "
        f"{len(requests)} local requests, {len(outside)} outside; {screenshot}"
    )
    return failures


def check_cdn_references(site_dir: Path) -> list[str]:
    """No HTML or CSS page, nor our own scripts, names a CDN or Google Fonts.

    mkdocs-material's bundle (assets/javascripts/bundle.*.js) names unpkg for Mermaid
    diagrams and an old-browser polyfill, loaded only when needed; the browser check's
    network log covers what it actually loads.
    """
    failures = []
    files = [
        *site_dir.rglob("*.html"),
        *site_dir.rglob("*.css"),
        *(site_dir / "javascripts").rglob("*.js"),
    ]
    for path in files:
        text = path.read_text(errors="replace")
        match = CDN.search(text)
        if match:
            context = text[max(0, match.start() - 40) : match.end() + 40]
            failures.append(f"{path.relative_to(site_dir)}: CDN reference: {context!r}")
    return failures


def math_pages(site_dir: Path) -> list[str]:
    """Every page of the built site that has maths, as server paths."""
    pages = []
    for path in sorted(site_dir.rglob("index.html")):
        if 'class="arithmatex"' in path.read_text():
            rel = path.parent.relative_to(site_dir).as_posix()
            pages.append("" if rel == "." else rel + "/")
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, help="a built site (default: build one)")
    parser.add_argument("--out", type=Path, help="keep screenshots, DOM dumps and net logs here")
    parser.add_argument("--all", action="store_true", help="every page with maths too")
    parser.add_argument("pages", nargs="*", help=f"site paths (default: {DEFAULT_PAGES})")
    args = parser.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print("chromium not found (apt-get install chromium, or set $CHROMIUM)")
        return 2
    with tempfile.TemporaryDirectory(prefix="check-math-") as tmp:
        work = args.out or Path(tmp) / "out"
        work.mkdir(parents=True, exist_ok=True)
        site_dir = args.site
        if site_dir is None:
            site_dir = Path(tmp) / "site"
            if importlib.util.find_spec("mkdocs") is None:
                print('mkdocs not installed (pip install -e ".[docs]")')
                return 2
            try:
                build_site(site_dir)
            except subprocess.CalledProcessError as err:
                print(f"mkdocs build failed: {err}")
                return 1
        pages = args.pages or list(DEFAULT_PAGES)
        if args.all:
            pages += [p for p in math_pages(site_dir) if p not in pages]

        failures = check_cdn_references(site_dir)
        with SiteServer(site_dir) as server:
            for page in pages:
                failures += check_page(chromium, server, site_dir, page, work)
    for failure in failures:
        print("FAIL", failure)
    print(f"{len(pages)} pages checked, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
