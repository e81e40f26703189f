from __future__ import annotations

import json

import pytest

from fleetgate.proxy.usage_tap import UsageTap

USAGE_EV = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}\n\n'
TOKEN_EV = b'data: {"id":"x","model":"up","choices":[{"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def test_whole_body_usage_and_model_rewrite():
    t = UsageTap(hide_usage_event=False, rewrite=(b'"model":"up"', b'"model":"pub"'))
    out = t.body(b'{"model":"up","usage":{"prompt_tokens":2,"completion_tokens":5}}')
    assert out == b'{"model":"pub","usage":{"prompt_tokens":2,"completion_tokens":5}}'
    assert (t.prompt_tokens, t.completion_tokens) == (2, 5)


def test_stream_passes_events_untouched_and_reads_usage():
    t = UsageTap(hide_usage_event=False, rewrite=None)
    assert t.events(TOKEN_EV + USAGE_EV + DONE) == TOKEN_EV + USAGE_EV + DONE
    assert (t.prompt_tokens, t.completion_tokens, t.done) == (3, 7, True)


def test_usage_event_hidden_when_the_gateway_asked_for_it():
    t = UsageTap(hide_usage_event=True, rewrite=None)
    assert t.events(TOKEN_EV + USAGE_EV + DONE) == TOKEN_EV + DONE
    assert t.completion_tokens == 7


def test_content_mentioning_usage_is_not_dropped():
    ev = b'data: {"choices":[{"delta":{"content":"\\"usage\\""}}]}\n\n'
    t = UsageTap(hide_usage_event=True, rewrite=None)
    assert t.events(ev) == ev


def test_garbage_events_pass_through():
    t = UsageTap(hide_usage_event=True, rewrite=None)
    ev = b'data: {"usage": oops\n\n'
    assert t.events(ev) == ev
    assert t.body(b'{"usage": nope') == b'{"usage": nope'


def _token(i: int, usage: bool = False, model: str = "up") -> bytes:
    u = f',"usage":{{"prompt_tokens":4,"completion_tokens":{i + 1},"total_tokens":{i + 5}}}'
    return (
        f'data: {{"id":"x","model":"{model}","choices":[{{"index":0,"delta":{{"content":"t{i}"}},'
        f'"finish_reason":null}}]{u if usage else ""}}}\n\n'
    ).encode()


ROLE_EV = b'data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
FINAL_EV = b'data: {"id":"x","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'


def test_rewrite_matches_the_model_however_the_json_is_spaced():
    pair = (b'"model":"up"', b'"model":"pub"')  # the form the gateway builds
    for spelled in (b'"model":"up"', b'"model": "up"', b'"model" : "up"', b'"model":\n  "up"'):
        t = UsageTap(hide_usage_event=False, rewrite=pair)
        assert t.body(b'{"id":"x",' + spelled + b',"choices":[]}') == (
            b'{"id":"x","model":"pub","choices":[]}'
        )
        ev = b'data: {"id":"x",' + spelled + b',"choices":[]}\n\n'
        assert b'"up"' not in t.events(ev)
    # A name that merely starts like the upstream name is left alone.
    t = UsageTap(hide_usage_event=False, rewrite=pair)
    assert t.body(b'{"model": "upper"}') == b'{"model": "upper"}'


def test_last_continuous_usage_counts_a_stream_the_client_left_early():
    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.events(b"".join(_token(i, usage=True) for i in range(20)))  # 20 of 30, then gone
    assert (t.prompt_tokens, t.completion_tokens) == (4, 20)


def test_without_any_usage_the_relayed_content_events_are_counted():
    t = UsageTap(hide_usage_event=True, rewrite=None)
    t.events(ROLE_EV + b"".join(_token(i) for i in range(20)) + FINAL_EV)
    assert (t.prompt_tokens, t.completion_tokens) == (0, 20)
    assert not t.usage_seen


def test_usage_the_gateway_added_is_cut_from_every_chunk_and_the_usage_event_dropped():
    t = UsageTap(hide_usage_event=True, rewrite=None)
    stream = b"".join(_token(i, usage=True) for i in range(3)) + USAGE_EV + DONE
    out = t.events(stream)
    assert out == b"".join(_token(i) for i in range(3)) + DONE
    assert (t.prompt_tokens, t.completion_tokens) == (3, 7)  # the final usage event's


def test_client_that_asked_for_final_usage_keeps_it_but_not_the_per_chunk_usage():
    t = UsageTap(hide_usage_event=False, strip_chunk_usage=True, rewrite=None)
    out = t.events(_token(0, usage=True) + USAGE_EV + DONE)
    assert out == _token(0) + USAGE_EV + DONE


