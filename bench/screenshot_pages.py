"""Screenshot every report page of a store in headless Chromium, to look at them as a reader would.

    python bench/screenshot_pages.py STORE/reports --out /tmp/shots [--widths 420,1400] [--tile 1800]

Each page (every `index.html` under the folder, the reports index included, and the landscape PNGs
beside them) is drawn at each width in a window `--height` pixels tall; the blank bottom is trimmed and
what is left is cut into tiles of `--tile` pixels (`NAME-WIDTH-1.png`, `-2`, …), small enough for an
image viewer to show at full size. Needs Debian's `chromium` (apt-get install chromium). Not a test: CI
machines rarely carry a browser. Prints one PNG path per tile; open them and look.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--hide-scrollbars"]


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 1600) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("No Chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return out


def tiles(shot: Path, tile: int) -> list[Path]:
    """Trim the background above and below a screenshot's content (a PNG is shown centred in the window)
    and cut the rest into tiles `tile` pixels tall."""
    with Image.open(shot) as image:
        rgb = np.asarray(image.convert("RGB"))
    background = rgb[-1, -1]
    used = np.flatnonzero(np.any(rgb != background, axis=(1, 2)))
    first, bottom = (max(0, int(used[0]) - 8), int(used[-1]) + 16) if used.size else (0, rgb.shape[0])
    out = []
    for i, top in enumerate(range(first, min(bottom, rgb.shape[0]), tile), start=1):
        path = shot.with_name(f"{shot.stem}-{i}.png")
        Image.fromarray(rgb[top:min(top + tile, bottom)]).save(path)
        out.append(path)
    shot.unlink()
    return out


def pages(reports: Path) -> list[tuple[str, Path]]:
    """(name, file) for every page under `reports`: report folders by their name less the model key
    (`table1-20261202-141143`), the index as `index`, landscapes by their file name."""
    found = [(re.sub(r"^([a-z0-9]+)-.+-(\d{8}-\d{6})$", r"\1-\2", p.parent.name) if p.parent != reports else "index", p)
             for p in sorted(reports.rglob("index.html"))]
    return found + [(p.stem, p) for p in sorted(reports.glob("landscape-*.png"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, help="a report directory, or a folder of them (STORE/reports)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/report-shots"))
    parser.add_argument("--widths", default="420,1400", help="comma-separated window widths in CSS pixels")
    parser.add_argument("--height", type=int, default=6000, help="window height; a longer page is cut off")
    parser.add_argument("--tile", type=int, default=1800, help="height of each saved piece")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, page in pages(args.reports):
        for width in (int(w) for w in args.widths.split(",")):
            for piece in tiles(screenshot(page, args.out / f"{name}-{width}.png", width, args.height), args.tile):
                print(piece)


if __name__ == "__main__":
    main()
