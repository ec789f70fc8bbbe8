"""Stream a Claude answer through memproxy with the Anthropic Python SDK.

    MEMPROXY_KEY=sk-... python examples/anthropic_stream.py [model]

Needs an Anthropic model in config.yaml (claude-sonnet-4 in the bundled one,
called through the Supermemory router) and ANTHROPIC_API_KEY set where LiteLLM
runs. The offline demo model answers too, but LiteLLM's mock answers
/v1/messages without streaming, so no text events arrive from it.
"""

import os
import sys

from anthropic import Anthropic

client = Anthropic(base_url=os.environ.get("MEMPROXY_URL", "http://127.0.0.1:8764"),
                   api_key=os.environ["MEMPROXY_KEY"])
model = sys.argv[1] if len(sys.argv) > 1 else "claude-sonnet-4"

with client.messages.stream(
    model=model,
    max_tokens=300,
    messages=[{"role": "user", "content": "Remind me what I am working on."}],
) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
print()
