"""Watermark settings and per-request options (csm_tts.watermark.options): plain unit tests, no Triton."""

from __future__ import annotations

import pytest

from csm_tts.watermark.options import (
    PUBLIC_KEY,
    InvalidWatermarkOption,
    WatermarkChoice,
    WatermarkSettings,
    key_id,
    parse_key,
    resolve,
)

PRIVATE = (1, 2, 3, 4, 5)
PRIVATE_TEXT = "1,2,3,4,5"


def test_public_key_is_sesames():
    assert PUBLIC_KEY == (212, 211, 146, 56, 201)


@pytest.mark.parametrize("value", ["1,2,3,4,5", " 1, 2 ,3 ,4,5 ", [1, 2, 3, 4, 5], (1, 2, 3, 4, 5)])
def test_parse_key_accepts_five_bytes(value):
    assert parse_key(value) == PRIVATE


def test_parse_key_bounds():
    assert parse_key("0,0,0,0,0") == (0,) * 5
    assert parse_key([255] * 5) == (255,) * 5


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1,2,3,4",
        "1,2,3,4,5,6",
        "1,2,3,4,256",
        "1,2,3,4,-1",
        "1,2,3,4,x",
        "1,2,3,4,",
        "1;2;3;4;5",
        "1,2,3,4,5.0",
        "1,2,3,4,1_0",
        "1,2,3,4,0x1",
        [1, 2, 3, 4],
        [1, 2, 3, 4, 256],
        [1, 2, 3, 4, True],
        [1, 2, 3, 4, 5.0],
        12345,
        None,
        {"a": 1},
    ],
)
def test_parse_key_rejects(value):
    with pytest.raises(InvalidWatermarkOption, match="watermark_key must be exactly 5"):
        parse_key(value)


def test_parse_key_error_never_echoes_the_key():
    secret = "201,202,203,204,999"
    with pytest.raises(InvalidWatermarkOption) as info:
        parse_key(secret)
    assert "201" not in str(info.value) and "999" not in str(info.value)


def test_key_id():
    assert key_id(PUBLIC_KEY) == "public"
    assert key_id(list(PUBLIC_KEY)) == "public"
    ident = key_id(PRIVATE)
    assert ident.startswith("k-") and len(ident) == 10
    int(ident[2:], 16)  # 8 hex digits of a hash, not the key
    assert ident == key_id(PRIVATE) != key_id((1, 2, 3, 4, 6))


def test_settings_defaults():
    settings = WatermarkSettings.from_env({})
    assert settings == WatermarkSettings(enabled=True, key=PUBLIC_KEY, key_is_public=True)
    assert WatermarkSettings.from_env({"CSM_WATERMARK_KEY": "  ", "CSM_WATERMARK_ENABLED": ""}) == settings


def test_settings_private_key():
    settings = WatermarkSettings.from_env({"CSM_WATERMARK_KEY": PRIVATE_TEXT})
    assert settings.key == PRIVATE and not settings.key_is_public and settings.enabled
    assert WatermarkSettings.from_env({"CSM_WATERMARK_KEY": "212,211,146,56,201"}).key_is_public


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("true", True),
        ("FALSE", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("No", False),
        (" on ", True),
        ("off", False),
    ],
)
def test_settings_enabled(raw, expected):
    assert WatermarkSettings.from_env({"CSM_WATERMARK_ENABLED": raw}).enabled is expected


def test_settings_invalid_enabled():
    with pytest.raises(ValueError, match="CSM_WATERMARK_ENABLED must be true or false"):
        WatermarkSettings.from_env({"CSM_WATERMARK_ENABLED": "maybe"})


def test_settings_invalid_key_names_the_variable_not_the_key():
    with pytest.raises(ValueError, match="CSM_WATERMARK_KEY must be exactly 5") as info:
        WatermarkSettings.from_env({"CSM_WATERMARK_KEY": "17,42,99,250"})
    assert "17" not in str(info.value) and "250" not in str(info.value)


def test_settings_are_frozen():
    settings = WatermarkSettings.from_env({})
    with pytest.raises(AttributeError):
        settings.enabled = False  # type: ignore[misc]


ON = WatermarkSettings(enabled=True, key=PUBLIC_KEY, key_is_public=True)
OFF = WatermarkSettings(enabled=False, key=PUBLIC_KEY, key_is_public=True)
ON_PRIVATE = WatermarkSettings(enabled=True, key=PRIVATE, key_is_public=False)


@pytest.mark.parametrize(
    "parameters,settings,expected",
    [
        ({}, ON, WatermarkChoice(True, PUBLIC_KEY, "public")),
        ({}, OFF, WatermarkChoice(False, None, "none")),
        ({}, ON_PRIVATE, WatermarkChoice(True, PRIVATE, key_id(PRIVATE))),
        ({"watermark": False}, ON, WatermarkChoice(False, None, "none")),
        ({"watermark": "false"}, ON, WatermarkChoice(False, None, "none")),
        ({"watermark": True}, OFF, WatermarkChoice(True, PUBLIC_KEY, "public")),
        ({"watermark": "TRUE"}, OFF, WatermarkChoice(True, PUBLIC_KEY, "public")),
        ({"watermark": 1}, OFF, WatermarkChoice(True, PUBLIC_KEY, "public")),
        ({"watermark_key": PRIVATE_TEXT}, ON, WatermarkChoice(True, PRIVATE, key_id(PRIVATE))),
        ({"watermark_key": PRIVATE_TEXT, "watermark": True}, OFF, WatermarkChoice(True, PRIVATE, key_id(PRIVATE))),
        ({"watermark_key": PRIVATE_TEXT}, OFF, WatermarkChoice(False, None, "none")),
        ({"watermark_key": ""}, ON_PRIVATE, WatermarkChoice(True, PRIVATE, key_id(PRIVATE))),
        ({"watermark": None, "watermark_key": None}, ON, WatermarkChoice(True, PUBLIC_KEY, "public")),
        ({"speaker_id": 3, "temperature": 0.5}, ON, WatermarkChoice(True, PUBLIC_KEY, "public")),
    ],
)
def test_resolve(parameters, settings, expected):
    assert resolve(parameters, settings) == expected


@pytest.mark.parametrize(
    "parameters,name",
    [
        ({"watermark": "maybe"}, "watermark"),
        ({"watermark": 2}, "watermark"),
        ({"watermark": 0.5}, "watermark"),
        ({"watermark": ""}, "watermark"),
        ({"watermark_key": "1,2,3"}, "watermark_key"),
        ({"watermark_key": "1,2,3,4,300"}, "watermark_key"),
        ({"watermark_key": 5}, "watermark_key"),
        # An invalid key is an error even when watermarking is off for this request.
        ({"watermark": False, "watermark_key": "a,b,c,d,e"}, "watermark_key"),
    ],
)
def test_resolve_rejects(parameters, name):
    with pytest.raises(InvalidWatermarkOption, match=f"^{name} must be"):
        resolve(parameters, ON)


def test_invalid_option_is_a_value_error():
    assert issubclass(InvalidWatermarkOption, ValueError)