def test_usage_in_an_unusual_layout_is_still_read_and_hidden():
    ev = b'data: {"usage": {"prompt_tokens": 2, "completion_tokens": 9}, "choices": []}\n\n'
    t = UsageTap(hide_usage_event=True, rewrite=None)
    assert t.events(ev + DONE) == DONE
    assert (t.prompt_tokens, t.completion_tokens) == (2, 9)


def _choice_token(index: int, done: int, spaced: bool = False) -> bytes:
    """A chunk of choice ``index`` as vLLM writes it with continuous usage stats: its usage counts
    that choice only (``previous_num_tokens[index]``)."""
    sep = ": " if spaced else ":"
    return (
        f'data: {{"id":"x","choices":[{{"index"{sep}{index},"delta":{{"content":"t"}}}}],'
        f'"usage":{{"prompt_tokens":4,"completion_tokens":{done},"total_tokens":{done + 4}}}}}\n\n'
    ).encode()


def test_a_left_n2_stream_is_charged_for_what_every_choice_produced():
    # Interleaved as vLLM sends them: choice 0 reaches 3 tokens, choice 1 reaches 2; one batch
    # or one event at a time, hidden or not, the charge is 3 + 2 (not the last chunk's 2).
    chunks = [_choice_token(0, 1), _choice_token(1, 1), _choice_token(0, 2),
              _choice_token(1, 2, spaced=True), _choice_token(0, 3)]
    for hide in (False, True):
        for batched in (False, True):
            t = UsageTap(hide_usage_event=hide, rewrite=None)
            for c in [b"".join(chunks)] if batched else chunks:
                t.events(c)
            assert (t.prompt_tokens, t.completion_tokens) == (4, 5), (hide, batched)


def test_the_final_usage_event_is_the_whole_responses_and_wins():
    t = UsageTap(hide_usage_event=True, rewrite=None)
    t.events(_choice_token(0, 3) + _choice_token(1, 2) + USAGE_EV + DONE)
    assert (t.prompt_tokens, t.completion_tokens) == (3, 7)  # USAGE_EV's, not 3 + 2


def test_per_choice_usage_in_an_unusual_layout_is_summed_too():
    evs = [b'data: {"usage": {"prompt_tokens": 4, "completion_tokens": %d}, "choices": '
           b'[{"index": %d, "delta": {}}]}\n\n' % (c, i) for i, c in ((0, 6), (1, 4))]
    t = UsageTap(hide_usage_event=True, rewrite=None)
    for ev in evs:
        t.events(ev)
    assert t.completion_tokens == 10


def test_a_count_past_a_usage_columns_range_is_no_count():
    """An upstream that reports 2**31 tokens (or 2**63, past SQLite's integers) would make the
    usage batch holding that record fail on every retry; such a number is not taken."""
    from fleetgate.proxy.usage_tap import MAX_COUNT

    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.body(b'{"usage":{"prompt_tokens":%d,"completion_tokens":%d}}' % (MAX_COUNT, MAX_COUNT + 1))
    assert (t.prompt_tokens, t.completion_tokens) == (MAX_COUNT, 0)
    s = UsageTap(hide_usage_event=False, rewrite=None)
    big = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":1}}\n\n'
    s.events(TOKEN_EV + big % (2**63) + DONE)
    assert (s.prompt_tokens, s.completion_tokens) == (0, 1)


# -- layouts mutmut showed untested (MUTANTS_SET=accounting) ---------------------------------------

NESTED = (b'"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7,'
          b'"prompt_tokens_details":{"cached_tokens":3}}')


def _events(out: bytes) -> list[dict]:
    """What a client parses of a relayed stream: each event's JSON ([DONE] left out)."""
    return [json.loads(e[5:]) for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]


@pytest.mark.parametrize("hide", [False, True])
def test_usage_with_a_nested_object_in_vllms_own_layout_is_read_whole(hide: bool) -> None:
    # vLLM writes usage last and compact; with prompt_tokens_details its object holds another.
    # Per-chunk usage (choices not empty) and the final usage event (choices empty).
    chunk = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"t"}}],' + NESTED + b"}\n\n"
    final = b'data: {"id":"x","choices":[],' + NESTED + b"}\n\n"
    for events in (chunk, final):
        t = UsageTap(hide_usage_event=hide, rewrite=None)
        out = t.events(TOKEN_EV + events + DONE)
        assert (t.prompt_tokens, t.completion_tokens) == (5, 7), (hide, events)
        got = _events(out)
        assert all("usage" not in e for e in got) if hide else got[-1]["usage"]["prompt_tokens"] == 5


