"""A real headless Chromium for tests, driven over the DevTools protocol (a WebSocket; the
``websockets`` package comes with Prefect), so no browser-driver package is needed.

CI installs Chromium (``.ci/run``). Without it the tests that need it fail, naming the fix;
``PATCHWATCH_NO_BROWSER=1`` skips them on a machine where no browser can be installed.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .servers import stop_process_group

# flags that work in containers without a display, GPU, sandbox or network
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    """The browser executable (PATCHWATCH_CHROMIUM, else the first of CANDIDATES on PATH)."""
    if os.environ.get("PATCHWATCH_NO_BROWSER") == "1":
        pytest.skip("PATCHWATCH_NO_BROWSER=1: no headless browser on this machine")
    found = os.environ.get("PATCHWATCH_CHROMIUM") or next(filter(None, map(shutil.which, CANDIDATES)), None)
    if not found:
        pytest.fail("no Chromium found (tried " + ", ".join(CANDIDATES) + "): install it with "
                    "'apt-get install chromium' (.ci/run does), or set PATCHWATCH_NO_BROWSER=1 to skip")
    return found


@contextlib.contextmanager
def devtools_page(timeout: float = 60):
    """A headless Chromium with a fresh profile; yields a function ``call(method, **params)`` on
    its first page. The browser is ended by its process-group id."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        process = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                if process.poll() is not None:
                    raise RuntimeError(f"chromium exited {process.returncode}: {process.stderr.read()[-2000:]!r}")
                assert time.monotonic() < deadline, "chromium did not open its DevTools port"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                page = next(t for t in json.load(answer) if t["type"] == "page")
            from websockets.sync.client import connect

            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as socket:
                ids = itertools.count(1)

                def call(method: str, wait_for: str | None = None, **params):
                    """Send one command; return its result (``wait_for``: the params of that event, after it)."""
                    number = next(ids)
                    socket.send(json.dumps({"id": number, "method": method, "params": params}))
                    result, event = None, None
                    while result is None or (wait_for and event is None):
                        message = json.loads(socket.recv(timeout=timeout))
                        if message.get("id") == number:
                            if "error" in message:
                                raise RuntimeError(f"{method}: {message['error']}")
                            result = message["result"]
                        elif wait_for and message.get("method") == wait_for:
                            event = message["params"]
                    return event if wait_for else result

                yield call
        finally:
            stop_process_group(process)


# every <img>: loaded (complete, with a width) once each has been decoded, or failed to
IMAGE_STATES = """Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(() =>
  JSON.stringify([...document.images].map(i => ({alt: i.alt, src: i.getAttribute('src').slice(0, 60),
                                                 complete: i.complete, naturalWidth: i.naturalWidth}))))"""


def image_states(html: Path) -> list[dict]:
    """Open ``html`` (a file) in headless Chromium; the load state of each of its images."""
    with devtools_page() as call:
        call("Page.enable")
        call("Page.navigate", wait_for="Page.loadEventFired", url=Path(html).resolve().as_uri())
        result = call("Runtime.evaluate", expression=IMAGE_STATES, awaitPromise=True, returnByValue=True)
    if "exceptionDetails" in result:
        raise RuntimeError(f"the page's images could not be read: {result['exceptionDetails']}")
    return json.loads(result["result"]["value"])
