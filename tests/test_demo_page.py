"""The demo page (GET /demo): served from the package, and driven in a real headless Chromium against the live stack.

The browser tests use Debian's Chromium through Playwright (csm_tts/tooling/demo_browser.py) and check the page
against what actually crossed the wire: Playwright records every WebSocket frame the browser sent and received, and
the page, opened with `?tap=1`, records every sample that reached its audio output (a tap after the player). So:

- typing mode sends the sentences one by one, spread over time as they are "typed";
- the page's counters (received, played, chunks, order) agree with the frames the server sent and its `end` messages;
- the played output is every streamed audio message, whole, in order, with silence only between messages and exactly
  one silence per underrun (or wait for text) the page counted: gapless playback, and honest underrun counting;
- the downloaded WAV decodes (libsndfile) to exactly the streamed samples;
- server errors (bad input, a full server, an API key the server does not take) are shown as clear messages.

The main test writes docs/demo.png (shown in the README) when it is missing or CSM_UPDATE_SCREENSHOT=1, so that an
ordinary run leaves the working tree clean.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import websockets
from aiohttp import web
from live_proxy import Proxy, module_proxy
from live_proxy import start_proxy as start_live_proxy

from csm_tts import SAMPLE_RATE
from csm_tts.tooling import demo_browser
from csm_tts.tooling.local_triton import free_port
from proxy.app import create_app
from proxy.appkeys import TRITON
from proxy.endpoints.demo import ASSETS, PAGE, STATIC
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "demo.png"
HEADER = struct.Struct("<IIII")  # seq, chunk_id, index, samples (proxy/endpoints/websocket.py)
SENTENCES = ["Hello there, this is the first sentence.", "Here comes the second one.", "And a third, short one!"]
CHUNK_SAMPLES = 12 * 1920  # max_audio_length_ms=1000: 12 frames of 80 ms (random weights never stop early)
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


def down_app(**overrides) -> web.Application:
    """The proxy with Triton unreachable: enough for what is served without generating audio."""
    return create_app(Settings(triton_grpc_urls=(f"127.0.0.1:{free_port()}",), **overrides))


# -- serving ---------------------------------------------------------------------------------------------------------
async def test_the_page_and_its_files_are_served_with_a_strict_policy(aiohttp_client):
    client = await aiohttp_client(down_app())
    response = await client.get("/demo")
    html = await response.text()
    assert response.status == 200 and response.content_type == "text/html" and response.charset == "utf-8"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Everything the page loads comes from the proxy itself: no CDN, no build step.
    referenced = set(re.findall(r'(?:src|href)="(/[^"]*)"', html))
    assert referenced == {"/demo/demo.js", "/demo/demo.css"}, referenced
    assert not re.search(r"https?://", html)
    for name, content_type in ASSETS.items():
        response = await client.get(f"/demo/{name}")
        assert response.status == 200 and response.content_type == content_type, name
        assert await response.read() == (STATIC / name).read_bytes()
    # The modules' own imports resolve to served files as well.
    for name in ASSETS:
        text = (STATIC / name).read_text()
        for imported in re.findall(r'from "\./([\w.-]+)"|new URL\("([\w.-]+)", import\.meta\.url\)', text):
            assert next(filter(None, imported)) in ASSETS, f"{name} loads {imported}, which is not served"
        assert not re.search(r"[\"'`(]\s*(https?:)?//", text), f"{name} loads something from another origin"


@pytest.mark.parametrize(
    "path", ["/demo/missing.js", "/demo/__init__.py", "/demo/..%2Fapp.py", "/demo/%2E%2E%2Fendpoints", "/demo/"]
)
async def test_only_the_listed_files_are_served(aiohttp_client, path):
    client = await aiohttp_client(down_app())
    response = await client.get(path)
    assert response.status == 404
    assert "error" in await response.json()


async def test_index_is_html_for_browsers_and_json_for_everyone_else(aiohttp_client):
    client = await aiohttp_client(down_app())
    response = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
    html = await response.text()
    assert response.status == 200 and response.content_type == "text/html" and response.headers["Vary"] == "Accept"
    assert 'href="/demo"' in html and "POST /generate" in html and "WS /stream" in html
    for accept in ("*/*", "application/json", None):
        response = await client.get("/", headers={"Accept": accept} if accept else {"Accept": ""})
        body = await response.json()
        assert response.content_type == "application/json" and "Accept" in response.headers["Vary"]
        assert body["name"] == "csm-tts-proxy" and "GET /demo" in body["endpoints"]


async def test_a_plain_get_of_a_full_stream_endpoint_says_why(aiohttp_client):
    """What the page's handshake diagnosis relies on: GET /stream without an upgrade gets the refusal a WebSocket
    handshake would get (here: too many sockets), not only "needs a WebSocket upgrade"."""
    client = await aiohttp_client(down_app(max_websockets=0))
    response = await client.get("/stream?mode=stream&binary=true")
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert "Too many WebSocket connections" in (await response.json())["error"]
    response = await (await aiohttp_client(down_app())).get("/stream")
    assert response.status == 400 and "upgrade" in (await response.json())["error"]


def test_the_page_ships_in_the_package(tmp_path):
    """Dockerfile.proxy installs the proxy with `pip install .`: the wheel must carry the page (package data)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "LICENSE"):
        shutil.copy(ROOT / name, source)
    for package in ("csm_tts", "proxy"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("csm_tts-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (PAGE, *ASSETS):
        assert f"proxy/static/{name}" in names, f"the wheel lacks proxy/static/{name}"


# -- in Chromium, against the live stack -------------------------------------------------------------------------
async def start_proxy(grpc_url: str, app: web.Application | None = None, **overrides) -> Proxy:
    # No watermark by default: watermarking costs ~1 CPU-second per audio second here.
    return await start_live_proxy(grpc_url, app, **{"ws_max_pending": 2, "watermark_enabled": False, **overrides})


proxy = module_proxy(start_proxy)


@pytest.fixture(scope="module")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await demo_browser.launch(playwright)
        yield browser
        await browser.close()


class Tab:
    """A page plus everything it said: console messages, uncaught errors, WebSocket frames with their times."""

    def __init__(self, page):
        self.page = page
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.sent: list[tuple[float, str | bytes]] = []
        self.received: list[tuple[float, str | bytes]] = []
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("websocket", self.on_websocket)

    def on_websocket(self, ws) -> None:
        ws.on("framesent", lambda payload: self.sent.append((time.monotonic(), payload)))
        ws.on("framereceived", lambda payload: self.received.append((time.monotonic(), payload)))

    def problems(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """Console errors and warnings (except the `allowed` patterns) and uncaught exceptions."""
        found = [f"{kind}: {text}" for kind, text in self.console if kind in ("error", "warning")]
        return [p for p in found if not any(re.search(a, p) for a in allowed)] + self.errors

    def json_sent(self) -> list[tuple[float, dict]]:
        return [(t, json.loads(p)) for t, p in self.sent if isinstance(p, str)]

    def json_received(self) -> list[dict]:
        return [json.loads(p) for _, p in self.received if isinstance(p, str)]

    def audio_frames(self) -> list[tuple[tuple[int, int, int, int], bytes]]:
        return [(HEADER.unpack_from(p), p[HEADER.size :]) for _, p in self.received if isinstance(p, bytes)]


@pytest.fixture
async def tab(browser):
    context = await browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    yield Tab(page)
    await context.close()


def playback_gaps(played: np.ndarray, messages: list[np.ndarray], atol: float = 0.0) -> list[int]:
    """Walk the page's output: every audio message must be played whole, in order, and only silence may come
    between two messages. Returns the length of each silence between messages (none: perfectly gapless).
    `atol`: how far a played sample may be from the streamed one (0: bit-exact)."""
    nonzero = np.flatnonzero(played)
    assert nonzero.size, "nothing was played"
    pos = int(nonzero[0]) - int(np.argmax(messages[0] != 0))
    gaps = []
    for k, message in enumerate(messages):
        if k:
            start = pos
            while pos < played.size and played[pos] == 0:
                pos += 1
            pos -= min(int(np.argmax(message != 0)), pos - start)  # a message may begin with exact zeros
            if pos > start:
                gaps.append(pos - start)
        segment = played[pos : pos + message.size]
        intact = segment.size == message.size and bool(np.all(np.abs(segment - message) <= atol))
        if segment.size == message.size and not intact:
            differ = np.flatnonzero(np.abs(segment - message) > atol)
            detail = f"{differ.size} samples differ, first at {differ[0]}, max {np.abs(segment - message).max():.3g}"
        else:
            detail = f"{segment.size} samples left"
        assert intact, (
            f"audio message {k} ({message.size} samples) is not played intact at output sample {pos}: {detail}"
        )
        pos += message.size
    assert not np.any(played[pos:]), "something was played after the last audio message"
    return gaps


async def played_samples(page) -> np.ndarray:
    return np.frombuffer(base64.b64decode(await page.evaluate("window.csmDemo.played()")), "<f4")


def check_stream(tab: Tab, stats: dict, texts: list[str], fmt: str) -> list[np.ndarray]:
    """The page's counters against the frames the server sent; returns each audio message as float samples."""
    frames = tab.audio_frames()
    ends = [m for m in tab.json_received() if m.get("type") == "end"]
    seqs = [header[0] for header, _ in frames] + [m["seq"] for m in tab.json_received()]
    assert sorted(seqs) == list(range(len(seqs))), "the server's seq numbers have a gap"
    assert [m["text"] for m in ends] == texts
    dtype = "<f4" if fmt == "f32le" else "<i2"
    messages = [np.frombuffer(pcm, dtype) for _, pcm in frames]
    assert all(m.size == header[3] for m, (header, _) in zip(messages, frames, strict=True))
    server_samples = sum(m["samples"] for m in ends)
    assert server_samples == sum(m.size for m in messages) == len(texts) * CHUNK_SAMPLES
    assert stats["textsSent"] == stats["textsEnded"] == len(texts) and stats["texts"] == texts
    assert stats["chunkIds"] == list(range(len(texts)))
    assert stats["receivedSamples"] == stats["serverSamples"] == server_samples
    assert (
        stats["audioMessages"] == stats["serverAudioMessages"] == len(frames) == sum(m["audio_messages"] for m in ends)
    )
    assert stats["playedSamples"] >= server_samples, "the page played less audio than the server sent"
    assert stats["chunksPlayed"] == len(frames) and stats["playOrderErrors"] == 0 and stats["seqErrors"] == 0
    assert stats["errors"] == [] and stats["state"] == "done"
    assert stats["ttfaMs"] > 0 and stats["ttfaHeardMs"] >= stats["ttfaMs"] and stats["rtf"] > 0
    if fmt == "s16le":  # the page plays s16le as v / 32767, like the proxy's to_pcm16 scaled it
        messages = [(m / 32767).astype(np.float32) for m in messages]
    return messages


def check_gapless(played: np.ndarray, messages: list[np.ndarray], stats: dict, atol: float = 0.0) -> list[int]:
    gaps = playback_gaps(played, messages, atol)
    # One silence per underrun or wait, no other; with no waits, the underrun time is exactly that silence.
    assert len(gaps) == stats["underruns"] + stats["waits"], (gaps, stats["underruns"], stats["waits"])
    if stats["waits"] == 0:
        assert sum(gaps) == stats["underrunSamples"]
    return gaps


async def test_typing_mode_streams_plays_gaplessly_and_downloads(proxy, tab, tmp_path):
    page = tab.page
    await demo_browser.open_demo(page, proxy.http, "?tap=1")
    rate = 8.0
    await demo_browser.set_fields(
        page,
        text="  ".join(SENTENCES),
        mode="type",
        rate=rate,
        chunking="sentence",
        seed=11,
        max_audio_length_ms=1000,
        format="f32le",
        player="worklet",
    )
    stats = await demo_browser.speak(page)
    assert stats["state"] == "done", stats["errors"]

    # Typing mode: a config message, then the sentences one by one as they were "typed".
    sent = tab.json_sent()
    assert "config" in sent[0][1] and sent[0][1]["config"]["seed"] == 11
    text_messages = [(t, m) for t, m in sent if "text" in m]
    assert [m["text"] for _, m in text_messages] == SENTENCES
    words_after_first = sum(len(s.split()) for s in SENTENCES[1:])
    spread = text_messages[-1][0] - text_messages[0][0]
    assert spread >= 0.8 * words_after_first / rate, f"the chunks were sent within {spread:.2f} s: not typed"
    assert sent[-1][1] == {"done": True}

    messages = check_stream(tab, stats, SENTENCES, "f32le")
    gaps = check_gapless(await played_samples(page), messages, stats)

    async with page.expect_download() as download_info:
        await page.click("#download")
    download = await download_info.value
    assert download.suggested_filename == "speech.wav"
    wav = tmp_path / "speech.wav"
    await download.save_as(wav)
    info = soundfile.info(wav)
    assert (info.samplerate, info.channels, info.format, info.subtype) == (SAMPLE_RATE, 1, "WAV", "FLOAT")
    audio, _ = soundfile.read(wav, dtype="float32")
    assert np.array_equal(audio, np.concatenate(messages)), "the WAV is not the streamed samples"

    shot = tmp_path / "demo.png"
    await page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("CSM_UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        shutil.copy(shot, SCREENSHOT)
    assert tab.problems() == []
    print(
        f"\npage: TTFA {stats['ttfaMs']:.0f} ms (heard {stats['ttfaHeardMs']:.0f} ms), RTF {stats['rtf']:.2f}, "
        f"{stats['underruns']} underruns ({stats['underrunMs']:.0f} ms), {stats['waits']} waits, gaps {gaps}"
    )


async def test_scheduled_buffers_play_gaplessly_too(proxy, tab):
    """The fallback player (no AudioWorklet, e.g. plain http on a LAN), with 16-bit frames and one text at once."""
    page = tab.page
    await demo_browser.open_demo(page, proxy.http, "?tap=1")
    text = " ".join(SENTENCES)
    await demo_browser.set_fields(
        page, text=text, mode="all", seed=5, max_audio_length_ms=1000, format="s16le", player="buffers"
    )
    stats = await demo_browser.speak(page)
    assert stats["state"] == "done" and stats["player"] == "buffers", stats["errors"]
    assert len([m for _, m in tab.json_sent() if "text" in m]) == 1
    messages = check_stream(tab, stats, [text], "s16le")
    # Buffers start with sub-sample interpolation (a millionth of a sample early, see pcm-player.js): not bit-exact,
    # but far below one 16-bit step; any gap, overlap or reordering is off by whole samples.
    check_gapless(await played_samples(page), messages, stats, atol=1e-5)
    async with page.expect_download() as download_info:
        await page.click("#download")
    wav = await (await download_info.value).path()
    assert soundfile.info(wav).subtype == "PCM_16"
    pcm = np.concatenate([np.frombuffer(p, "<i2") for _, p in tab.audio_frames()])
    assert np.array_equal(soundfile.read(wav, dtype="int16")[0], pcm)
    assert tab.problems() == []


async def test_bad_input_is_explained_and_the_page_recovers(proxy, tab):
    page = tab.page
    await demo_browser.open_demo(page, proxy.http)
    await demo_browser.set_fields(page, text="Hello.", mode="all", max_audio_length_ms=500)
    stats = await demo_browser.speak(page)
    message = await page.text_content("#error")
    assert stats["state"] == "error" and await page.is_visible("#error")
    assert message.startswith("Bad input") and "max_audio_length_ms" in message and "1000" in message, message

    await demo_browser.set_fields(page, text="   ")
    await demo_browser.speak(page)
    assert await page.text_content("#error") == "Write some text first"

    # The same page then speaks normally.
    await demo_browser.set_fields(page, text="Hello again.", max_audio_length_ms=1000)
    stats = await demo_browser.speak(page)
    assert stats["state"] == "done" and stats["receivedSamples"] == CHUNK_SAMPLES, stats["errors"]
    assert not await page.is_visible("#error")
    assert tab.problems() == []


async def test_stop_cancels_the_generation(proxy, tab):
    page = tab.page
    await demo_browser.open_demo(page, proxy.http)
    await demo_browser.set_fields(
        page, text="A long answer that will be interrupted.", mode="all", max_audio_length_ms=20000
    )
    finished = await page.evaluate("window.csmDemo.finished")
    await page.click("#start")
    await demo_browser.wait_for(
        page, "() => window.csmDemo.stats() !== null && window.csmDemo.stats().audioMessages >= 2"
    )
    await page.click("#stop")
    await demo_browser.wait_for(page, "(n) => window.csmDemo.finished > n", finished)
    stats = await page.evaluate("window.csmDemo.stats()")
    assert stats["state"] == "stopped" and stats["receivedSamples"] < 20 * SAMPLE_RATE
    assert any(m.get("type") == "cancelled" for m in tab.json_received())
    deadline = time.monotonic() + 10
    while proxy.app[TRITON].active_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proxy.app[TRITON].active_streams == 0, "the cancelled generation is still running"
    assert tab.problems() == []


async def test_a_full_server_is_explained(triton_server, tab):
    full = await start_proxy(triton_server.grpc_url, max_websockets=0)
    try:
        page = tab.page
        await demo_browser.open_demo(page, full.http)
        await demo_browser.set_fields(page, text="Hello.", mode="all", max_audio_length_ms=1000)
        stats = await demo_browser.speak(page)
        message = await page.text_content("#error")
        assert stats["state"] == "error"
        assert message.startswith("The server is full or not ready (503)") and "Retry in 1 s" in message, message
        # The browser itself reports the refused handshake and the 503 of the diagnosis; nothing else.
        assert tab.problems(allowed=("WebSocket connection to .* failed", "status of 503")) == []
    finally:
        await full.runner.cleanup()


async def test_the_api_key_travels_as_documented(triton_server, tab):
    """HTTP: `Authorization: Bearer <key>`; WebSocket: subprotocols `csm-tts, bearer.<key>`. The server side (keys,
    selecting `csm-tts`) is the proxy's API-key mode: where this proxy selects the subprotocol, the page speaks;
    where it does not, the page says that the server does not take keys on WebSockets."""
    seen: list[tuple[str, str | None, str | None]] = []

    @web.middleware
    async def record(request, handler):
        seen.append((request.path, request.headers.get("Authorization"), request.headers.get("Sec-WebSocket-Protocol")))
        return await handler(request)

    app = create_app(Settings(triton_grpc_urls=(triton_server.grpc_url,), watermark_enabled=False))
    app.middlewares.insert(0, record)
    keyed = await start_proxy(triton_server.grpc_url, app=app)
    try:
        async with websockets.connect(
            keyed.http.replace("http", "ws") + "/stream", subprotocols=["csm-tts", "bearer.k3y"]
        ) as ws:
            selects = ws.subprotocol == "csm-tts"
    except websockets.InvalidHandshake:
        selects = False
    try:
        page = tab.page
        await demo_browser.open_demo(page, keyed.http)
        seen.clear()
        await demo_browser.set_fields(page, text="Hello.", mode="all", max_audio_length_ms=1000, api_key="k3y")
        await page.locator("#api-key").dispatch_event("change")
        await demo_browser.wait_for(page, "() => document.querySelector('#server').textContent.startsWith('ready')")
        stats = await demo_browser.speak(page)
        assert ("/health", "Bearer k3y", None) in seen
        assert ("/stream", None, "csm-tts, bearer.k3y") in seen
        if selects:
            assert stats["state"] == "done", stats["errors"]
            assert tab.problems() == []
        else:
            message = await page.text_content("#error")
            assert stats["state"] == "error" and "refused with an API key" in message, message
            assert ("/stream", "Bearer k3y", None) in seen  # the page's diagnosis of the refused handshake
            # The browser reports the refused handshake, and the 400 of the diagnosis; nothing else.
            assert tab.problems(allowed=("WebSocket connection to .* failed", "status of 400")) == []
        # Without a key, no subprotocol is offered at all.
        seen.clear()
        await demo_browser.set_fields(page, api_key="")
        stats = await demo_browser.speak(page)
        assert stats["state"] == "done" and ("/stream", None, None) in seen, stats["errors"]
    finally:
        await keyed.runner.cleanup()


# -- the page benchmark ----------------------------------------------------------------------------------------------
def load_bench_demo():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_demo
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return bench_demo


def test_bench_demo_arguments(capsys):
    bench_demo = load_bench_demo()
    args = bench_demo.parse_args(["--fixed-frames", "13", "--requests", "3", "--watermark", "off"])
    assert (args.fixed_frames, args.requests, args.watermark_value) == (13, 3, False)
    for argv in (["--fixed-frames", "12"], ["--requests", "0"], ["--watermark", "maybe"]):
        with pytest.raises(SystemExit):
            bench_demo.parse_args(argv)
    assert "--fixed-frames" in capsys.readouterr().err


async def test_bench_demo_runs_against_the_live_proxy(proxy, tmp_path):
    """One request per client through the real script (its own Chromium), against this module's proxy."""
    out = tmp_path / "bench.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "bench_demo.py"),
        *("--proxy-url", proxy.http, "--fixed-frames", "13", "--requests", "1", "--no-warmup", "--json", str(out)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(process.communicate(), 240))[0].decode()
    assert process.returncode == 0, output
    rows = json.loads(out.read_text())
    assert [r["client"] for r in rows] == ["ws", "page", "page heard"]
    assert all(r["requests"] == 1 and r["errors"] == 0 and r["p50"] > 0 for r in rows), rows
    assert "page / ws: TTFA p50 x" in output
