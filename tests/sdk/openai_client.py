"""Drives the gateway with the official `openai` Python SDK, for every provider.

Usage: openai_client.py BASE_URL TOKEN BROKE_TOKEN BUSY_BASE_URL
(BUSY_BASE_URL: a gateway whose providers answer 429 to everything.)
Checks the answers' shapes and that errors arrive as the SDK's exception classes;
prints, as one JSON line, every metered request (kind, model, x-request-id, the
token counts the client saw) so the caller can check the billing.
"""
import json
import sys

import openai

base, token, broke_token, busy_base = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
chat = client.chat.completions
seen = []


def record(kind, model, raw, usage):
    seen.append(
        {
            "kind": kind,
            "model": model,
            "request_id": raw.headers["x-request-id"],
            "prompt_tokens": usage.prompt_tokens,
            "total_tokens": usage.total_tokens,
        }
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
ANSWER = "tok " * 12

for model in ["gpt-5", "claude-3.5-sonnet", "gemini-2.0-pro"]:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]

    raw = chat.with_raw_response.create(model=model, messages=messages, max_tokens=100)
    c = raw.parse()
    assert c.object == "chat.completion", c
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ANSWER, (model, c)
    assert c.choices[0].finish_reason == "stop", c
    assert c.usage.completion_tokens == 12, c.usage
    record("chat", model, raw, c.usage)

    raw = chat.with_raw_response.create(
        model=model,
        messages=messages,
        max_tokens=100,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in raw.parse():
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == ANSWER, (model, text)
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens == 12, usage
    record("chat", model, raw, usage)

    # Without include_usage the stream carries no usage chunk.
    for chunk in chat.create(model=model, messages=messages, stream=True):
        assert chunk.usage is None, chunk

    ask = messages + [{"role": "user", "content": "Weather in Paris?"}]
    raw = chat.with_raw_response.create(model=model, messages=ask, tools=TOOLS)
    c = raw.parse()
    assert c.choices[0].finish_reason == "tool_calls", (model, c)
    call = c.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "mock"}
    record("function_call", model, raw, c.usage)

    ask.append(c.choices[0].message.model_dump(exclude_none=True))
    ask.append({"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'})
    raw = chat.with_raw_response.create(model=model, messages=ask, tools=TOOLS)
    c = raw.parse()
    assert c.choices[0].finish_reason == "stop", (model, c)
    assert c.choices[0].message.content == ANSWER
    record("chat", model, raw, c.usage)

for model in ["text-embedding-3-small", "gemini-embedding"]:
    # The SDK asks for base64 by default and decodes it.
    raw = client.embeddings.with_raw_response.create(model=model, input=["one", "two"])
    e = raw.parse()
    assert [d.index for d in e.data] == [0, 1], e
    assert len(e.data[0].embedding) == 8 and all(isinstance(x, float) for x in e.data[0].embedding)
    record("embedding", model, raw, e.usage)
    e = client.embeddings.create(model=model, input="one", encoding_format="float")
    assert len(e.data) == 1

raw = client.completions.with_raw_response.create(model="gpt-5", prompt="Say this is a test", max_tokens=50)
c = raw.parse()
assert c.choices[0].text == ANSWER, c
record("completion", "gpt-5", raw, c.usage)


def expect(exc, fn, **check):
    try:
        fn()
    except exc as e:
        for k, v in check.items():
            assert getattr(e, k) == v, (k, getattr(e, k), v)
        return
    raise AssertionError(f"{exc.__name__} expected")


say = [{"role": "user", "content": "hi"}]
expect(openai.NotFoundError, lambda: chat.create(model="no-such-model", messages=say), code="model_not_found")
expect(
    openai.BadRequestError,
    lambda: chat.create(model="claude-3.5-sonnet", messages=say, logit_bias={"1": 1}),
    param="logit_bias",
)
expect(openai.BadRequestError, lambda: chat.create(model="gemini-2.0-pro", messages=say, n=2), param="n")
expect(openai.BadRequestError, lambda: client.embeddings.create(model="claude-3.5-sonnet", input="x"), param="model")
expect(openai.BadRequestError, lambda: client.completions.create(model="gemini-2.0-pro", prompt="x"), param="model")
bad = openai.OpenAI(base_url=base + "/v1", api_key="not-a-token", max_retries=0)
expect(openai.AuthenticationError, lambda: bad.chat.completions.create(model="gpt-5", messages=say))
broke = openai.OpenAI(base_url=base + "/v1", api_key=broke_token, max_retries=0)
for model in ["gpt-5", "claude-3.5-sonnet", "gemini-2.0-pro"]:
    expect(
        openai.RateLimitError,
        lambda: broke.chat.completions.create(model=model, messages=say),
        code="insufficient_quota",
    )

# A provider rate-limiting the gateway is not the caller's 429: 503 with retry-after.
busy = openai.OpenAI(base_url=busy_base + "/v1", api_key=token, max_retries=0)
for model in ["gpt-5", "claude-3.5-sonnet", "gemini-2.0-pro"]:
    expect(
        openai.InternalServerError,
        lambda: busy.chat.completions.create(model=model, messages=say),
        status_code=503,
    )

print(json.dumps(seen))
