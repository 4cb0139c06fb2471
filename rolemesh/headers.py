"""HTTP header names of the RoleMesh protocol, in one place."""

REQUEST_ID = "X-Request-Id"

# Dispatcher -> agent: the device (and model, when a role was resolved) it chose.
DEVICE = "X-RoleMesh-Device"
MODEL = "X-RoleMesh-Model"

# Agent -> dispatcher, on every response: the device's state right after the request.
NODE = "X-RoleMesh-Node"
SLOT_STATE = "X-RoleMesh-Slot-State"
LOADED_MODEL = "X-RoleMesh-Loaded-Model"
IN_FLIGHT = "X-RoleMesh-In-Flight"
PENDING = "X-RoleMesh-Pending"

# Dispatcher -> client: where the request went.
ROUTED_TO = "X-RoleMesh-Routed-To"

AUTHORIZATION = "Authorization"
RETRY_AFTER = "Retry-After"
