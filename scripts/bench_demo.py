"""Time to first audio as the demo page measures it, against bench_stream.py's `ws` target, in one run.

    python scripts/bench_demo.py --fixed-frames 13 --requests 12 --cpu-threads 1 --json out.json
    python scripts/bench_demo.py --proxy-url http://127.0.0.1:8000 --fixed-frames 13

Both clients send the same requests to the same proxy: text i of benchmarks/texts.json, seed i and a fixed length
with --fixed-frames, voice continuity off, 16-bit binary stream frames. They alternate request by request (ws, page,
page, ws, ...) so that both see the same load on a shared machine; compare the ratio, not the absolute numbers.

  ws    bench_stream.py's WebSocket client (aiohttp, one socket opened before the clock starts): first binary audio
        frame after the text message was sent
  page  GET /demo in headless Chromium (csm_tts/tooling/demo_browser.py), "Send all at once", one page for all
        requests: the page's own time to first audio (first binary frame after its send, performance.now()), and
        when that audio is heard (the player's first output sample, mapped from the AudioContext clock)

Without --proxy-url it starts Triton and `python -m proxy` as bench_stream.py does. Output: p50 / p90 per client and
the page / ws ratio; --json PATH writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_stream  # noqa: E402

from csm_tts.tooling import demo_browser  # noqa: E402
from csm_tts.tooling.stream_stats import percentile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="requests per client (default 12)")
    parser.add_argument("--fixed-frames", type=int, help="seeded fixed-length requests of N 80 ms frames (>= 13)")
    parser.add_argument("--max-audio-length-ms", type=int, default=10_000, help="limit without --fixed-frames")
    parser.add_argument("--watermark", choices=("default", "on", "off"), default="default")
    parser.add_argument("--proxy-url", help="a running proxy (http://host:port); default: start Triton and a proxy")
    parser.add_argument("--proxy-model", default="tts", help="TRITON_MODEL of a proxy started here (default tts)")
    parser.add_argument("--model-dir", type=Path, default=bench_stream.DEFAULT_MODEL_DIR)
    parser.add_argument("--watermark-dir", type=Path, default=bench_stream.DEFAULT_WATERMARK_DIR)
    parser.add_argument("--cpu-threads", type=int, help="OMP_NUM_THREADS of a Triton started here")
    parser.add_argument("--texts", type=Path, default=bench_stream.TEXTS_FILE)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request (default 120)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed request of each client")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    if args.fixed_frames is not None and args.fixed_frames * bench_stream.FRAME_MS < bench_stream.PROXY_MIN_AUDIO_MS:
        parser.error(f"--fixed-frames: the proxy needs at least {bench_stream.PROXY_MIN_AUDIO_MS} ms (13 frames)")
    args.watermark_value = {"default": None, "on": True, "off": False}[args.watermark]
    return args


class PageClient:
    """The demo page, one tab for every request; each Speak opens its own WebSocket (not timed)."""

    def __init__(self, page, plan: bench_stream.Plan, watermark: bool | None, timeout_s: float):
        self.page = page
        self.plan = plan
        self.watermark = watermark
        self.timeout_s = timeout_s

    async def request(self, index: int) -> dict:
        body = self.plan.proxy_body(index, self.watermark)
        await demo_browser.set_fields(
            self.page,
            text=body["text"],
            mode="all",
            seed=body.get("seed"),
            max_audio_length_ms=body["max_audio_length_ms"],
            watermark="" if self.watermark is None else self.watermark,
            context=False,
            format="s16le",
            player="auto",
        )
        stats = await demo_browser.speak(self.page, self.timeout_s)
        error = "; ".join(stats["errors"]) if stats["errors"] else None
        return {"ttfa_ms": stats["ttfaMs"], "heard_ms": stats["ttfaHeardMs"], "error": error}


async def ws_request(client, plan: bench_stream.Plan, index: int, watermark, timeout_s: float) -> dict:
    result = await bench_stream.measure(client, plan, index, watermark, timeout_s)
    ttfa = result.arrivals[0] * 1000.0 if result.arrivals and not result.error else None
    return {"ttfa_ms": ttfa, "error": result.error}


def summary(name: str, results: list[dict], key: str = "ttfa_ms") -> dict:
    values = sorted(r[key] for r in results if r[key] is not None and not r["error"])
    return {
        "client": name,
        "requests": len(results),
        "errors": sum(1 for r in results if r["error"]),
        "p50": percentile(values, 50) if values else None,
        "p90": percentile(values, 90) if values else None,
        "error_samples": sorted({r["error"] for r in results if r["error"]})[:3],
    }


async def run(args: argparse.Namespace, proxy_url: str) -> list[dict]:
    from playwright.async_api import async_playwright

    plan = bench_stream.Plan(bench_stream.load_texts(args.texts), args.fixed_frames, args.max_audio_length_ms)
    ws = await bench_stream.WebSocketClient(proxy_url).open()
    try:
        async with async_playwright() as playwright:
            browser = await demo_browser.launch(playwright)
            try:
                tab = await browser.new_page()
                await demo_browser.open_demo(tab, proxy_url)
                page = PageClient(tab, plan, args.watermark_value, args.timeout_s)
                if not args.no_warmup:
                    for error in (
                        (await ws_request(ws, plan, 0, args.watermark_value, args.timeout_s))["error"],
                        (await page.request(0))["error"],
                    ):
                        if error:
                            print(f"warning: a warm-up request failed: {error}", file=sys.stderr)
                ws_results, page_results = [], []
                for index in range(args.requests):
                    print(f"request {index + 1}/{args.requests} ...", file=sys.stderr, flush=True)
                    for client in ("ws", "page") if index % 2 == 0 else ("page", "ws"):
                        if client == "ws":
                            ws_results.append(await ws_request(ws, plan, index, args.watermark_value, args.timeout_s))
                        else:
                            page_results.append(await page.request(index))
            finally:
                await browser.close()
    finally:
        await ws.close()
    extra = {
        "fixed_frames": args.fixed_frames,
        "watermark": args.watermark,
        "url": proxy_url,
        "date": datetime.date.today().isoformat(),
    }
    return [
        {**summary("ws", ws_results), **extra},
        {**summary("page", page_results), **extra},
        {**summary("page heard", page_results, "heard_ms"), **extra},
    ]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    demo_browser.chromium_path()  # fail before starting anything when there is no browser
    stack = bench_stream.Stack(None, args.proxy_url)
    try:
        if args.proxy_url is None:
            stack.start_triton(args.model_dir, args.watermark_dir, args.cpu_threads)
            stack.start_proxy(args.proxy_model)
        rows = asyncio.run(run(args, stack.proxy_url))
    finally:
        stack.close()
    print(f"{'client':<11} {'reqs':>4} {'err':>3}  {'TTFA ms p50':>11} {'p90':>7}")
    for r in rows:
        print(
            f"{r['client']:<11} {r['requests']:>4} {r['errors']:>3}  {bench_stream.fmt(r['p50']):>11} "
            f"{bench_stream.fmt(r['p90']):>7}"
        )
        for sample in r["error_samples"]:
            print(f"            error: {sample}")
    ws, page, heard = rows
    if ws["p50"] and page["p50"]:
        print(f"page / ws: TTFA p50 x{page['p50'] / ws['p50']:.2f}; heard / ws x{(heard['p50'] or 0) / ws['p50']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
