"""chatserver.protocol.ws: the WebSocket frames, parsed and built without a socket."""

from __future__ import annotations

import json

import pytest

from chatserver.protocol.sampling import RequestParams
from chatserver.protocol.ws import (
    AuthFrame,
    CancelFrame,
    ChatFrame,
    FrameError,
    done_frame,
    encode,
    error_frame,
    parse_client_frame,
    session_frame,
    token_frame,
)

LIMIT = 1024


def parse(obj: object) -> object:
    return parse_client_frame(json.dumps(obj), LIMIT)


def refused(text: str, limit: int = LIMIT) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_client_frame(text, limit)
    return info.value


def test_chat_frame_minimal() -> None:
    assert parse({"type": "chat", "content": "hi"}) == ChatFrame(content="hi")


def test_chat_frame_full() -> None:
    frame = parse(
        {
            "type": "chat",
            "content": "hi",
            "id": "a1",
            "session_id": "s1",
            "params": {"max_tokens": 8, "temperature": 0, "stop": ["\n"], "seed": 3},
        }
    )
    assert frame == ChatFrame(
        content="hi",
        id="a1",
        session_id="s1",
        params=RequestParams(max_tokens=8, temperature=0.0, stop=("\n",), seed=3),
    )


def test_chat_frame_penalties_and_logit_bias() -> None:
    params = {"presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"42": -100}}
    frame = parse({"type": "chat", "content": "hi", "params": params})
    assert frame.params == RequestParams(
        presence_penalty=0.5, frequency_penalty=-1.0, logit_bias=((42, -100.0),)
    )


def test_chat_frame_ignore_eos() -> None:
    frame = parse({"type": "chat", "content": "hi", "params": {"ignore_eos": True}})
    assert frame.params == RequestParams(ignore_eos=True)
    error = refused(json.dumps({"type": "chat", "content": "hi", "params": {"ignore_eos": 1}}))
    assert "ignore_eos" in error.message


def test_cancel_frames() -> None:
    assert parse({"type": "cancel"}) == CancelFrame(None)
    assert parse({"type": "cancel", "id": "x"}) == CancelFrame("x")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('"chat"', "invalid_frame"),
        ('{"type": "hello"}', "unknown_type"),
        ('{"content": "no type"}', "invalid_field"),
        ('{"type": 3}', "invalid_field"),
        ('{"type": "chat"}', "invalid_field"),
        ('{"type": "chat", "content": ""}', "invalid_field"),
        ('{"type": "chat", "content": 5}', "invalid_field"),
        ('{"type": "chat", "content": "x", "id": 7}', "invalid_field"),
        ('{"type": "chat", "content": "x", "session_id": ["s"]}', "invalid_field"),
        ('{"type": "chat", "content": "x", "params": []}', "invalid_field"),
        ('{"type": "chat", "content": "x", "params": {"max_token": 3}}', "invalid_parameter"),
        ('{"type": "chat", "content": "x", "params": {"temperature": 9}}', "invalid_parameter"),
        ('{"type": "chat", "content": "x", "params": {"max_tokens": "8"}}', "invalid_parameter"),
        ('{"type": "chat", "content": "x", "params": {"top_p": -1}}', "invalid_parameter"),
        ('{"type": "chat", "content": "x", "params": {"stop": [1]}}', "invalid_parameter"),
    ],
)
def test_bad_frames(text: str, code: str) -> None:
    assert refused(text).code == code


def test_errors_name_the_message_they_refuse() -> None:
    err = refused('{"type": "chat", "id": "q7", "content": "x", "params": {"top_k": -2}}')
    assert err.frame() == {
        "type": "error",
        "id": "q7",
        "code": "invalid_parameter",
        "message": err.message,
    }
    assert "top_k" in err.message


def test_auth_frames_only_where_keys_are_taken() -> None:
    text = json.dumps({"type": "auth", "id": "auth", "api_key": "k-123"})
    frame = parse_client_frame(text, LIMIT, auth=True)
    assert frame == AuthFrame(api_key="k-123", id="auth")
    assert "k-123" not in repr(frame)
    # A server without keys: the client is told to drop its key.
    err = refused(text)
    assert (err.code, err.frame_id) == ("unknown_type", "auth")
    for bad in ({"type": "auth", "id": "auth"}, {"type": "auth", "id": "auth", "api_key": 5}):
        with pytest.raises(FrameError) as info:
            parse_client_frame(json.dumps(bad), LIMIT, auth=True)
        assert (info.value.code, info.value.frame_id) == ("invalid_field", "auth")


def test_frame_limit_counts_bytes() -> None:
    text = json.dumps({"type": "chat", "content": "é" * 600}, ensure_ascii=False)
    assert len(text) < LIMIT < len(text.encode())
    assert refused(text).code == "frame_too_large"
    assert isinstance(parse_client_frame(text, 2 * LIMIT), ChatFrame)


def test_builders() -> None:
    assert session_frame("s") == {"type": "session", "session_id": "s"}
    assert token_frame("m1", "Hel") == {"type": "token", "id": "m1", "content": "Hel"}
    assert done_frame("m1", "length", 12, 8) == {
        "type": "done",
        "id": "m1",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "cached_tokens": 0},
    }
    assert error_frame("queue_full", "full") == {
        "type": "error",
        "code": "queue_full",
        "message": "full",
    }
    assert json.loads(encode(token_frame("m", "ünï"))) == token_frame("m", "ünï")
