//! The published OpenAPI 3.0 document of the REST API, served at `/openapi.json`. [`ROUTES`] is the
//! one list of operations; a test calls each of them on a running server.

use serde_json::{json, Map, Value};

/// (method, path, summary, who may call, request body schema or "").
pub const ROUTES: &[(&str, &str, &str, &str, &str)] = &[
    ("post", "/v1/tokens", "Create an API token (the secret is shown once)", "admin", "NewToken"),
    (
        "post",
        "/v1/registration-keys",
        "Create a one-time, expiring registration key for a component role",
        "admin",
        "NewKey",
    ),
    (
        "post",
        "/v1/register",
        "Trade a registration key and a CSR for a certificate naming the key's role",
        "registration key",
        "Registration",
    ),
    (
        "post",
        "/v1/register/ca",
        "The deployment CA and a proof that this server holds the registration key with this id",
        "registration key",
        "CaRequest",
    ),
    ("get", "/v1/crl", "The deployment CA's certificate revocation list (PEM)", "anyone", ""),
    ("get", "/v1/components", "Registered agents, process servers and master targets", "reader", ""),
    ("post", "/v1/components/{name}/revoke", "Revoke a component's certificate", "admin", ""),
    (
        "post",
        "/v1/nbd-clients",
        "Issue a certificate in the NBD-client role for a CSR (to open failover disks over nbds://)",
        "admin",
        "NewNbdClient",
    ),
    (
        "post",
        "/v1/heartbeat",
        "A component reports that it is alive, its address, disks and load",
        "component",
        "Heartbeat",
    ),
    ("get", "/v1/machines", "Machines whose agents reported their disks", "reader", ""),
    ("get", "/v1/policies", "Replication policies", "reader", ""),
    ("post", "/v1/policies", "Create a replication policy", "operator", "Policy"),
    ("get", "/v1/policies/{id}", "One policy", "reader", ""),
    ("put", "/v1/policies/{id}", "Replace a policy", "operator", "Policy"),
    ("delete", "/v1/policies/{id}", "Delete a policy no item uses", "operator", ""),
    ("get", "/v1/items", "Protected items with state, placement and RPO", "reader", ""),
    ("post", "/v1/items", "Enable protection of a machine under a policy (a job)", "operator", "Enable"),
    ("get", "/v1/items/{id}", "One protected item", "reader", ""),
    ("delete", "/v1/items/{id}", "Disable protection of an item (a job)", "operator", ""),
    (
        "post",
        "/v1/items/{id}/resync",
        "Resynchronize now: compare checksums of disks and replicas, ship what differs (a job); with \
         ?full=true copy the whole disk again into a new replica (a lost replica, a broken chain)",
        "operator",
        "",
    ),
    (
        "post",
        "/v1/items/{id}/move",
        "Move an item to another process server (the named one, or the least busy); a job that ends once \
         the replica caught up through it",
        "operator",
        "MoveItem",
    ),
    (
        "post",
        "/v1/process-servers/{name}/drain",
        "Stop giving a process server new items and move its items to the others (before removing it)",
        "operator",
        "",
    ),
    ("post", "/v1/process-servers/{name}/resume", "End a drain: the process server takes items again", "operator", ""),
    (
        "post",
        "/v1/process-servers/balance",
        "Move items from the busiest process servers to the least busy until their counts differ by at most one",
        "operator",
        "",
    ),
    (
        "post",
        "/v1/items/{id}/rotate-key",
        "Give the item's data key a new epoch now (replication goes on; keys also rotate by age and seal count)",
        "operator",
        "",
    ),
    ("get", "/v1/items/{id}/points", "Recovery points of an item's disks (from its master target)", "reader", ""),
    (
        "post",
        "/v1/items/{id}/test-failover",
        "Bring the item's disks up, writable, at a recovery point while replication goes on (a job)",
        "operator",
        "TestFailover",
    ),
    ("post", "/v1/items/{id}/test-failover/cleanup", "Discard the test failover's disks (a job)", "operator", ""),
    (
        "post",
        "/v1/items/{id}/export",
        "Write one disk at a recovery point to a raw image (a job)",
        "operator",
        "Export",
    ),
    (
        "post",
        "/v1/items/{id}/failover",
        "Fail over: planned (stop the source, drain, final point: no data loss) or unplanned at a point (a job)",
        "operator",
        "Failover",
    ),
    (
        "post",
        "/v1/items/{id}/failover/point",
        "Before commit: bring the failed-over disks up at another point (their writes are discarded; a job)",
        "operator",
        "PointChoice",
    ),
    ("post", "/v1/items/{id}/commit", "Make the failover final: the disks become plain files (a job)", "operator", ""),
    (
        "post",
        "/v1/items/{id}/reprotect",
        "Replicate back from the failed-over disks into the other site's disks, changed blocks only (a job)",
        "operator",
        "Reprotect",
    ),
    (
        "post",
        "/v1/items/{id}/failback",
        "Planned failover back to the primary site, commit there, reprotect forward (a job)",
        "operator",
        "",
    ),
    ("get", "/v1/plans", "Recovery plans", "reader", ""),
    (
        "post",
        "/v1/plans",
        "Create a recovery plan: ordered groups of items with pre and post actions",
        "operator",
        "Plan",
    ),
    ("get", "/v1/plans/{id}", "One recovery plan (id or name)", "reader", ""),
    ("delete", "/v1/plans/{id}", "Delete a recovery plan", "operator", ""),
    (
        "post",
        "/v1/plans/{id}/failover",
        "Test, planned or unplanned failover of a whole plan, group by group (a job)",
        "operator",
        "PlanRun",
    ),
    ("post", "/v1/plans/{id}/resume", "Continue a plan waiting at a manual action", "operator", ""),
    (
        "post",
        "/v1/plans/{id}/consistency-point",
        "Mark every machine of the plan at one consistent moment now",
        "operator",
        "",
    ),
    ("get", "/v1/network-mappings", "Network mappings applied to failover machine descriptions", "reader", ""),
    ("post", "/v1/network-mappings", "Map a source network to a target network", "operator", "NetworkMapping"),
    ("delete", "/v1/network-mappings/{id}", "Delete a network mapping", "operator", ""),
    ("get", "/v1/assignments", "What the calling component should carry: items, peers, keys", "component", ""),
    (
        "get",
        "/v1/jobs",
        "Jobs, filtered by state, kind and target; the newest `limit` (at most 1000) with an id below `before`",
        "reader",
        "",
    ),
    ("get", "/v1/jobs/{id}", "One job with its steps and progress", "reader", ""),
    ("get", "/v1/events", "The event log: the newest `limit` (at most 1000) with an id below `before`", "reader", ""),
    ("get", "/v1/whoami", "The calling token's name and role", "reader", ""),
    (
        "get",
        "/v1/overview",
        "Items by state, the worst RPOs, alerts firing, running jobs, components' health and load, and the \
         last hour of RPO and churn",
        "reader",
        "",
    ),
    ("get", "/v1/items/{id}/history", "An item's RPO over the last hour", "reader", ""),
    ("get", "/portal/", "The web portal (a page and its script; it signs in with an API token)", "anyone", ""),
];

