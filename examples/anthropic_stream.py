"""Stream a Claude answer through memproxy with the Anthropic Python SDK.

    MEMPROXY_KEY=sk-... .venv/bin/python examples/anthropic_stream.py [model]

Environment: MEMPROXY_KEY, LiteLLM's master key (printed by `memproxy start`);
MEMPROXY_URL, memproxy's address (default http://127.0.0.1:8764).

The default model, memproxy-demo-claude, answers offline (from the demo provider
`memproxy start` runs), streamed like a real one. For Claude itself pass
claude-sonnet-4 and set ANTHROPIC_API_KEY where LiteLLM runs.
"""

import os
import sys

from anthropic import Anthropic

client = Anthropic(base_url=os.environ.get("MEMPROXY_URL", "http://127.0.0.1:8764"),
                   api_key=os.environ["MEMPROXY_KEY"])
model = sys.argv[1] if len(sys.argv) > 1 else "memproxy-demo-claude"

with client.messages.stream(
    model=model,
    max_tokens=300,
    messages=[{"role": "user", "content": "Remind me what I am working on."}],
) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
print()
