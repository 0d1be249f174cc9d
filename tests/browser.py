"""Headless Chromium for the report tests: load a report in an iframe, run a probe on it from
the wrapper page (the report itself allows no script), and read the probe's JSON back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def probe_report(report: Path, probe_js: str) -> dict:
    """`probe_js` is an expression over `doc` (the report's document) giving an object; the
    wrapper page and the browser profile go next to the report."""
    assert CHROMIUM, "chromium must be installed under CI (.ci/run installs it)"
    wrapper = report.parent / f"wrapper-{report.stem}.html"
    wrapper.write_text(f"""<!doctype html><html><head><title>wrapper</title></head><body>
<iframe id="r" src="{report.name}" width="1200" height="800"></iframe>
<script>
document.getElementById('r').addEventListener('load', () => {{
  const doc = document.getElementById('r').contentDocument;
  const images = Array.from(doc.images);
  const result = Object.assign({{
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    reportTitle: doc.title,
    wrapperTitle: document.title,
  }}, {probe_js});
  document.body.setAttribute('data-result', JSON.stringify(result));
}});
</script></body></html>""")
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={report.parent / 'chromium-profile'}",
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--dump-dom",
            wrapper.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    marker = 'data-result="'
    assert marker in dom, dom[-2000:]
    raw = dom.split(marker, 1)[1].split('"', 1)[0].replace("&quot;", '"').replace("&amp;", "&")
    return json.loads(raw.replace("&lt;", "<").replace("&gt;", ">"))