fn schemas() -> Value {
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "NewToken": {"type": "object", "required": ["name", "role"], "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "role": {"type": "string", "enum": ["reader", "operator", "admin"]}}},
        "NewNbdClient": {"type": "object", "required": ["name", "csr_pem"], "additionalProperties": false, "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "csr_pem": {"type": "string"}}},
        "NewKey": {"type": "object", "required": ["role"], "additionalProperties": false, "properties": {
            "role": {"type": "string", "enum": ["agent", "process-server", "master-target"]},
            "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 2592000}}},
        "Registration": {"type": "object", "required": ["key", "name", "csr_pem"], "additionalProperties": false, "properties": {
            "key": {"type": "string"}, "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "csr_pem": {"type": "string"}, "address": {"type": "string"},
            "role": {"type": "string", "enum": ["agent", "process-server", "master-target"]},
            "names": {"type": "array", "items": {"type": "string"}}}},
        "MoveItem": {"type": "object", "additionalProperties": false, "properties": {
            "process_server": {"type": "string", "description": "the target; default: the least busy other one"}}},
        "CaRequest": {"type": "object", "required": ["key_id"], "additionalProperties": false, "properties": {
            "key_id": {"type": "string", "pattern": "^[0-9a-f]{12}$"}}},
        "Heartbeat": {"type": "object", "additionalProperties": false, "properties": {
            "address": {"type": "string"},
            "disks": {"type": "array", "items": {"type": "object", "required": ["id", "name", "size"], "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"}, "size": {"type": "integer"}}}},
            "load": {"type": "object", "properties": {"cache_bytes": {"type": "integer"},
                "churn_bytes_per_sec": {"type": "integer"}, "free_bytes": {"type": "integer"}}}}},
        "TestFailover": {"type": "object", "additionalProperties": false, "properties": {
            "point": {"description": "\"latest\", \"latest-app-consistent\", \"latest-bookmark\", {\"time\": RFC 3339}, {\"time-us\": n}, {\"tag\": name} or {\"seq\": n}", "default": "latest"}}},
        "Export": {"type": "object", "required": ["disk", "path"], "additionalProperties": false, "properties": {
            "disk": {"type": "integer"}, "path": {"type": "string"}, "point": {"description": "as in TestFailover; latest when left out"},
            "format": {"type": "string", "enum": ["raw", "qcow2"], "default": "raw"}}},
        "Failover": {"type": "object", "additionalProperties": false, "properties": {
            "planned": {"type": "boolean", "default": false},
            "point": {"description": "unplanned only; as in TestFailover", "default": "latest"}}},
        "PointChoice": {"type": "object", "required": ["point"], "additionalProperties": false, "properties": {
            "point": {"description": "as in TestFailover"}}},
        "Reprotect": {"type": "object", "additionalProperties": false, "properties": {
            "machine": {"type": "string", "description": "the agent fronting the failed-over disks"},
            "master_target": {"type": "string"}, "process_server": {"type": "string"}}},
        "Plan": {"type": "object", "required": ["name", "groups"], "additionalProperties": false, "properties": {
            "id": {"type": "string", "readOnly": true}, "name": {"type": "string"},
            "consistency_interval_secs": {"type": "integer", "minimum": 0, "default": 300},
            "groups": {"type": "array", "items": {"type": "object", "required": ["items"], "additionalProperties": false, "properties": {
                "items": {"type": "array", "items": {"type": "integer"}},
                "pre": {"type": "array", "items": {"$ref": "#/components/schemas/PlanAction"}},
                "post": {"type": "array", "items": {"$ref": "#/components/schemas/PlanAction"}}}}}}},
        "PlanAction": {"oneOf": [
            {"type": "object", "required": ["script"], "properties": {"script": {"type": "object", "required": ["command"], "properties": {
                "command": {"type": "string"}, "timeout_secs": {"type": "integer", "minimum": 1, "default": 300}}}}},
            {"type": "object", "required": ["manual"], "properties": {"manual": {"type": "object", "required": ["instruction"], "properties": {
                "instruction": {"type": "string"}}}}}]},
        "PlanRun": {"type": "object", "required": ["kind"], "additionalProperties": false, "properties": {
            "kind": {"type": "string", "enum": ["test", "planned", "unplanned"]},
            "point": {"description": "unplanned only; default: the plan's latest consistency point"}}},
        "NetworkMapping": {"type": "object", "required": ["name", "source", "target"], "additionalProperties": false, "properties": {
            "id": {"type": "string", "readOnly": true}, "name": {"type": "string"},
            "source": {"type": "string", "description": "CIDR"}, "target": {"type": "string", "description": "CIDR"},
            "target_network": {"type": "string"}, "gateway": {"type": "string"},
            "rules": {"type": "array", "items": {"type": "object", "required": ["source", "target"], "properties": {
                "source": {"type": "string"}, "target": {"type": "string"}}}}}},
        "Enable": {"type": "object", "required": ["machine", "policy"], "additionalProperties": false, "properties": {
            "machine": {"type": "string"}, "policy": {"type": "string", "description": "policy id or name"}}},
        "Policy": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "id": {"type": "string", "readOnly": true}, "name": {"type": "string"},
            "rpo_threshold_secs": {"type": "integer", "minimum": 1, "default": 300},
            "retention_hours": {"type": "integer", "minimum": 1, "maximum": 8760, "default": 24},
            "crash_consistent_interval_secs": {"type": "integer", "minimum": 1, "default": 300},
            "app_consistent_interval_secs": {"type": "integer", "minimum": 1, "default": 3600},
            "journal_limit_percent": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
            "compression_level": {"type": "integer", "minimum": 1, "maximum": 19, "default": 1},
            "bandwidth_limit_mbps": {"type": "integer", "minimum": 0, "default": 0},
            "resync_window": {"type": "string", "description": "HH:MM-HH:MM UTC; empty: at once", "default": ""}}}
    })
}

pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, who, body) in ROUTES {
        let mut op = json!({
            "summary": summary,
            "description": format!("Who may call: {who}."),
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "Malformed request", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "401": {"description": "No or unknown token"},
                "403": {"description": "The token's role may not do this"},
                "404": {"description": "Not found"},
                "409": {"description": "Conflict"}
            }
        });
        if matches!(*who, "anyone" | "registration key") {
            op["security"] = json!([]);
        }
        if !body.is_empty() {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body}")}}}});
        }
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Site recovery configuration server", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{"bearer": []}]
    })
}
