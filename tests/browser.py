"""Open a page in a real headless Chromium and report what its images did (tests of the HTML report)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Appended to a copy of the page (the report itself has no script): after load, every <img> is checked.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map((i) => i.alt);
  const sizes = images.map((i) => [i.naturalWidth, i.naturalHeight]);
  document.body.setAttribute("data-probe", JSON.stringify({count: images.length, broken: broken, sizes: sizes}));
});
</script>"""


def chromium() -> str:
    """The Chromium executable (``TILEAD_CHROMIUM`` or the PATH).

    Skips the test when there is none, unless ``TILEAD_REQUIRE_BROWSER=1`` (set by ``.ci/run``): then it fails.
    """
    found = os.environ.get("TILEAD_CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if found is None:
        reason = (
            "no Chromium on this machine (looked for " + ", ".join(CANDIDATES) + " and $TILEAD_CHROMIUM); "
            "install it with: apt-get install chromium"
        )
        if os.environ.get("TILEAD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TILEAD_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return found


def render_images(page: Path, timeout: float = 120.0) -> dict[str, Any]:
    """Load ``page`` in headless Chromium; ``{"count", "broken", "sizes"}`` of its ``<img>`` elements after load."""
    text = page.read_text(encoding="utf-8")
    if "</body>" not in text:
        raise AssertionError(f"{page}: no </body>")
    with tempfile.TemporaryDirectory(prefix="tilead-browser-") as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(text.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",  # root in containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp}/profile",
            "--virtual-time-budget=30000",
            "--dump-dom",
            probe.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    if found is None:
        raise AssertionError(f"the probe did not run (no data-probe in the DOM); stderr: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return result
