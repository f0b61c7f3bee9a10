"""Screenshot of a run's ``report.html`` in a headless Chromium (the README's picture of the report).

    python tools/report_screenshot.py RUN_DIR [--output docs/report_screenshot.png] [--write-report]

Writes ``report.html`` first when it is missing (or with ``--write-report``), then renders it with
``chromium --headless`` (Debian: ``apt-get install -y chromium``) and saves a palette-quantised PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first headless-capable Chromium found on ``PATH``."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_command(browser: str, profile: Path, *extra: str) -> list[str]:
    """A Chromium that runs headless, offline and without touching the user's profile."""
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", *extra]


def screenshot(html: Path, output: Path, *, width: int = 1280, height: int = 1800, timeout: float = 120) -> Path:
    """Render ``html`` at ``width`` × ``height`` CSS pixels and write the PNG to ``output``."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install -y chromium)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        raw = Path(profile) / "shot.png"
        subprocess.run(browser_command(browser, Path(profile), f"--screenshot={raw}",
                                       f"--window-size={width},{height}", html.resolve().as_uri()),
                       check=True, capture_output=True, timeout=timeout)
        from PIL import Image

        with Image.open(raw) as image:
            image.convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(output, optimize=True)
    return output


def dump_dom(html: Path, *, timeout: float = 120) -> str:
    """The page's DOM after Chromium loaded and laid it out."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(browser_command(browser, Path(profile), "--dump-dom", html.resolve().as_uri()),
                              check=True, capture_output=True, text=True, timeout=timeout)
    return done.stdout


PROBE_ID = "report-probe"


def probe(html: Path, script: str, *, width: int = 1280, height: int = 1800, timeout: float = 120):
    """Run ``script`` in the laid-out page at ``width`` × ``height`` CSS pixels and return what it returns.

    ``script`` is the body of a JavaScript function; its return value (JSON-serialisable) comes back as
    Python data. The page is copied beside the original (so relative links resolve the same) with the
    script appended at the end of ``<body>``; the original file is untouched.
    """
    import json

    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install -y chromium)")
    wrapped = (f'<script>(function () {{ var out; try {{ out = (function () {{ {script} }})(); }} '
               f'catch (e) {{ out = {{"error": String(e)}}; }} var pre = document.createElement("pre"); '
               f'pre.id = "{PROBE_ID}"; pre.textContent = JSON.stringify(out); '
               f'document.body.appendChild(pre); }})();</script>')
    page = html.read_text(encoding="utf-8")
    cut = page.rindex("</body>")
    with tempfile.TemporaryDirectory() as profile, \
            tempfile.NamedTemporaryFile("w", suffix=".html", dir=html.parent, encoding="utf-8") as copy:
        copy.write(page[:cut] + wrapped + page[cut:])
        copy.flush()
        done = subprocess.run(browser_command(browser, Path(profile), f"--window-size={width},{height}",
                                              "--dump-dom", Path(copy.name).resolve().as_uri()),
                              check=True, capture_output=True, text=True, timeout=timeout)
    start = done.stdout.index(f'<pre id="{PROBE_ID}">') + len(f'<pre id="{PROBE_ID}">')
    import html as markup

    return json.loads(markup.unescape(done.stdout[start:done.stdout.index("</pre>", start)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder written by run_batch.py")
    parser.add_argument("--output", type=Path, default=Path("docs/report_screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1800)
    parser.add_argument("--write-report", action="store_true", help="rewrite report.html even if it exists")
    args = parser.parse_args(argv)
    html = args.run_dir / "report.html"
    if args.write_report or not html.is_file():
        from cassia_helpers.summary.report import write_report

        html = write_report(args.run_dir)
    try:
        path = screenshot(html, args.output, width=args.width, height=args.height)
    except (FileNotFoundError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
