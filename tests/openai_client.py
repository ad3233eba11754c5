"""Drives `flashpack serve` with the official `openai` Python package (tests/serve.rs runs it).

Usage: python3 tests/openai_client.py BASE_URL API_KEY
Prints one "<check> ok" line per check; any failure raises (exit 1).
"""

import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)

models = client.models.list()
model = models.data[0].id
assert [m.id for m in models.data] == [model], models
print("models ok")

messages = [
    {"role": "system", "content": "You answer questions about history."},
    {"role": "user", "content": "Tell me about the history of Rome."},
]

# Chat, not streamed: OpenAI's object, greedy, a length finish at max_tokens.
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
assert chat.object == "chat.completion", chat
choice = chat.choices[0]
assert choice.message.role == "assistant", choice
assert isinstance(choice.message.content, str) and choice.message.content, choice
assert choice.finish_reason == "length", choice
assert chat.usage.completion_tokens == 8, chat.usage
print("chat ok")

# Streamed: the deltas join to the same greedy text; one id; the last choice chunk finishes.
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, stream=True
)
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == choice.message.content, (text, choice.message.content)
assert len({c.id for c in chunks}) == 1
assert chunks[-1].choices[0].finish_reason == "length", chunks[-1]
assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
print("stream ok")

# Stop sequences: the text ends before the stop string, with finish_reason "stop". The stop is
# taken from the greedy text itself, so it is sure to appear.
full = client.completions.create(model=model, prompt="The history of", max_tokens=24, temperature=0)
words = full.choices[0].text.split(" ")
stop = " " + words[3] if len(words) > 3 and words[3] else words[1]
cut = full.choices[0].text.index(stop)
stopped = client.completions.create(
    model=model, prompt="The history of", max_tokens=24, temperature=0, stop=[stop, "never-appears"]
)
assert stopped.choices[0].text == full.choices[0].text[:cut], (stopped.choices[0].text, stop)
assert stopped.choices[0].finish_reason == "stop", stopped.choices[0]
streamed = client.completions.create(
    model=model, prompt="The history of", max_tokens=24, temperature=0, stop=stop, stream=True
)
parts = list(streamed)
assert "".join(p.choices[0].text for p in parts) == full.choices[0].text[:cut]
assert parts[-1].choices[0].finish_reason == "stop"
print("stop ok")

# Logprobs: one entry per token, each with at most top_logprobs alternatives, most likely first;
# greedy picks the most likely token.
lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
)
content = lp.choices[0].logprobs.content
assert len(content) == 5, content
for entry in content:
    assert entry.logprob <= 0.0
    assert len(entry.top_logprobs) == 3
    tops = [t.logprob for t in entry.top_logprobs]
    assert tops == sorted(tops, reverse=True), tops
    assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5, entry
    assert entry.top_logprobs[0].token == entry.token
assert "".join(e.token for e in content) == lp.choices[0].message.content
legacy = client.completions.create(model=model, prompt="The history of", max_tokens=3, temperature=0, logprobs=2)
assert len(legacy.choices[0].logprobs.tokens) == 3
assert all(len(t) == 2 for t in legacy.choices[0].logprobs.top_logprobs)
print("logprobs ok")

# Usage in a stream (stream_options.include_usage): a last chunk with no choices.
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=4,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
u = chunks[-1].usage
assert u.completion_tokens == 4 and u.total_tokens == u.prompt_tokens + 4, u
assert all(c.usage is None for c in chunks[:-1])
print("usage ok")

# Prefix reuse: an agent-style second turn (the first turn, its answer, a new question)
# computes only what is new, and says so in usage.prompt_tokens_details.cached_tokens.
first = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
turn2 = messages + [
    {"role": "assistant", "content": first.choices[0].message.content},
    {"role": "user", "content": "And what came after?"},
]
second = client.chat.completions.create(model=model, messages=turn2, max_tokens=4, temperature=0)
cached = second.usage.prompt_tokens_details.cached_tokens
assert cached >= first.usage.prompt_tokens, (cached, first.usage)
assert cached < second.usage.prompt_tokens
print("cached ok", cached, "of", second.usage.prompt_tokens)

completion = client.completions.create(model=model, prompt="The history of", max_tokens=6, temperature=0)
assert completion.object == "text_completion"
assert completion.usage.completion_tokens == 6
print("completions ok")

# Errors come back as the client's exception types, with OpenAI's error body.
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=1, n=2)
    raise AssertionError("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("errors ok")
