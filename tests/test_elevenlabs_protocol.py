"""ElevenLabs' input-streaming protocol as plain values (csm_tts/text/elevenlabs.py): what pipecat's
ElevenLabsTTSService sends and reads (docs/elevenlabs.md), and hostile messages answered with a clear error."""

from __future__ import annotations

import base64
import json

import pytest

from csm_tts.text import elevenlabs as el
from csm_tts.text.elevenlabs_contexts import Contexts


def test_pipecat_query_string():
    # pipecat 1.14.0 opens .../multi-stream-input?model_id=...&output_format=...&auto_mode=... (+ optional ones)
    query = {
        "model_id": "eleven_flash_v2_5",
        "output_format": "pcm_24000",
        "auto_mode": "false",
        "apply_text_normalization": "off",
        "language_code": "en",
        "enable_logging": "true",
        "enable_ssml_parsing": "false",
    }
    parsed = el.parse_query("alloy", query, multi=True)
    assert parsed.output_format == el.OutputFormat("pcm_24000", "pcm", 24000)
    assert (parsed.multi, parsed.auto_mode, parsed.normalize, parsed.language_code) == (True, False, False, "en")
    assert parsed.inactivity_timeout_s == 20
    assert el.parse_query("v", {}, multi=False).output_format.name == "mp3_44100_128"
    assert el.parse_query("v", {"output_format": "pcm_44100"}, multi=False).output_format.sample_rate == 44100


@pytest.mark.parametrize(
    ("query", "phrase"),
    [
        ({"output_format": "ulaw_8000"}, "output_format 'ulaw_8000' is not supported; use one of pcm_8000"),
        ({"output_format": "pcm_24000", "inactivity_timeout": "500"}, "inactivity_timeout must be"),
        ({"inactivity_timeout": "-1"}, "inactivity_timeout must be"),
        ({"output_format": "x" * 5000}, r"output_format 'xxxxxxxxx.*\.\.\. is not supported"),
        ({"apply_text_normalization": "maybe"}, "apply_text_normalization must be"),
        ({"language_code": "english please"}, "language_code must be"),
        ({"auto_mode": "sometimes"}, "auto_mode must be true or false"),
    ],
)
def test_bad_query_strings(query, phrase):
    with pytest.raises(el.ProtocolError, match=phrase) as raised:
        el.parse_query("voice", query, multi=True)
    assert raised.value.close_code == 1008


def test_what_pipecat_sends_on_multi_stream_input():
    """Every message shape in pipecat/services/elevenlabs/tts.py (1.14.0), as it json.dumps them."""
    parse = lambda message: el.parse_message(json.dumps(message), multi=True)  # noqa: E731
    init = parse({"text": " ", "context_id": "c1", "voice_settings": {"stability": 0.5, "speed": 1.1}})
    assert init == el.Text(" ", "c1", voice_settings=el.VoiceSettings(stability=0.5, speed=1.1))
    assert parse({"text": "Hel", "context_id": "c1"}) == el.Text("Hel", "c1")
    assert parse({"text": "", "context_id": "c1"}) == el.KeepAlive("c1")
    assert parse({"text": ""}) == el.KeepAlive(None)
    assert parse({"context_id": "c1", "flush": True}) == el.Flush("c1")
    assert parse({"context_id": "c1", "close_context": True}) == el.CloseContext("c1")
    assert parse({"close_socket": True}) == el.CloseSocket()


def test_stream_input_messages():
    parse = lambda message: el.parse_message(json.dumps(message), multi=False)  # noqa: E731
    first = parse(
        {
            "text": " ",
            "voice_settings": {"stability": 0.4, "similarity_boost": 0.8, "use_speaker_boost": True},
            "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]},
            "xi_api_key": "key-1",
        }
    )
    assert first.chunk_length_schedule == (120, 160, 250, 290) and first.api_key == "key-1"
    assert parse({"text": " ", "authorization": "Bearer key-2"}).api_key == "key-2"
    assert parse({"text": "Hello world. ", "try_trigger_generation": True}) == el.Text("Hello world. ")
    assert parse({"text": "and more", "flush": True}) == el.Text("and more", flush=True)
    assert parse({"text": ""}) == el.EndOfInput()
    assert parse({"text": "x", "context_id": "ignored here"}).context_id is None
    assert parse({"text": "x", "unknown_field": [1, 2]}) == el.Text("x")  # forward compatible


