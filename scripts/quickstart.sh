#!/usr/bin/env bash
# The README's quick start, as one script: serve a model with rotated INT4 KV pages, wait for it,
# query it with curl and with the openai client, stop it.  MODEL: a local model directory.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local model directory}

python3 -m sglang_sawint4.launch_server --model-path "$MODEL" --kv-quant int4-bdr --port 30000 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf localhost:30000/health > /dev/null; do sleep 5; done

curl -s localhost:30000/v1/chat/completions -H "Content-Type: application/json" -d '{
  "model": "default", "temperature": 0, "max_tokens": 64,
  "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}]}'
echo

python3 - <<'PY'
from openai import OpenAI

client = OpenAI(base_url="http://localhost:30000/v1", api_key="none")
reply = client.chat.completions.create(model="default", temperature=0, max_tokens=32,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
print(reply.choices[0].message.content)
PY
