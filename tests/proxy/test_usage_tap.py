from __future__ import annotations

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
