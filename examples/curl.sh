#!/usr/bin/env sh
# Talk to memproxy with curl. MEMPROXY_KEY is LiteLLM's master key (the
# `memproxy start` banner prints it).
set -eu
URL=${MEMPROXY_URL:-http://127.0.0.1:8764}
: "${MEMPROXY_KEY:?set MEMPROXY_KEY to the key from the memproxy start banner}"

echo "== which memory space would curl land in?"
curl -s "$URL/memory-routing/info"; echo

echo "== a chat completion (look for x-memproxy-user-id)"
curl -si "$URL/v1/chat/completions" \
  -H "Authorization: Bearer $MEMPROXY_KEY" -H 'Content-Type: application/json' \
  -d '{"model": "memproxy-demo", "messages": [{"role": "user", "content": "hi"}]}'
echo

echo "== the same, streamed, in the memory space of alice"
curl -sN "$URL/v1/chat/completions" \
  -H "Authorization: Bearer $MEMPROXY_KEY" -H 'Content-Type: application/json' \
  -H 'x-memory-user-id: alice' \
  -d '{"model": "memproxy-demo", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
