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

AUTHORIZATION = "Authorization"
RETRY_AFTER = "Retry-After"
