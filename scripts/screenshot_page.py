#!/usr/bin/env python
"""Takes a screenshot of a page (the README's demo picture) with headless Chromium.

    python scripts/screenshot_page.py gatescope-demo/site/PAGE.html docs/demo-page.png

Uses Debian's `/usr/bin/chromium` (or CHROMIUM=...), never a downloaded browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not chromium:
        sys.exit("chromium is not installed: apt-get install chromium")
    if not args.page.is_file():
        sys.exit(f"{args.page} does not exist")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}",
             f"--window-size={args.width},{args.height}",
             f"--screenshot={args.out.resolve()}", args.page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
