"""HTTP header names of the RoleMesh protocol, in one place."""

REQUEST_ID = "X-Request-Id"

# Dispatcher -> agent: the device (and model, when a role was resolved) it chose.
DEVICE = "X-RoleMesh-Device"
MODEL = "X-RoleMesh-Model"

# Agent -> dispatcher, on every response: the device's state right after the request.
NODE = "X-RoleMesh-Node"
# The device's instances: "model=state" pairs, comma-separated ("chat=ready,think=starting").
RESIDENTS = "X-RoleMesh-Residents"
IN_FLIGHT = "X-RoleMesh-In-Flight"
PENDING = "X-RoleMesh-Pending"

# Dispatcher -> client: where the request went.
ROUTED_TO = "X-RoleMesh-Routed-To"

# Client -> dispatcher: routing hints (docs/routing.md); the answer echoes what was used.
TASK_TYPE = "X-RoleMesh-Task-Type"  # the task type; on the answer: the one used
TASK_TYPE_SOURCE = "X-RoleMesh-Task-Type-Source"  # header, metadata, keyword, classifier...
ROLE = "X-RoleMesh-Role"  # a per-request override of the routing table
LATENCY = "X-RoleMesh-Latency"  # "realtime"
# Dispatcher -> client: which routing rule fired, what it chose, any fallback taken.
RULE = "X-RoleMesh-Rule"
TARGET = "X-RoleMesh-Target"
FALLBACK = "X-RoleMesh-Fallback"  # "FROM->TO (why)"

AUTHORIZATION = "Authorization"
RETRY_AFTER = "Retry-After"
