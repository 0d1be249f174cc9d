"""Request validation: every malformed body is a 4xx naming the problem."""

from __future__ import annotations

import json

import pytest

from controller.config import ServerConfig
from controller.serving.api import BadRequest, parse_images_request

LIMITS = ServerConfig(max_prompt_chars=100, max_n=4, max_steps=50, min_size=64, max_size=512)

# (case id, raw body, expected status, field named, words in the message)
MALFORMED = [
    ("not-json", b"{prompt: 1", 422, "body", "not valid JSON"),
    ("not-utf8", b"\xff\xfe{}", 422, "body", "not valid JSON"),
    ("json-list", b"[1, 2]", 422, "body", "must be a JSON object"),
    ("json-string", b'"draw a cat"', 422, "body", "must be a JSON object"),
    ("empty-body", b"", 422, "body", "not valid JSON"),
    ("missing-prompt", b"{}", 422, "prompt", "is required"),
    ("empty-prompt", b'{"prompt": ""}', 422, "prompt", "prompt is empty"),
    ("blank-prompt", b'{"prompt": "   "}', 422, "prompt", "prompt is empty"),
    ("long-prompt", json.dumps({"prompt": "x" * 101}).encode(), 422, "prompt", "the limit is 100"),
    ("prompt-not-string", b'{"prompt": 42}', 422, "prompt", "string"),
    ("nul-in-prompt", b'{"prompt": "a\\u0000b"}', 422, "prompt", "NUL"),
    ("n-zero", b'{"prompt": "a", "n": 0}', 422, "n", "1..4"),
    ("n-too-many", b'{"prompt": "a", "n": 9}', 422, "n", "1..4"),
    ("n-string", b'{"prompt": "a", "n": "2"}', 422, "n", "integer"),
    ("n-bool", b'{"prompt": "a", "n": true}', 422, "n", "integer"),
    (
        "size-not-multiple-of-8",
        b'{"prompt": "a", "size": "65x64"}',
        422,
        "size",
        "not a multiple of 8",
    ),
    ("size-too-big", b'{"prompt": "a", "size": "1024x1024"}', 422, "size", "outside 64..512"),
    ("size-too-small", b'{"prompt": "a", "size": "8x8"}', 422, "size", "outside 64..512"),
    ("size-garbage", b'{"prompt": "a", "size": "big"}', 422, "size", "WIDTHxHEIGHT"),
    ("guidance-nan", b'{"prompt": "a", "guidance": NaN}', 422, "guidance", "finite"),
    ("guidance-infinite", b'{"prompt": "a", "guidance": Infinity}', 422, "guidance", "finite"),
    (
        "guidance-negative",
        b'{"prompt": "a", "guidance": -1}',
        422,
        "guidance",
        "greater than or equal to 0",
    ),
    ("steps-zero", b'{"prompt": "a", "steps": 0}', 422, "steps", "greater than or equal to 1"),
    ("steps-over-limit", b'{"prompt": "a", "steps": 500}', 422, "steps", "over the limit of 50"),
    ("seed-negative", b'{"prompt": "a", "seed": -5}', 422, "seed", "greater than or equal to 0"),
    ("seed-float", b'{"prompt": "a", "seed": 1.5}', 422, "seed", "integer"),
    (
        "seed-plus-n-over-range",
        b'{"prompt": "a", "seed": 9223372036854775807, "n": 2}',
        422,
        "seed",
        "use a seed <= 9223372036854775806",
    ),
    ("duplicate-key", b'{"prompt": "a", "seed": 1, "seed": 2}', 422, "seed", "more than once"),
    (
        "url-format",
        b'{"prompt": "a", "response_format": "url"}',
        422,
        "response_format",
        "b64_json",
    ),
    ("unknown-field", b'{"prompt": "a", "colour": "red"}', 422, "colour", "unknown field"),
    ("user-too-long", json.dumps({"prompt": "a", "user": "u" * 300}).encode(), 422, "user", "256"),
    ("too-large", b'{"prompt": "' + b"a" * 1_100_000 + b'"}', 413, "body", "over 1000000 bytes"),
]


@pytest.mark.parametrize(
    ("raw", "status", "field", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_body_names_the_field(raw, status, field, words):
    with pytest.raises(BadRequest) as caught:
        parse_images_request(raw, LIMITS)
    error = caught.value
    assert 400 <= error.status < 500 and error.status == status
    assert any(e["field"] == field and words in e["message"] for e in error.errors), error.errors
    assert error.body()["error"]["param"] == error.errors[0]["field"]


def test_at_least_twenty_cases():
    assert len(MALFORMED) >= 20


def test_openai_body_with_extensions_is_accepted():
    body = parse_images_request(
        json.dumps(
            {
                "prompt": "a poster",
                "n": 2,
                "size": "128x64",
                "response_format": "b64_json",
                "user": "u1",
                "model": "ignored",
                "seed": 7,
                "steps": 4,
                "guidance": 3.5,
                "negative_prompt": "blurry",
            }
        ).encode(),
        LIMITS,
    )
    assert body.dimensions(LIMITS) == (128, 64)
    assert body.generation_params(128, 64) == {
        "n": 2,
        "size": "128x64",
        "steps": 4,
        "guidance": 3.5,
        "negative_prompt": "blurry",
        "response_format": "b64_json",
    }


def test_default_size_comes_from_config():
    body = parse_images_request(b'{"prompt": "a"}', ServerConfig(default_size="128x128"))
    assert body.dimensions(ServerConfig(default_size="128x128")) == (128, 128)
