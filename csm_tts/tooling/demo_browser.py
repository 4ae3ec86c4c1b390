"""Drive the proxy's demo page (GET /demo) in a real headless Chromium; the browser test and the page benchmark
(tests/test_demo_page.py, scripts/bench_demo.py) share it.

The browser is Debian's `chromium` (`make test` installs it with apt-get when missing), driven by Playwright for
Python through `executable_path`: Playwright never downloads a browser build. Chromium renders Web Audio on a fake
output stream when the machine has no sound card, in real time, so the page's AudioContext clock runs as it would on
a laptop. The flags that matter here:

- `--autoplay-policy=no-user-gesture-required`: an AudioContext may start without a click (Playwright's clicks are
  trusted gestures anyway; this keeps scripted runs independent of that);
- `--mute-audio`: the audio graph renders as usual (and is measured), but nothing reaches a sound card, so a
  developer's machine stays silent.

`--use-fake-device-for-media-stream` / `--use-fake-ui-for-media-stream` fake *capture* (getUserMedia); the page
records nothing, so they are not needed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM_ENV = "CSM_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--autoplay-policy=no-user-gesture-required", "--mute-audio")
# Page fields by keyword: the element id (an <input> or a <select>) of demo.html.
FIELDS = {
    "text": "text",
    "mode": "mode",
    "rate": "rate",
    "chunking": "chunking",
    "chunk_words": "chunk-words",
    "speaker": "speaker",
    "seed": "seed",
    "watermark": "watermark",
    "max_audio_length_ms": "max-audio",
    "context": "context",
    "format": "format",
    "player": "player",
    "api_key": "api-key",
}


def chromium_path() -> str:
    """The Chromium binary: $CSM_CHROMIUM, else Debian's /usr/bin/chromium."""
    path = os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    if not (Path(path).is_file() and os.access(path, os.X_OK)) and not shutil.which(path):
        raise FileNotFoundError(
            f"no Chromium at {path}: `make test` installs Debian's package (apt-get install chromium), "
            f"or point {CHROMIUM_ENV} at a Chromium binary"
        )
    return path


async def launch(playwright):
    return await playwright.chromium.launch(executable_path=chromium_path(), args=list(FLAGS), headless=True)


async def set_fields(page, **values) -> None:
    """Fill the page's option fields, e.g. set_fields(page, text="Hi.", mode="all", seed=3, player="buffers")."""
    for name, value in values.items():
        locator = page.locator(f"#{FIELDS[name]}")
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if await locator.evaluate("element => element.tagName") == "SELECT":
            await locator.select_option(text)
        else:
            await locator.fill(text)


async def open_demo(page, base_url: str, query: str = "") -> None:
    await page.goto(f"{base_url.rstrip('/')}/demo{query}")
    await page.wait_for_selector("body[data-state=idle]")


async def speak(page, timeout_s: float = 120.0) -> dict:
    """Press Speak, wait until the utterance has played out (or failed), return the page's own counters."""
    finished = await page.evaluate("window.csmDemo.finished")
    await page.click("#start")
    await wait_for(page, "(n) => window.csmDemo.finished > n", finished, timeout_s)
    return await page.evaluate("window.csmDemo.stats()")


async def wait_for(page, predicate: str, arg=None, timeout_s: float = 60.0) -> None:
    """page.wait_for_function for a page with a strict CSP: a function expression (with `arg`) runs in the page,
    a bare expression string would need eval, which the page's policy forbids."""
    await page.wait_for_function(predicate, arg=arg, timeout=timeout_s * 1000)
