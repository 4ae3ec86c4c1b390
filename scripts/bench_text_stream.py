"""Time to first audio of a streamed LLM answer, from its first token, on the live stack: WS /stream with
text_stream=true (the server cuts the text), tokens sent at --words-per-s, the early first cut (the first clause)
against cutting at sentence ends only (early_cut=false). Both variants alternate, answer by answer, in ONE run,
so the box's load falls on both alike.

    .venv/bin/python scripts/bench_text_stream.py                       # starts Triton (tiny model) and a proxy
    .venv/bin/python scripts/bench_text_stream.py --proxy-url http://127.0.0.1:8000 --rounds 3

Printed per variant: time to first audio from the first token (p50, max), time to the first cut's end message,
generations per answer. Answers: benchmarks/llm_answers.json (LLM prose with markdown and numbers), split into
words as an LLM's tokens arrive (each word with its leading space).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_stream  # noqa: E402

ANSWERS = ROOT / "benchmarks" / "llm_answers.json"
VARIANTS = {"early first cut": "true", "sentence ends only": "false"}


def tokens(answer: str) -> list[str]:
    words = answer.split(" ")
    return [words[0], *(" " + w for w in words[1:])]


async def one_answer(ws_url: str, answer: str, early: str, words_per_s: float, timeout_s: float) -> dict:
    query = f"?mode=stream&text_stream=true&early_cut={early}&watermark=false"
    first_audio = first_end = None
    ends = 0
    async with websockets.connect(ws_url + query, max_size=None) as ws:
        start = time.perf_counter()

        async def send() -> None:
            for i, token in enumerate(tokens(answer)):
                await asyncio.sleep(max(0.0, start + i / words_per_s - time.perf_counter()))
                await ws.send(json.dumps({"text": token}))
            await ws.send(json.dumps({"done": True}))

        sender = asyncio.create_task(send())
        try:
            async with asyncio.timeout(timeout_s):
                async for raw in ws:
                    message = json.loads(raw)
                    kind = message.get("type")
                    if kind == "audio" and first_audio is None:
                        first_audio = time.perf_counter() - start
                        sender.cancel()  # first audio is what is measured; the rest of the answer costs only time
                        await ws.send(json.dumps({"cancel": True}))
                    elif kind == "end":
                        ends += 1
                        first_end = first_end or time.perf_counter() - start
                    elif kind == "cancelled":
                        break
                    elif kind == "error":
                        raise RuntimeError(message["error"])
        finally:
            sender.cancel()
    return {"first_audio_s": first_audio, "ends": ends}


async def run(args: argparse.Namespace, proxy_url: str) -> list[dict]:
    answers = json.loads(args.answers.read_text())["answers"]
    ws_url = proxy_url.replace("http://", "ws://") + "/stream"
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    await one_answer(ws_url, answers[0], "true", args.words_per_s, args.timeout_s)  # warm-up, not counted
    for round_ in range(args.rounds):
        for index, answer in enumerate(answers):
            order = list(VARIANTS.items())
            if (round_ + index) % 2:
                order.reverse()
            for name, early in order:
                result = await one_answer(ws_url, answer, early, args.words_per_s, args.timeout_s)
                results[name].append(result["first_audio_s"])
                print(f"{name:<20} answer {index}: {result['first_audio_s'] * 1000:7.0f} ms", file=sys.stderr)
    rows = []
    for name, times in results.items():
        rows.append(
            {
                "variant": name,
                "answers": len(times),
                "ttfa_ms_p50": statistics.median(times) * 1000,
                "ttfa_ms_max": max(times) * 1000,
                "words_per_s": args.words_per_s,
                "date": datetime.date.today().isoformat(),
            }
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy-url", help="a running proxy (http://host:port); default: start Triton and a proxy")
    parser.add_argument("--proxy-model", default="csm_1b", help="TRITON_MODEL of a proxy started here")
    parser.add_argument("--model-dir", type=Path, default=bench_stream.DEFAULT_MODEL_DIR)
    parser.add_argument("--watermark-dir", type=Path, default=bench_stream.DEFAULT_WATERMARK_DIR)
    parser.add_argument("--answers", type=Path, default=ANSWERS)
    parser.add_argument("--words-per-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the answers (default 1)")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.words_per_s <= 0:
        parser.error("--rounds must be >= 1 and --words-per-s > 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    stack = bench_stream.Stack(None, args.proxy_url)
    try:
        if args.proxy_url is None:
            stack.start_triton(args.model_dir, args.watermark_dir)
            stack.start_proxy(args.proxy_model)
        rows = asyncio.run(run(args, stack.proxy_url))
    finally:
        stack.close()
    rate = f"(from the first token, {args.words_per_s:g} words/s)"
    print(f"{'variant':<20} {'answers':>7} {'TTFA ms p50':>11} {'max':>7}   {rate}")
    for r in rows:
        print(f"{r['variant']:<20} {r['answers']:>7} {r['ttfa_ms_p50']:>11.0f} {r['ttfa_ms_max']:>7.0f}")
    early, late = rows[0]["ttfa_ms_p50"], rows[1]["ttfa_ms_p50"]
    print(f"ratio sentence ends only / early first cut (p50): {late / early:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