def test_a_choices_index_is_its_own_not_a_tool_calls() -> None:
    # Choice 1's delta holds a tool call with index 0: the usage counts choice 1, so the charge
    # is choice 0's 3 plus choice 1's 2.
    tool = (b'data: {"id":"x","choices":[{"index":1,"delta":{"tool_calls":[{"index":0,'
            b'"function":{"arguments":"{}"}}]}}],'
            b'"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n')
    for hide in (False, True):
        t = UsageTap(hide_usage_event=hide, rewrite=None)
        t.events(_choice_token(0, 3) + tool)
        assert t.completion_tokens == 5, hide


def test_choice_indexes_with_a_nine_in_them_are_read() -> None:
    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.events(b"".join(_choice_token(i, 2) for i in (0, 9, 19)))
    assert t.completion_tokens == 6


def test_a_choice_index_that_is_not_a_number_breaks_nothing() -> None:
    odd = (b'data: {"id":"x","choices":[{"index":null,"delta":{"content":"t"}}],'
           b'"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n')
    for hide in (False, True):
        t = UsageTap(hide_usage_event=hide, rewrite=None)
        t.events(odd + DONE)
        assert (t.prompt_tokens, t.completion_tokens) == (4, 2), hide


def test_without_usage_text_events_of_a_completions_stream_are_counted() -> None:
    text = b'data: {"id":"x","choices":[{"index":0,"text":"t"}]}\n\n'
    empty = b'data: {"id":"x","choices":[{"index":0,"text":""}]}\n\n'
    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.events(text * 3 + empty + TOKEN_EV + DONE)
    assert t.completion_tokens == 4  # three text events and one chat content event


def test_usage_in_another_layout_reaches_the_client_as_asked() -> None:
    # usage before choices (not vLLM's layout): parsed, then kept or cut as the client asked.
    chunk = (b'data: {"id":"x","usage":{"prompt_tokens":4,"completion_tokens":1},'
             b'"choices":[{"index":0,"delta":{"content":"t"}}]}\n\n')
    final = b'data: {"id":"x","usage":{"prompt_tokens":4,"completion_tokens":2},"choices":[]}\n\n'
    # The client asked for nothing: per-chunk usage cut, the usage event dropped.
    t = UsageTap(hide_usage_event=True, rewrite=None)
    got = _events(t.events(chunk + final + DONE))
    assert got == [{"id": "x", "choices": [{"index": 0, "delta": {"content": "t"}}]}]
    assert (t.prompt_tokens, t.completion_tokens) == (4, 2)
    # The client asked for the final usage only: the chunk's cut, the final event kept.
    t = UsageTap(hide_usage_event=False, strip_chunk_usage=True, rewrite=None)
    got = _events(t.events(chunk + final + DONE))
    assert [("usage" in e, e["choices"]) for e in got] == [
        (False, [{"index": 0, "delta": {"content": "t"}}]), (True, [])]
    # The client asked for continuous usage: everything as the upstream sent it.
    t = UsageTap(hide_usage_event=False, strip_chunk_usage=False, rewrite=None)
    assert t.events(chunk + final + DONE) == chunk + final + DONE
    # No space after "data:" is the same event.
    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.events(final.replace(b"data: ", b"data:") + DONE)
    assert (t.prompt_tokens, t.completion_tokens) == (4, 2)


def test_without_usage_spaced_json_events_are_counted_too() -> None:
    # An upstream that writes `": "` (Python's json.dumps): content and text events, an empty
    # one of each not counted.
    evs = [b'data: {"choices": [{"index": 0, "delta": {"content": "t"}}]}\n\n',
           b'data: {"choices": [{"index": 0, "delta": {"content": ""}}]}\n\n',
           b'data: {"choices": [{"index": 0, "text": "t"}]}\n\n',
           b'data: {"choices": [{"index": 0, "text": ""}]}\n\n']
    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.events(b"".join(evs * 2) + TOKEN_EV)
    assert t.completion_tokens == 5  # 2 content, 2 text, and one compact content event


def test_a_stream_is_done_only_at_its_done_event_and_left_only_when_told() -> None:
    t = UsageTap(hide_usage_event=False, rewrite=None)
    t.events(TOKEN_EV)
    assert not t.done and not t.disconnected  # an upstream that stops here did not finish
    t.events(DONE)
    assert t.done


def test_a_served_name_with_a_colon_is_rewritten() -> None:
    # Names such as "llama3:8b" are common; the older literal pair form splits at the first colon.
    for rewrite in ((b'"model":"llama3:8b"', b'"model":"team:small"'),):
        t = UsageTap(hide_usage_event=False, rewrite=rewrite)
        assert t.body(b'{"model": "llama3:8b","choices":[]}') == b'{"model":"team:small","choices":[]}'