HOSTILE = [
    (b"\xff\xfe\x00", "UTF-8 JSON text", 1007),
    ("not json at all", "must be a JSON object", 1007),
    ("[1, 2]", "must be a JSON object", 1007),
    ("null", "must be a JSON object", 1007),
    ("[" * 50_000, "must be a JSON object", 1007),
    ('{"text": NaN}', "not a number JSON allows", 1007),
    ('{"text": "' + "x" * 70_000 + '"}', "at most 65536 bytes", 1009),
    ('{"text": "\\ud800"}', "lone surrogate", 1007),
    ('{"text": 5}', "text must be a string", 1008),
    ('{"text": "' + "x" * 10_001 + '"}', "text may be at most 10000 characters", 1008),
    ('{"text": "a", "flush": "yes"}', "flush must be true or false", 1008),
    ('{"text": "a", "flush": 1}', "flush must be true or false", 1008),
    ("{}", "needs text, flush, close_context or close_socket", 1008),
    ('{"text": "a", "context_id": 7}', "context_id must be 1 to 128 printable ASCII", 1008),
    ('{"text": "a", "context_id": "has space"}', "context_id must be", 1008),
    ('{"text": "a", "context_id": ""}', "context_id must be", 1008),
    ('{"text": "a", "context_id": "' + "c" * 129 + '"}', "context_id must be", 1008),
    ('{"close_context": true}', "needs the context_id", 1008),
    ('{"text": " ", "voice_settings": "fast"}', "voice_settings must be an object", 1008),
    ('{"text": " ", "voice_settings": {"stability": 2}}', "stability must be from 0.0 to 1.0", 1008),
    ('{"text": " ", "voice_settings": {"stability": true}}', "stability must be a number", 1008),
    ('{"text": " ", "voice_settings": {"speed": 1e400}}', "speed must be a number", 1008),
    ('{"text": " ", "voice_settings": {"use_speaker_boost": "yes"}}', "use_speaker_boost must be true", 1008),
    ('{"text": " ", "generation_config": []}', "generation_config must be an object", 1008),
    ('{"text": " ", "generation_config": {"chunk_length_schedule": [true]}}', "chunk_length_schedule must be", 1008),
    ('{"text": " ", "generation_config": {"chunk_length_schedule": [9999]}}', "chunk_length_schedule must be", 1008),
    ('{"text": " ", "generation_config": {"chunk_length_schedule": []}}', "chunk_length_schedule must be", 1008),
    ('{"text": " ", "xi_api_key": 12345}', "xi_api_key must be a string", 1008),
]


