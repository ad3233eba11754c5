"""Drives `flashpack serve`'s chat endpoint with tools through the official `openai` Python
package (tests/serve_agents.rs runs it against the tiny model converted with Qwen3's template).

Usage: python3 tests/openai_tools_client.py BASE_URL API_KEY MODEL
Prints one "<check> ok" line per check; any failure raises (exit 1).
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)

tools = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]


def prompt_tokens(**kw):
    r = client.chat.completions.create(model=model, max_tokens=1, temperature=0, **kw)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls"), r
    return r.usage.prompt_tokens


# The tools are rendered through the template with every tool_choice (the prompt grows by
# them); a named function and "required" are accepted.
plain = prompt_tokens(messages=ask)
for choice in ["auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}]:
    n = prompt_tokens(messages=ask, tools=tools, tool_choice=choice)
    assert n > plain + 20, (choice, plain, n)
try:
    client.chat.completions.create(
        model=model, messages=ask, tools=tools, max_tokens=1,
        tool_choice={"type": "function", "function": {"name": "not_a_tool"}},
    )
    raise AssertionError("a tool_choice naming an unknown function was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "tool_choice", e.body
print("tool_choice ok")

# A round trip: the assistant's tool_calls and the tool's answer are rendered (each makes the
# prompt longer), and the model answers.
call = {"role": "assistant", "content": None, "tool_calls": [{
    "id": "call_1", "type": "function",
    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
}]}
result = {"role": "tool", "tool_call_id": "call_1", "content": "20 C and sunny"}
with_tools = prompt_tokens(messages=ask, tools=tools)
with_call = prompt_tokens(messages=ask + [call], tools=tools)
full = prompt_tokens(messages=ask + [call, result], tools=tools)
assert plain < with_tools < with_call < full, (plain, with_tools, with_call, full)
answer = client.chat.completions.create(
    model=model, messages=ask + [call, result], tools=tools, max_tokens=6, temperature=0
)
assert answer.choices[0].message.role == "assistant", answer
print("round trip ok")

# Streamed with tools: the same greedy text as not streamed, one id, one finish.
stream = client.chat.completions.create(
    model=model, messages=ask + [call, result], tools=tools, max_tokens=6, temperature=0, stream=True
)
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == (answer.choices[0].message.content or ""), (text, answer.choices[0].message.content)
assert len({c.id for c in chunks}) == 1
assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason, chunks[-1]
print("stream ok")
