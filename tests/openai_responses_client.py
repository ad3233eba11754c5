"""Drives `flashpack serve`'s Responses API (`/v1/responses`, what Codex CLI speaks) through the
official `openai` Python package (tests/serve_responses.rs runs it against the tiny model
converted with Qwen3's chat template).

Usage: python3 tests/openai_responses_client.py BASE_URL API_KEY MODEL
Prints one "<check> ok" line per check; any failure raises (exit 1).
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)

question = "Tell me about the history of Rome."
instructions = "You answer questions about history."


def create(**kw):
    kw.setdefault("max_output_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.responses.create(model=model, **kw)


# A plain response: OpenAI's object, one message item of output_text, usage that adds up.
r = create(input=question, instructions=instructions, metadata={"run": "test"})
assert r.object == "response" and r.id.startswith("resp_") and r.model == model, r
assert len(r.output) == 1 and r.output[0].type == "message", r.output
item = r.output[0]
assert item.role == "assistant" and item.id.startswith("msg_"), item
assert [p.type for p in item.content] == ["output_text"] and item.content[0].annotations == [], item
assert r.output_text == item.content[0].text and r.output_text, r
u = r.usage
assert u.input_tokens > 0 and 0 < u.output_tokens <= 8, u
assert u.total_tokens == u.input_tokens + u.output_tokens, u
assert u.input_tokens_details.cached_tokens <= u.input_tokens, u
assert u.output_tokens_details.reasoning_tokens == 0, u
# Cut at max_output_tokens: incomplete, and saying why; else completed.
if r.status == "incomplete":
    assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 8, r
    assert item.status == "incomplete", item
else:
    assert r.status == "completed" and r.incomplete_details is None and item.status == "completed", r
# The request's fields come back.
assert r.instructions == instructions and r.metadata == {"run": "test"}, r
assert r.temperature == 0 and r.max_output_tokens == 8 and r.tool_choice == "auto", r
assert r.tools == [] and r.parallel_tool_calls is True and r.previous_response_id is None, r
# The instructions are part of the prompt.
bare = create(input=question)
assert bare.usage.input_tokens < u.input_tokens, (bare.usage, u)
print("response ok")

# Streamed: the events in OpenAI's order, numbered from 0; the deltas make the text, which is
# the greedy text of the same request not streamed.
events = list(create(input=question, instructions=instructions, stream=True))
types = [e.type for e in events]
assert [e.sequence_number for e in events] == list(range(len(events))), types
deltas = [e for e in events if e.type == "response.output_text.delta"]
assert deltas, types
last = "response.incomplete" if r.status == "incomplete" else "response.completed"
expected = (
    ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    + ["response.output_text.delta"] * len(deltas)
    + ["response.output_text.done", "response.content_part.done", "response.output_item.done", last]
)
assert types == expected, types
text = "".join(d.delta for d in deltas)
assert text == r.output_text, (text, r.output_text)
item_id = events[2].item.id
assert all(e.item_id == item_id for e in events if hasattr(e, "item_id")), events
assert events[-4].text == text and events[-3].part.text == text, events[-4:]
final = events[-1].response
assert final.output_text == text and final.id == events[0].response.id and final.status == r.status, final
assert final.usage.output_tokens == u.output_tokens, final.usage
assert events[0].response.status == "in_progress" and events[0].response.output == [], events[0]
# The SDK's own stream helper assembles the same text from the events (its final response is
# only for `response.completed`, which an answer cut at max_output_tokens does not end with).
with client.responses.stream(
    model=model, input=question, instructions=instructions, max_output_tokens=8, temperature=0
) as s:
    helped = list(s)
assert helped[-1].type == last and helped[-1].response.output_text == r.output_text, helped[-1]
snapshots = [e.snapshot for e in helped if e.type == "response.output_text.delta"]
assert snapshots[-1] == r.output_text, (snapshots, r.output_text)
if r.status == "completed":
    assert s.get_final_response().output_text == r.output_text
print("stream ok")

# Function tools reach the template with every tool_choice (the prompt grows by them); a
# function tool choice names one of them.
tools = [{
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]


def input_tokens(**kw):
    return create(max_output_tokens=1, **kw).usage.input_tokens


plain = input_tokens(input=ask)
for choice in ["auto", "required", "none", {"type": "function", "name": "get_weather"}]:
    n = input_tokens(input=ask, tools=tools, tool_choice=choice)
    assert n > plain + 20, (choice, plain, n)
with_tools = create(input=ask, tools=tools, max_output_tokens=1)
assert with_tools.tools[0].name == "get_weather" and with_tools.tools[0].type == "function", with_tools.tools
try:
    create(input=ask, tools=tools, tool_choice={"type": "function", "name": "not_a_tool"})
    raise AssertionError("a tool_choice naming an unknown function was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "tool_choice", e.body
print("tools ok")

# A round trip: the model's function_call and the function's output are rendered (each makes
# the prompt longer), and the model answers.
call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": json.dumps({"city": "Paris"})}
result = {"type": "function_call_output", "call_id": "call_1", "output": "20 C and sunny"}
with_call = input_tokens(input=ask + [call], tools=tools)
full = input_tokens(input=ask + [call, result], tools=tools)
assert plain < with_tools.usage.input_tokens < with_call < full, (plain, with_tools.usage, with_call, full)
answer = create(input=ask + [call, result], tools=tools, max_output_tokens=6)
assert answer.status in ("completed", "incomplete") and answer.output, answer
assert all(o.type in ("message", "function_call") for o in answer.output), answer.output
print("round trip ok")

# previous_response_id: the follow-up renders as the whole conversation, whose KV cache the
# server kept, and gives the tokens that sending the whole conversation gives.
first = create(input=question, instructions=instructions)
history = first.usage.input_tokens + first.usage.output_tokens
second = create(previous_response_id=first.id, input="And Greece?", instructions=instructions)
cached = second.usage.input_tokens_details.cached_tokens
assert cached >= 0.9 * history, (cached, history, second.usage)
assert cached < second.usage.input_tokens, second.usage
assert second.previous_response_id == first.id, second
whole = [{"role": "user", "content": question}] + [o.model_dump(exclude_none=True) for o in first.output]
whole.append({"role": "user", "content": "And Greece?"})
again = create(input=whole, instructions=instructions)
assert again.usage.input_tokens == second.usage.input_tokens, (again.usage, second.usage)
assert again.output_text == second.output_text, (again.output_text, second.output_text)
assert again.usage.output_tokens == second.usage.output_tokens, (again.usage, second.usage)
# A third turn continues the second; a streamed response is stored when its stream ends.
third = create(previous_response_id=second.id, input="And Egypt?", instructions=instructions)
assert third.usage.input_tokens_details.cached_tokens >= 0.9 * (
    second.usage.input_tokens + second.usage.output_tokens), third.usage
streamed = list(create(input=question, stream=True))[-1].response
after = create(previous_response_id=streamed.id, input="And Greece?")
assert after.usage.input_tokens_details.cached_tokens >= 0.9 * (
    streamed.usage.input_tokens + streamed.usage.output_tokens), after.usage
print("previous_response_id ok")

# Unknown and unstored ids: 404 with an error object naming the id.
unstored = create(input=question, store=False)
for rid in ["resp_does_not_exist", unstored.id]:
    try:
        create(previous_response_id=rid, input="And Greece?")
        raise AssertionError(f"previous_response_id {rid} was accepted")
    except openai.NotFoundError as e:
        assert e.body["param"] == "previous_response_id", e.body
        assert e.body["code"] == "previous_response_not_found", e.body
        assert rid in e.body["message"], e.body
print("unknown id ok")

# Malformed requests get OpenAI's error objects, naming the field.
for kw, param, says in [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input", "input_image"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input", "call_id"),
    ({"input": question, "temperature": 3}, "temperature", "temperature"),
    ({"input": question, "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": question, "background": True}, "background", "background"),
]:
    try:
        client.responses.create(model=model, **kw)
        raise AssertionError(f"{kw} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param and says in e.body["message"], (kw, e.body)
        assert e.body["type"] == "invalid_request_error", e.body
try:
    client.responses.create(model="another-model", input=question)
    raise AssertionError("another model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print("errors ok")
