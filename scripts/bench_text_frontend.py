"""The text front-end's costs (csm_tts/text/): CPU time per 1,000 characters, and the time to the first segment for
text streamed at a given word rate, with the early first cut and with cuts at sentence ends only.

    .venv/bin/python scripts/bench_text_frontend.py [--rounds 20] [--words-per-second 8]

Input: benchmarks/llm_answers.json (answers as a chat LLM writes them). The streaming part runs on a simulated clock:
word i (with its leading space, the way LLM tokens come) arrives at i / rate seconds, the segmenter is polled at its
own deadline between arrivals, and the answer ends with a flush; the time printed is when the first segment is cut,
i.e. the earliest moment a generation could start. The CPU cost per piece is measured separately on the real clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from csm_tts.text.budget import split_spoken
from csm_tts.text.characters import clean_characters
from csm_tts.text.incremental import StreamPolicy, StreamSegmenter
from csm_tts.text.markdown import markdown_to_speech
from csm_tts.text.normalize import normalize
from csm_tts.text.verbalize import verbalize

ROOT = Path(__file__).resolve().parent.parent
ANSWERS = json.loads((ROOT / "benchmarks" / "llm_answers.json").read_text())["answers"]


def median_ms_per_kchar(work, text: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work(text)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 * 1000 / len(text)


def tokens(text: str) -> list[str]:
    """Words with their leading whitespace, as LLM tokens arrive (" how", " are")."""
    out, start = [], 0
    for index in range(1, len(text)):
        if text[index].isspace() and not text[index - 1].isspace():
            out.append(text[start:index])
            start = index
    return [*out, text[start:]]


def stream_all(text: str) -> None:
    segmenter = StreamSegmenter()
    for piece in tokens(text):
        for segment in segmenter.feed(piece):
            normalize(segment.text)
    for segment in segmenter.flush():
        normalize(segment.text)


def first_segment_time(text: str, policy: StreamPolicy, rate: float) -> tuple[float, int]:
    """(seconds from the first token to the first segment, its length) on a simulated clock."""
    clock = [0.0]
    segmenter = StreamSegmenter(policy, clock=lambda: clock[0])
    for index, piece in enumerate(tokens(text)):
        arrival = index / rate
        deadline = segmenter.deadline()
        if deadline is not None and deadline < arrival:
            clock[0] = deadline
            if cut := segmenter.poll():
                return clock[0], len(cut[0].text.strip())
        clock[0] = arrival
        if cut := segmenter.feed(piece):
            return clock[0], len(cut[0].text.strip())
    return clock[0], len(segmenter.flush()[0].text.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--words-per-second", type=float, default=8.0)
    args = parser.parse_args()

    corpus = "\n\n".join(ANSWERS)
    long_text = (corpus + "\n\n") * (4000 // len(corpus) + 1)
    normalize(long_text)  # warm caches and imports before timing
    print(f"CPU per 1,000 characters (median of {args.rounds}, {len(long_text)} characters of LLM answers):")
    stages = {
        "characters (emoji, invisible)": lambda t: clean_characters(t),
        "+ markdown (markdown-it-py)": lambda t: markdown_to_speech(clean_characters(t)),
        "+ verbalize (num2words)": lambda t: verbalize(markdown_to_speech(clean_characters(t))),
        "normalize (all stages)": lambda t: normalize(t),
        "normalize + budget split": lambda t: split_spoken(normalize(t)),
        "streamed word by word + normalize": stream_all,
    }
    for name, work in stages.items():
        print(f"  {name:36s} {median_ms_per_kchar(work, long_text, args.rounds):7.2f} ms")

    rate = args.words_per_second
    print(f"\nTime to first segment at {rate:g} words/s (simulated clock), per answer:")
    policies = {
        "sentence ends only": StreamPolicy(early_first_cut=False),
        "early first cut": StreamPolicy(),
        "early, min 10 chars": StreamPolicy(first_min_chars=10),
    }
    results = {
        name: [first_segment_time(answer, policy, rate) for answer in ANSWERS] for name, policy in policies.items()
    }
    for name, found in results.items():
        times = ", ".join(f"{t:.2f}s ({n} ch)" for t, n in found)
        print(f"  {name:18s} median {statistics.median(t for t, _ in found):.2f} s: {times}")
    late, early, earliest = (statistics.median(t for t, _ in found) for found in results.values())
    print(f"  sentence ends only / early first cut: x{late / early:.2f}; / early, min 10 chars: x{late / earliest:.2f}")


if __name__ == "__main__":
    main()
