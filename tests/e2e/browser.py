"""A real headless Chromium with a fresh profile, driven over the DevTools protocol (the `websockets` client, no
browser-automation package): open an address, wait for what a person would wait for, click a link or button by its
text, read the page's text, take a screenshot. The profile is a new temporary folder, so localStorage is empty, as in
a new team member's browser."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from loopback import kill_tree, wait_until
from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width: int = 1500, height: int = 1100):
        assert CHROMIUM, "chromium is not installed: `make e2e` installs it (apt-get install chromium)"
        self.profile = Path(tempfile.mkdtemp(prefix="lensflow-chromium-"))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and len(port_file.read_text().split()) >= 2, 60, "chromium")
        port = port_file.read_text().split()[0]
        import requests

        pages = wait_until(lambda: [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                                    if t["type"] == "page"], 30, "a chromium page")
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    @property
    def url(self) -> str:
        return self.js("location.href")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def html(self) -> str:
        return self.js("document.documentElement.outerHTML") or ""

    def wait(self, ok, timeout: float, what: str):
        """ok(browser) truthy within timeout seconds (polled every half second), else an AssertionError naming what
        was awaited, the address and the start of the page's text."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if value := ok(self):
                    return value
            except RuntimeError:  # the page is navigating
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} at {self.url}:\n{self.text()[:1500]}")

    def click(self, text: str, selector: str = "a, button, [role=button], [role=menuitem], [role=tab], [role=radio]",
              exact: bool = True) -> bool:
        """Click, with the mouse, the first visible element matching selector whose text is `text` (or contains it);
        False if there is none."""
        box = self.js(f"""(() => {{
            const want = {json.dumps(text)}, exact = {json.dumps(exact)};
            for (const el of document.querySelectorAll({json.dumps(selector)})) {{
                const t = (el.innerText || el.textContent || '').trim();
                if ((exact ? t === want : t.includes(want)) && el.getClientRects().length) {{
                    el.scrollIntoView({{block: 'center'}});
                    const r = el.getBoundingClientRect();
                    return [r.left + r.width / 2, r.top + r.height / 2];
                }}
            }}
            return null;
        }})()""")
        if not box:
            return False
        x, y = box
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        return True

    def screenshot(self, path: Path, full_height: int | None = None) -> None:
        """A PNG of the viewport, or of the top full_height pixels of the page."""
        params = {"format": "png"}
        if full_height:
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": self.js("document.documentElement.clientWidth"),
                                "height": full_height, "scale": 1}}
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))

    def local_storage(self) -> dict:
        return self.js("Object.fromEntries(Object.entries(localStorage))") or {}

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            kill_tree(self.proc.pid)
            shutil.rmtree(self.profile, ignore_errors=True)
