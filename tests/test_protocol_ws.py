"""chatserver.protocol.ws: the WebSocket frames, parsed and built without a socket."""

from __future__ import annotations

import json

import pytest

from chatserver.models.tools import ToolCall, ToolChoice
from chatserver.protocol.sampling import RequestParams
from chatserver.protocol.ws import (
    AuthFrame,
    CancelFrame,
    ChatFrame,
    FrameError,
    ToolResultFrame,
    done_frame,
    encode,
    error_frame,
    parse_client_frame,
    session_frame,
    token_frame,
    tool_calls_frame,
    tool_results_frame,
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
        ('{"type": "chat", "content": "x", "max_tokens": 8}', "invalid_field"),
    ],
)
def test_bad_frames(text: str, code: str) -> None:
    assert refused(text).code == code


def test_a_parameter_outside_params_is_refused_not_ignored() -> None:
    err = refused('{"type": "chat", "id": "m", "content": "x", "temperature": 0}')
    assert (err.code, err.frame_id) == ("invalid_field", "m")
    assert "'temperature' belongs in 'params'" in err.message


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


# --- tools -------------------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_chat_frame_with_tools() -> None:
    frame = parse({"type": "chat", "content": "hi", "tools": [TOOL]})
    assert isinstance(frame, ChatFrame)
    assert [t.name for t in frame.tools.tools] == ["get_weather"]
    assert frame.tools.choice == ToolChoice("auto") and frame.tools.parallel
    assert frame.params.grammar is None  # auto: the model chooses
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = parse(
        {
            "type": "chat",
            "content": "hi",
            "tools": [TOOL],
            "tool_choice": named,
            "parallel_tool_calls": False,
        }
    )
    assert isinstance(forced, ChatFrame)
    assert forced.tools.choice == ToolChoice("function", "get_weather")
    assert not forced.tools.parallel
    assert forced.params.grammar is not None and forced.params.grammar.kind == "lark"


@pytest.mark.parametrize(
    ("frame", "starts"),
    [
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name: "),
        ({"tools": [TOOL, TOOL]}, "tools[1].function.name: two tools"),
        ({"tools": [TOOL], "tool_choice": "always"}, "'tool_choice' must be"),
        ({"tool_choice": "auto", "parallel_tool_calls": 1}, "'parallel_tool_calls' must be"),
    ],
)
def test_bad_tools_name_their_field(frame: dict, starts: str) -> None:
    err = refused(json.dumps({"type": "chat", "content": "hi", "id": "t", **frame}))
    assert (err.code, err.frame_id) == ("invalid_field", "t")
    assert err.message.startswith(starts), err.message


def test_tool_result_frames() -> None:
    one = parse({"type": "tool_result", "tool_call_id": "call_1", "content": "18 C", "id": "q"})
    assert one == ToolResultFrame((("call_1", "18 C"),), "q")
    assert not one.whole and one.call_ids == ("call_1",)
    results = [{"tool_call_id": "c1", "content": "a"}, {"tool_call_id": "c2", "content": ""}]
    many = parse({"type": "tool_results", "results": results, "session_id": "s"})
    assert many == ToolResultFrame((("c1", "a"), ("c2", "")), None, "s", whole=True)


@pytest.mark.parametrize(
    ("frame", "starts"),
    [
        ({"type": "tool_result", "content": "x"}, "'tool_call_id'"),
        ({"type": "tool_result", "tool_call_id": "c", "content": 3}, "'content'"),
        ({"type": "tool_results"}, "'results' must be a list"),
        ({"type": "tool_results", "results": []}, "'results' must be a list"),
        ({"type": "tool_results", "results": ["x"]}, "'results[0]' must be an object"),
        ({"type": "tool_results", "results": [{"content": "x"}]}, "'results[0].tool_call_id'"),
        (
            {"type": "tool_results", "results": [{"tool_call_id": "c", "content": "x"}] * 2},
            "'results' answers tool call 'c' twice",
        ),
    ],
)
def test_bad_tool_result_frames(frame: dict, starts: str) -> None:
    err = refused(json.dumps(frame))
    assert err.code == "invalid_field" and err.message.startswith(starts), err.message


def test_tool_frames_built() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    assert tool_calls_frame("m1", [call]) == {
        "type": "tool_calls",
        "id": "m1",
        "calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
    }
    results = [{"tool_call_id": "call_1", "content": "18 C"}]
    assert tool_results_frame("m2", results) == {
        "type": "tool_results",
        "id": "m2",
        "results": results,
    }