@pytest.mark.parametrize(("raw", "phrase", "close_code"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_messages_get_a_clear_error(raw, phrase, close_code):
    with pytest.raises(el.ProtocolError, match=phrase) as raised:
        el.parse_message(raw, multi=True)
    assert raised.value.close_code == close_code
    answer = json.loads(el.error(raised.value).as_json())
    assert answer == {"message": str(raised.value), "error": "invalid_message", "code": close_code}


def test_close_context_on_stream_input_is_explained():
    with pytest.raises(el.ProtocolError, match="multi-stream-input only"):
        el.parse_message('{"close_context": true, "context_id": "a"}', multi=False)


def test_answers_are_what_pipecat_reads():
    chunk = bytes(range(256)) * 10
    answer = json.loads(el.audio(chunk, "c1").as_json())
    assert base64.b64decode(answer["audio"]) == chunk
    assert answer["contextId"] == "c1"
    assert "alignment" not in answer and "normalizedAlignment" not in answer and "isFinal" not in answer
    assert json.loads(el.final("c1").as_json()) == {"isFinal": True, "contextId": "c1"}
    assert json.loads(el.final().as_json()) == {"isFinal": True}
    assert "contextId" not in json.loads(el.audio(b"\x00\x00").as_json())


def test_a_recorded_pipecat_session_parses_and_segments():
    """tests/pipecat_elevenlabs_session.json: pipecat 1.14.0's real messages for two LLM turns sent token by token,
    the second interrupted (scripts/record_pipecat_elevenlabs.py). Every message parses, in the order a server sees
    them, and each context's text pieces give sentences through the incremental segmenter."""
    from pathlib import Path
    from urllib.parse import parse_qsl, urlsplit

    from csm_tts.text.incremental import StreamSegmenter
    from csm_tts.text.normalize import normalize

    session = json.loads((Path(__file__).parent / "pipecat_elevenlabs_session.json").read_text())
    (connection,) = session["connections"]
    url = urlsplit(connection["path"])
    assert url.path == "/v1/text-to-speech/alloy/multi-stream-input"
    assert connection["xi-api-key"] == "test-key"
    query = el.parse_query("alloy", dict(parse_qsl(url.query)), multi=True)
    assert query.output_format.name == "pcm_24000"

    contexts = Contexts(multi=True)
    messages = [contexts.admit(el.parse_message(json.dumps(raw), multi=True)) for raw in connection["messages"]]
    kinds = [type(message).__name__ for message in messages]
    assert kinds == ["Text"] * 9 + ["Flush", "CloseContext"] + ["Text"] * 5 + ["CloseContext", "CloseSocket"]
    # the end of the first turn (flushed) is spoken to the end; the second close is the interruption
    assert (messages[10].interrupt, messages[16].interrupt) == (False, True)
    first, second = messages[0].context_id, messages[11].context_id
    assert first != second and messages[0].voice_settings == el.VoiceSettings(0.5, 0.75, None, None, 1.0)

    spoken: dict[str, list[str]] = {}
    segmenters: dict[str, StreamSegmenter] = {}
    for message in messages:
        if isinstance(message, el.Text):
            segmenter = segmenters.setdefault(message.context_id, StreamSegmenter(clock=lambda: 0.0))
            cut = segmenter.feed(message.text)
        elif isinstance(message, el.CloseContext) and message.interrupt:
            segmenters.pop(message.context_id)  # barge-in (proxy/elevenlabs_session.py stops it): the rest is dropped
            continue
        elif isinstance(message, el.Flush | el.CloseContext):
            cut = segmenters[message.context_id].flush()
        else:
            continue
        spoken.setdefault(message.context_id, []).extend(normalize(s.text).text for s in cut if s.text.strip())
    assert spoken[first] == ["Hello there,", "how are you? I am fine."]  # an early first cut, then sentences
    # The interrupted turn's one unfinished sentence was never cut before the barge-in: none of it is spoken.
    assert spoken[second] == []


def test_contexts_are_limited_to_five_and_unknown_ones_are_no_ops():
    contexts = Contexts(multi=True)
    for number in range(el.MAX_CONTEXTS):
        assert contexts.admit(el.Text(" ", f"c{number}")) == el.Text(" ", f"c{number}")
    with pytest.raises(el.ProtocolError, match=r"exceeded \(5\)") as raised:
        contexts.admit(el.Text("Hi", "c5"))
    assert json.loads(el.error(raised.value).as_json())["error"] == "max_active_conversations"
    assert contexts.admit(el.CloseContext("c0")) == el.CloseContext("c0", interrupt=False)
    assert contexts.admit(el.Text("Hi", "c5")) == el.Text("Hi", "c5")  # room again
    assert contexts.admit(el.Flush("never-opened")) is None
    assert contexts.admit(el.CloseContext("c0")) is None  # already closed
    assert contexts.admit(el.KeepAlive("c1")) == el.KeepAlive("c1")


def test_a_close_after_text_that_was_not_flushed_is_an_interruption():
    contexts = Contexts(multi=True)
    contexts.admit(el.Text("Finish this.", "a", flush=True))
    assert contexts.admit(el.CloseContext("a")).interrupt is False
    contexts.admit(el.Text("Stop th", "b"))
    assert contexts.admit(el.CloseContext("b")).interrupt is True


def test_stream_input_takes_no_text_after_its_end():
    contexts = Contexts(multi=False)
    contexts.admit(el.Text("Hello. "))
    assert contexts.admit(el.EndOfInput()) == el.EndOfInput()
    with pytest.raises(el.ProtocolError, match="the input has ended"):
        contexts.admit(el.Text("more"))


def test_pipecat_sends_today_what_was_recorded(tmp_path):
    """Runs pipecat's real ElevenLabsTTSService (installed with --no-deps, docs/elevenlabs.md) against a local
    recorder: the messages are the committed recording's (context ids aside) and all of them are admitted."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "session.json"
    run = subprocess.run(
        [sys.executable, "-W", "ignore", str(root / "scripts" / "record_pipecat_elevenlabs.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fresh, committed = (json.loads(path.read_text()) for path in (out, root / "tests/pipecat_elevenlabs_session.json"))

    def shapes(session):
        return [{k: v for k, v in m.items() if k != "context_id"} for m in session["connections"][0]["messages"]]

    assert shapes(fresh) == shapes(committed)
    assert fresh["connections"][0]["path"] == committed["connections"][0]["path"]
    contexts = Contexts(multi=True)
    admitted = [
        contexts.admit(el.parse_message(json.dumps(m), multi=True)) for m in fresh["connections"][0]["messages"]
    ]
    assert None not in admitted
    assert fresh["client_audio_frames"] > 0 and fresh["client_stopped_frames"] == 1
