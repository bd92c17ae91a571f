"""``report.html`` (issue #18) in a real headless browser (Debian's ``chromium``), driven over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no extra package): the page
of a run loads without a console error or a network request, every embedded image decodes, the
summary table has one row per method and metric, and a screenshot is taken. ``sanity report``
remakes the same page; a sweep's page has a section per job.

Skipped with one line when chromium is missing, except in CI (``.ci/run`` installs it).
"""
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_resume import run_in_process

from harness.report import REPORT, main, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--remote-debugging-pipe"]
METHODS, METRICS = ["gradient", "sobel"], ["ssim", "spearman"]
RUN = ["model=tiny_cnn", "dataset=digits", "dataset.n=3", f"method=[{','.join(METHODS)}]",
       f"metric=[{','.join(METRICS)}]", "device=cpu", "progress=false", "n_maps=2"]


class Browser:
    """A headless chromium spoken to with DevTools messages (JSON, NUL-terminated) on fds 3/4."""

    def __init__(self, profile: Path):
        commands_r, self.commands = os.pipe()
        self.replies, replies_w = os.pipe()
        # the browser reads its commands on fd 3 and writes replies on fd 4
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),  # only dup2 runs between fork and exec: safe with threads
            preexec_fn=lambda: (os.dup2(commands_r, 3), os.dup2(replies_w, 4)))  # noqa: PLW1509
        os.close(commands_r), os.close(replies_w)
        self.buffer, self.events, self.next_id = b"", [], 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self.events.append(reply)

    def receive(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.replies, 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method: str, seconds: float = 60) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self.receive())
        raise AssertionError(f"no {method} within {seconds} s")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        finally:
            self.process.wait(timeout=30)
            os.close(self.commands), os.close(self.replies)


CHECK_PAGE = """(async () => {
  const images = Array.from(document.images);
  const decoded = await Promise.all(images.map(i => i.decode().then(() => i.naturalWidth > 0,
                                                                   () => false)));
  const rows = Array.from(document.querySelectorAll("table.summary tbody tr"))
    .map(r => Array.from(r.cells).slice(0, 2).map(c => c.textContent));
  const resources = performance.getEntriesByType("resource").map(e => e.name);
  return JSON.stringify({images: images.length, decoded, rows, resources,
                         title: document.title});
})()"""


def open_page(browser: Browser, page: Path, screenshot: Path) -> dict:
    """Load ``page``; what it holds, and the console errors it caused."""
    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session)
    browser.send("Page.navigate", session, url=page.as_uri())
    browser.wait_for("Page.loadEventFired")
    found = json.loads(browser.send("Runtime.evaluate", session, expression=CHECK_PAGE,
                                    awaitPromise=True, returnByValue=True)["result"]["value"])
    shot = browser.send("Page.captureScreenshot", session, format="png",
                        captureBeyondViewport=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    found["errors"] = [e["params"] for e in browser.events if e.get("method") in (
        "Runtime.exceptionThrown", "Network.loadingFailed")
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    found["requests"] = [e["params"]["request"]["url"] for e in browser.events
                         if e.get("method") == "Network.requestWillBeSent"]
    return found


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return run_in_process(RUN, tmp_path_factory.mktemp("report") / "run")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing in CI (.ci/run installs it)")
        pytest.skip("chromium is missing: apt-get install -y chromium")
    browser = Browser(tmp_path / "profile")
    yield browser
    browser.close()


def test_run_report_in_a_headless_browser(run_dir, browser, tmp_path):
    page = run_dir / REPORT
    assert page.is_file()  # written by the runner
    found = open_page(browser, page, tmp_path / "report.png")
    assert found["errors"] == [], found["errors"]
    assert [r for r in found["requests"] if not r.startswith(("file:", "data:"))] == []
    figures = sorted((run_dir / "figures").glob("*.png"))
    assert found["images"] == len(figures) > 0 and all(found["decoded"]), found
    assert found["rows"] == [[m, k] for m in METHODS for k in METRICS]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    for said in ("Selected", "Summary", "Figures", "Warnings", "Timings", "Config",
                 "first &lt; 0.5", "tiny_cnn", "Parameter coverage", "parameter tensors randomized",
                 "Execution", "peak resident memory", "bootstrap interval"):
        assert said in text, said
    assert "<script" not in text and "http" not in text.split("</style>")[1].split(
        "<h2>Config")[0]  # nothing to fetch


def test_sanity_report_remakes_the_page_and_a_sweep_page(run_dir, browser, tmp_path):
    before = (run_dir / REPORT).read_text()
    (run_dir / REPORT).unlink()
    assert main([str(run_dir)]) == 0
    assert (run_dir / REPORT).read_text() == before
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(run_dir, sweep / job)
    found = open_page(browser, write_report(sweep), tmp_path / "sweep.png")
    assert found["errors"] == [] and all(found["decoded"]), found
    assert found["rows"] == 2 * [[m, k] for m in METHODS for k in METRICS]
    assert main([str(tmp_path / "missing")]) == 2
