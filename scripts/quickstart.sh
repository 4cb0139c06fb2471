#!/usr/bin/env bash
# Quick start: a local dispatcher plus a node agent on this machine's CPU, serving two tiny
# demo models that RoleMesh generates itself (no download), answering OpenAI requests.
#   ./scripts/quickstart.sh          # set up, start both, ask them, stop
#   ./scripts/quickstart.sh --keep   # ... and leave them running until Ctrl-C
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup-env.sh"
KEEP="${1:-}"
DEMO="$ROOT/.rolemesh-demo"
mkdir -p "$DEMO/models" "$DEMO/state"
DISPATCHER_PORT="${ROLEMESH_DEMO_DISPATCHER_PORT:-8080}"
AGENT_PORT="${ROLEMESH_DEMO_AGENT_PORT:-8081}"
export ROLEMESH_CLUSTER_TOKEN="${ROLEMESH_CLUSTER_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(16))')}"

echo "== generating the demo models (tiny llama-architecture GGUFs)"
python -m rolemesh.tiny_gguf "$DEMO/models/letters.gguf" --charset letters
python -m rolemesh.tiny_gguf "$DEMO/models/digits.gguf" --charset digits

cat > "$DEMO/dispatcher.yaml" <<YAML
listen_port: $DISPATCHER_PORT
heartbeat_interval_s: 2
log_format: console
YAML
cat > "$DEMO/agent.yaml" <<YAML
node_id: local
listen_port: $AGENT_PORT
dispatcher_base_url: http://127.0.0.1:$DISPATCHER_PORT
heartbeat_interval_s: 2
backend: cpu
state_dir: $DEMO/state
log_format: console
models:
  - model_id: demo-letters
    path: $DEMO/models/letters.gguf
    roles: [chat, planner]
    ctx_size: 512
    threads: 1
  - model_id: demo-digits
    path: $DEMO/models/digits.gguf
    roles: [coder]
    ctx_size: 512
    threads: 1
YAML

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
echo "== starting rolemesh-dispatcher on :$DISPATCHER_PORT and rolemesh-node-agent on :$AGENT_PORT"
rolemesh-dispatcher --config "$DEMO/dispatcher.yaml" 2>"$DEMO/dispatcher.log" & pids+=($!)
rolemesh-node-agent --config "$DEMO/agent.yaml" 2>"$DEMO/agent.log" & pids+=($!)

python - "$DISPATCHER_PORT" <<'PY'
import sys, time, urllib.request, json, openai
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + 60
while True:
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
            if "chat" in {m["id"] for m in json.load(r)["data"]}:
                break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("the node agent did not register with the dispatcher in 60 s; see .rolemesh-demo/*.log")
    time.sleep(0.2)
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
print("== POST /v1/chat/completions  model=chat  (the letters model)")
r = client.chat.completions.create(model="chat", max_tokens=24,
                                   messages=[{"role": "user", "content": "Say something."}])
print("   answer:", repr(r.choices[0].message.content))
print("== the same, streamed, model=coder  (the digits model: the device switches models)")
print("   answer: ", end="")
for chunk in client.chat.completions.create(model="coder", max_tokens=24, stream=True,
                                            messages=[{"role": "user", "content": "Count."}]):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
with urllib.request.urlopen(base + "/v1/nodes", timeout=2) as r:
    node = json.load(r)["data"][0]
dev = node["devices"][0]["status"]
print(f"== /v1/nodes: node {node['node_id']} is {node['state']}; {dev['device_id']} has "
      f"{dev['loaded_model']} loaded ({dev['slot_state']})")
PY
if [ "$KEEP" = "--keep" ]; then
  echo "== running: OpenAI API at http://127.0.0.1:$DISPATCHER_PORT/v1 (Ctrl-C to stop)"
  wait
fi
