#!/usr/bin/env bash
# Quick start: `rolemesh up` (a dispatcher plus a node agent on this machine's CPU, serving two
# tiny demo models that RoleMesh generates itself, no download), asked with the openai SDK.
#   ./scripts/quickstart.sh          # set up, start both, ask them, stop
#   ./scripts/quickstart.sh --keep   # ... and leave them running until Ctrl-C
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup-env.sh"
KEEP="${1:-}"
DEMO="$ROOT/.rolemesh-demo"
DISPATCHER_PORT="${ROLEMESH_DEMO_DISPATCHER_PORT:-8080}"
AGENT_PORT="${ROLEMESH_DEMO_AGENT_PORT:-8081}"
mkdir -p "$DEMO"

echo "== rolemesh up (dispatcher :$DISPATCHER_PORT, node agent :$AGENT_PORT; logs in $DEMO/up)"
rolemesh up --port "$DISPATCHER_PORT" --agent-port "$AGENT_PORT" --state-dir "$DEMO/up" \
  > "$DEMO/up.out" 2>&1 &
UP=$!
cleanup() { kill -INT "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for _ in $(seq 600); do
  grep -q "Ctrl-C stops both" "$DEMO/up.out" 2>/dev/null && break
  kill -0 "$UP" 2>/dev/null || { cat "$DEMO/up.out"; exit 1; }
  sleep 0.2
done
grep -q "Ctrl-C stops both" "$DEMO/up.out" || { cat "$DEMO/up.out"; exit 1; }
sed -n '/OpenAI API/,/logs/p' "$DEMO/up.out"

python - "$DISPATCHER_PORT" <<'PY'
import json, sys, urllib.request, openai
base = f"http://127.0.0.1:{sys.argv[1]}"
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
print("== POST /v1/chat/completions  model=chat  (the letters model)")
r = client.chat.completions.create(model="chat", max_tokens=24,
                                   messages=[{"role": "user", "content": "Say something."}])
print("   answer:", repr(r.choices[0].message.content))
print("== the same, streamed, model=coder  (the digits model: it loads beside the letters model)")
print("   answer: ", end="")
for chunk in client.chat.completions.create(model="coder", max_tokens=24, stream=True,
                                            messages=[{"role": "user", "content": "Count."}]):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
with urllib.request.urlopen(base + "/v1/nodes", timeout=2) as resp:
    node = json.load(resp)["data"][0]
status = node["devices"][0]["status"]
held = [i["model_id"] + f" ({i['state']})" for i in status.get("instances", [])] or \
    [f"{status.get('loaded_model')} ({status.get('slot_state')})"]
print(f"== /v1/nodes: node {node['node_id']} is {node['state']}; {status['device_id']} holds "
      f"{', '.join(held)}")
print(f"== the dashboard: {base}/")
PY
if [ "$KEEP" = "--keep" ]; then
  echo "== running: OpenAI API at http://127.0.0.1:$DISPATCHER_PORT/v1 (Ctrl-C to stop)"
  wait "$UP"
fi
