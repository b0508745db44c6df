#!/usr/bin/env python3
"""The browser test: serves web/ on 127.0.0.1, drives Debian's headless Chromium (WebGPU on its
bundled SwiftShader, no GPU needed) through chromedriver's W3C WebDriver protocol, opens
`?selftest` and fails unless every case matches the f64 reference; then runs the interactive page
once and saves a screenshot; then checks that a browser without WebGPU gets a plain message.

Usage: web/test.py [--screenshot PATH] [--timeout SECONDS]   (after web/build.sh)
Standard library only; needs the `chromium` and `chromium-driver` Debian packages.
"""

import argparse
import base64
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

WEB = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = "/usr/lib/chromium/chromium"  # not the /usr/bin wrapper, which adds its own flags
FLAGS = [
    "--headless", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--window-size=1240,1320",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Driver:
    """The few WebDriver commands this test needs."""

    def __init__(self, port, user_dir, extra=()):
        self.base = f"http://127.0.0.1:{port}"
        args = FLAGS + [f"--user-data-dir={user_dir}"] + list(extra)
        caps = {"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"}}}}
        self.sid = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode()[:2000]}") from None

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.sid}{path}", body)

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            v = self.js(script)
            if v:
                return v
            time.sleep(0.5)
        body = self.js("return document.body.innerText")
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}; page says:\n{body}")

    def console(self):
        """The browser console so far (WebGPU validation errors land there)."""
        try:
            return "\n".join(e.get("message", "") for e in self.s("POST", "/se/log", {"type": "browser"}))
        except RuntimeError as e:
            return f"(no console log: {e})"

    def quit(self):
        try:
            self.call("DELETE", f"/session/{self.sid}")
        except Exception:
            pass


class Browser:
    """Serves `directory` on 127.0.0.1 and runs chromedriver; `open()` starts a fresh Chromium
    (a new empty profile, the previous one closed). Everything stops on leaving the `with`."""

    def __init__(self, directory):
        self.directory = directory

    def __enter__(self):
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", free_port()), functools.partial(Quiet, directory=str(self.directory)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.wd_port = free_port()
        self.chromedriver = subprocess.Popen(["chromedriver", f"--port={self.wd_port}"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.user_dir = None
        self.driver = None
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.wd_port}/status", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        return self

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def open(self, extra=()):
        self._close()
        self.user_dir = tempfile.mkdtemp(prefix="wgpu-attention-chromium-")
        self.driver = Driver(self.wd_port, self.user_dir, extra)
        return self.driver

    def _close(self):
        if self.driver:
            self.driver.quit()
            self.driver = None
        if self.user_dir:
            shutil.rmtree(self.user_dir, ignore_errors=True)
            self.user_dir = None

    def __exit__(self, *exc):
        self._close()
        self.chromedriver.terminate()
        self.server.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshot", default=os.path.join(WEB, "target", "screenshot.png"))
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    for need in (CHROMIUM, shutil.which("chromedriver")):
        if not need or not os.path.exists(need):
            sys.exit("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    if not os.path.exists(os.path.join(WEB, "pkg", "wgpu_attention_web_bg.wasm")):
        sys.exit("web/pkg is missing: run web/build.sh first")

    with Browser(WEB) as browser:
        driver = browser.open()
        page = browser.url("index.html")

        # 1. the self-test: every case must match the reference
        t0 = time.time()
        driver.s("POST", "/url", {"url": page + "?selftest"})
        driver.wait_for("const e = document.getElementById('selftest');"
                        "return e && e.dataset.state === 'done'", args.timeout, "the self-test")
        result = json.loads(driver.js("return document.getElementById('selftest').textContent"))
        adapter = result.get("adapter", {})
        print(f"self-test on {adapter.get('name') or '?'} ({adapter.get('backend')}), "
              f"{time.time() - t0:.0f} s:")
        for c in result.get("cases", []):
            err = "" if c["max_abs"] is None else f"max |err| {c['max_abs']:.2e} <= {c['tolerance_abs']:.2e}"
            print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']:<55} {err} {c['problem'] or ''}")
        if not result.get("passed") or not result.get("cases"):
            print("browser console:\n" + driver.console())
            sys.exit("browser self-test FAILED")

        # 2. the interactive page: one run with the defaults, then a screenshot
        driver.s("POST", "/url", {"url": page})
        driver.wait_for("return !document.getElementById('interactive').hidden", 120, "the page")
        driver.js("const f = document.getElementById('form'); f.variant.value = 'neighborhood';"
                  "f.variant.dispatchEvent(new Event('change')); f.query.value = 300;"
                  "document.getElementById('run').click()")
        state = driver.wait_for("const s = document.getElementById('status').dataset.state;"
                                "return s === 'done' || s === 'error' ? s : null", args.timeout,
                                "the interactive run")
        if state != "done":
            sys.exit("interactive run failed: " + driver.js("return document.getElementById('status').innerText"))
        if "PASS" not in driver.js("return document.getElementById('numbers').innerText"):
            sys.exit("interactive run did not pass its check")
        # the sparse panel: the default mask_mod as a block mask, then a broken one refused
        # with naga's message and the snippet's line
        def block_mask(what, source=None):
            """Clicks the panel's button (with `source` in the textarea); its state and text."""
            if source is not None:
                driver.js("document.getElementById('mask-src').value = arguments[0]", source)
            driver.js("document.getElementById('mask-run').click()")
            state = driver.wait_for("const s = document.getElementById('mask-status').dataset.state;"
                                    "return s === 'done' || s === 'error' ? s : null",
                                    args.timeout, what)
            return state, driver.js("return document.getElementById('mask-status').innerText")

        state, text = block_mask("the block mask")
        if state != "done" or "full" not in text:
            sys.exit("sparse panel failed: " + text)
        print(f"sparse panel: {text}")
        broken = "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {\n  return kv_idx <= ;\n}"
        state, text = block_mask("the refused block mask", broken)
        if state != "error" or "line 2 of the snippet" not in text:
            sys.exit("the sparse panel did not refuse a broken mask_mod with its line: " + text)
        print("sparse panel refuses a broken mask_mod: " + text.splitlines()[-1][:100])
        png = base64.b64decode(driver.s("GET", "/screenshot"))
        os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
        with open(args.screenshot, "wb") as f:
            f.write(png)
        print(f"interactive run passed; screenshot: {args.screenshot}")

        # 3. a browser without WebGPU: the page must say so, not fail silently
        # (simulated: remove navigator.gpu before any page script runs)
        driver = browser.open()
        driver.s("POST", "/goog/cdp/execute", {
            "cmd": "Page.addScriptToEvaluateOnNewDocument",
            "params": {"source": "delete Navigator.prototype.gpu;"}})
        driver.s("POST", "/url", {"url": page})
        said = driver.wait_for("const e = document.getElementById('nowebgpu');"
                               "return e && !e.hidden && e.innerText", 60, "the no-WebGPU message")
        if "no WebGPU" not in said:
            sys.exit(f"without WebGPU the page said: {said!r}")
        print(f"without WebGPU the page says: {said[:70]}...")


if __name__ == "__main__":
    main()
