"""Screenshot every report page of a store in headless Chromium, to look at them as a reader would.

    python bench/screenshot_pages.py STORE/reports --out /tmp/shots [--height 1600]

Needs Debian's `chromium` (apt-get install chromium). Not a test: CI machines rarely carry a browser.
Prints one PNG path per page; open them and look.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 1600) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("No Chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={out}", f"--window-size={width},{height}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", type=Path, help="a report directory, or a folder of them (STORE/reports)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/report-shots"))
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for page in sorted(args.reports.rglob("index.html")):
        shot = screenshot(page, args.out / f"{page.parent.name}.png", height=args.height)
        print(shot)


if __name__ == "__main__":
    main()
