"""Chat through memproxy with the OpenAI Python SDK, and see which memory space was used.

    MEMPROXY_KEY=sk-... .venv/bin/python examples/openai_sdk.py [model]

Environment: MEMPROXY_KEY, LiteLLM's master key (printed by `memproxy start`);
MEMPROXY_URL, memproxy's address (default http://127.0.0.1:8764). The default
model, memproxy-demo, answers offline. Needs the openai package
(pip install -e '.[examples]').
"""

import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("MEMPROXY_URL", "http://127.0.0.1:8764") + "/v1",
                api_key=os.environ["MEMPROXY_KEY"])
model = sys.argv[1] if len(sys.argv) > 1 else "memproxy-demo"

raw = client.chat.completions.with_raw_response.create(
    model=model,
    messages=[{"role": "user", "content": "What did we talk about last time?"}],
    # A client that can set headers may choose its memory space itself:
    # extra_headers={"x-memory-user-id": "alice"},
)
print("memory user:", raw.headers.get("x-memproxy-user-id"),
      "decided by", raw.headers.get("x-memproxy-detector"))
print(raw.parse().choices[0].message.content)

print("streamed:", end=" ", flush=True)
for chunk in client.chat.completions.create(
    model=model, stream=True, messages=[{"role": "user", "content": "Say hello."}]
):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
