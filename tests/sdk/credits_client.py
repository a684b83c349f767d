"""Reads what a request cost with the official `openai` Python SDK.

Usage: credits_client.py BASE_URL TOKEN MODEL
A JSON answer's `x-credits-charged` / `x-credits-remaining` headers (raw response), and
a stream with `stream_options.include_usage` whose usage chunk carries
`x_credits_charged` / `x_credits_remaining` as extra fields: the SDK must parse every
chunk (its models keep unknown fields). Prints, as one JSON line, per request: the
x-request-id, the figures and the cached tokens the SDK saw.
"""
import json
import sys

import openai

base, token, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
messages = [{"role": "user", "content": "Hello"}]
seen = []

raw = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, max_tokens=300
)
c = raw.parse()
assert c.object == "chat.completion", c
seen.append(
    {
        "request_id": raw.headers["x-request-id"],
        "charged": int(raw.headers["x-credits-charged"]),
        "remaining": int(raw.headers["x-credits-remaining"]),
        "cached_tokens": c.usage.prompt_tokens_details.cached_tokens,
    }
)

raw = client.chat.completions.with_raw_response.create(
    model=model,
    messages=messages,
    max_tokens=300,
    stream=True,
    stream_options={"include_usage": True},
)
request_id = raw.headers["x-request-id"]
text = ""
usage_chunks = []
for chunk in raw.parse():
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
    if chunk.usage is not None:
        usage_chunks.append(chunk)
assert text == "tok " * 200, text
assert len(usage_chunks) == 1, usage_chunks
u = usage_chunks[0]
extra = u.model_extra or {}
# Extra fields are attributes of the parsed chunk as well.
assert getattr(u, "x_credits_charged") == extra["x_credits_charged"], u
seen.append(
    {
        "request_id": request_id,
        "charged": extra["x_credits_charged"],
        "remaining": extra["x_credits_remaining"],
        "cached_tokens": u.usage.prompt_tokens_details.cached_tokens,
    }
)
print(json.dumps(seen))
