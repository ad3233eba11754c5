"""Drives `flashpack serve`'s Anthropic Messages API with the official `anthropic` Python SDK
(tests/serve_agents.rs runs it against the tiny model converted with Qwen3's chat template).

Usage: python3 tests/anthropic_client.py BASE_URL API_KEY MODEL
Prints one "<check> ok" line per check; any failure raises (exit 1).
"""

import sys

import anthropic

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
# anthropic 2.x no longer takes `temperature` as an argument (the server still does): greedy
# decoding, for texts that can be compared, goes in the body.
T0 = {"extra_body": {"temperature": 0}}

system = "You answer questions about history."
question = [{"role": "user", "content": "Tell me about the history of Rome."}]

# A plain message: Anthropic's object, greedy, max_tokens reached.
m = client.messages.create(model=model, system=system, messages=question, max_tokens=8, **T0)
assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
assert len(m.content) == 1 and m.content[0].type == "text" and m.content[0].text, m.content
assert m.stop_reason == "max_tokens" and m.stop_sequence is None, m
assert m.usage.output_tokens == 8, m.usage
assert m.usage.cache_creation_input_tokens == 0, m.usage
prompt_tokens = m.usage.input_tokens + m.usage.cache_read_input_tokens
print("message ok")

# Streamed, raw events: Anthropic's sequence, the same greedy text; the SDK's stream helper
# assembles the same message. The second request reuses the first's prompt from the KV cache.
events = list(
    client.messages.create(
        model=model, system=system, messages=question, max_tokens=8, **T0, stream=True
    )
)
kinds = [e.type for e in events]
assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop", kinds
assert set(kinds[2:-3]) == {"content_block_delta"}, kinds
text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
assert text == m.content[0].text, (text, m.content[0].text)
start = events[0].message.usage
assert start.input_tokens + start.cache_read_input_tokens == prompt_tokens, start
assert start.cache_read_input_tokens > 0, start
assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 8
with client.messages.stream(
    model=model, system=system, messages=question, max_tokens=8, **T0
) as stream:
    final = stream.get_final_message()
assert final.content[0].text == text and final.stop_reason == "max_tokens", final
print("stream ok")

# Stop sequences: the text ends before the sequence, which the message names. The sequence is
# taken from the greedy text itself (three characters that first appear past its start), so it
# is sure to appear.
long = client.messages.create(model=model, system=system, messages=question, max_tokens=24, **T0)
full_text = long.content[0].text
seq = next(full_text[k : k + 3] for k in range(3, len(full_text) - 3) if full_text.index(full_text[k : k + 3]) > 0)
cut = full_text.index(seq)
stopped = client.messages.create(
    model=model, system=system, messages=question, max_tokens=24, **T0,
    stop_sequences=["never-appears", seq],
)
assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == seq, stopped
assert stopped.content[0].text == full_text[:cut], (stopped.content[0].text, seq)
with client.messages.stream(
    model=model, system=system, messages=question, max_tokens=24, **T0, stop_sequences=[seq]
) as stream:
    final = stream.get_final_message()
assert final.stop_reason == "stop_sequence" and final.stop_sequence == seq, final
assert final.content[0].text == stopped.content[0].text
print("stop ok")

# count_tokens: the rendered prompt, as the request's usage counts it.
counted = client.messages.count_tokens(model=model, system=system, messages=question)
assert counted.input_tokens == prompt_tokens, (counted, prompt_tokens)
print("count ok")

# A tool round trip: the tools, an assistant's tool_use and the user's tool_result are rendered
# through the template (each makes the prompt longer), and the model answers in text.
tools = [{
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
use = {"role": "assistant", "content": [
    {"type": "text", "text": "Let me check."},
    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
]}
result = {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "20 C and sunny"}]},
]}
plain = client.messages.count_tokens(model=model, messages=ask).input_tokens
with_tools = client.messages.count_tokens(model=model, messages=ask, tools=tools).input_tokens
assert with_tools > plain + 20, (plain, with_tools)
with_use = client.messages.count_tokens(model=model, messages=ask + [use], tools=tools).input_tokens
assert with_use > with_tools, (with_tools, with_use)
full = client.messages.count_tokens(model=model, messages=ask + [use, result], tools=tools).input_tokens
assert full > with_use, (with_use, full)
for choice in [{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "get_weather"}, {"type": "none"}]:
    answer = client.messages.create(
        model=model, messages=ask + [use, result], tools=tools, tool_choice=choice,
        max_tokens=6, **T0,
    )
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use"), answer
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == full, answer.usage
with client.messages.stream(
    model=model, messages=ask + [use, result], tools=tools, max_tokens=6, **T0
) as stream:
    final = stream.get_final_message()
assert final.content, final
print("tools ok")

# thinking: Qwen3's template has `enable_thinking`; disabled, it writes an empty think block.
on = client.messages.count_tokens(
    model=model, messages=ask, thinking={"type": "enabled", "budget_tokens": 1024}
).input_tokens
off = client.messages.count_tokens(model=model, messages=ask, thinking={"type": "disabled"}).input_tokens
assert on == plain and off > on, (plain, on, off)
print("thinking ok")

# Keys: x-api-key (above), a bearer token, and a wrong key refused as authentication_error.
bearer = anthropic.Anthropic(base_url=base_url, auth_token=api_key, max_retries=0, timeout=300)
assert bearer.messages.count_tokens(model=model, messages=ask).input_tokens == plain
wrong = anthropic.Anthropic(base_url=base_url, api_key="not-the-key", max_retries=0, timeout=300)
try:
    wrong.messages.create(model=model, messages=ask, max_tokens=2)
    raise AssertionError("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401 and e.body["error"]["type"] == "authentication_error", e.body
print("keys ok")

# Requests the server refuses come back as Anthropic's error objects.
image = [{"role": "user", "content": [
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
]}]
for bad in [
    dict(messages=image, max_tokens=4),
    dict(messages=ask, max_tokens=0),
    dict(messages=ask, max_tokens=4, extra_body={"temperature": 3}),
    dict(messages=[{"role": "system", "content": "x"}], max_tokens=4),
]:
    try:
        client.messages.create(model=model, **bad)
        raise AssertionError(f"accepted: {bad}")
    except anthropic.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
try:
    client.messages.create(model=model, messages=image, max_tokens=4)
except anthropic.BadRequestError as e:
    assert "image" in e.body["error"]["message"], e.body
print("errors ok")
