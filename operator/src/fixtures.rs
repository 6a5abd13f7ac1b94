//! Test fixtures: a small in-memory Kubernetes API server behind kube's tower-test mock
//! service, so `apply` and the Lease witness run against real kube `Client` requests.
//!
//! It keeps objects by URL path and implements what this crate uses, with apiserver semantics:
//! GET (object or list), POST (create; 409 AlreadyExists), PUT (replace; 409 Conflict on a stale
//! `metadata.resourceVersion`), PATCH (server-side apply / merge: the patch's fields replace the
//! stored ones; `/status` patches the status), DELETE (404 when absent). Every request is logged
//! as `"METHOD path"` for scenario assertions. A real kube-apiserver cannot run on the build
//! machines (DESIGN.md §10), so this is the closest stand-in.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tower_test::mock;

use crate::node_api::{NodeStatusReport, PlexReport, ResyncReport};
use sva_node::scsi::alua::AluaState;
use sva_node::witness::PlexState;

/// A node's `/v1/status` for volume `vol`: Active/Optimized at `epoch`, plex `id` on host
/// `w<id>` with portal `10.0.0.<id>:32600` in the given state, no resync running.
pub fn node_report(node: &str, epoch: u64, states: &[(u16, PlexState)]) -> NodeStatusReport {
    NodeStatusReport {
        node: node.into(),
        volume: "vol".into(),
        epoch,
        alua_state: AluaState::ActiveOptimized,
        plexes: states
            .iter()
            .map(|&(id, state)| PlexReport {
                id,
                node: format!("w{id}"),
                portal: format!("10.0.0.{id}:32600"),
                state,
                resync: ResyncReport::default(),
            })
            .collect(),
        resync_rate_limit_bytes_per_sec: None,
        verify: None,
    }
}

/// Shared state of the fake API server.
#[derive(Default)]
pub struct FakeState {
    pub objects: BTreeMap<String, Value>,
    pub log: Vec<String>,
    next_rv: u64,
}

/// Handle to inspect and seed the fake API server.
#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<FakeState>>);

impl FakeApi {
    /// A kube Client whose requests this fake answers (spawns the serving task).
    pub fn client(&self) -> Client {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let state = self.0.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let (code, value) = serve(&state, &parts.method, parts.uri.path(), &bytes);
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
                    .expect("valid response");
                send.send_response(resp);
            }
        });
        Client::new(service, "ns")
    }

    /// Stores an object at `path` (the object URL) with a fresh resourceVersion.
    pub fn seed(&self, path: &str, mut obj: Value) {
        let mut st = self.0.lock().unwrap();
        st.next_rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.next_rv.to_string());
        st.objects.insert(path.to_string(), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    pub fn log(&self) -> Vec<String> {
        self.0.lock().unwrap().log.clone()
    }

    /// Changes a stored object behind the client's back (another writer), bumping its version.
    pub fn touch(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let mut st = self.0.lock().unwrap();
        st.next_rv += 1;
        let rv = st.next_rv.to_string();
        if let Some(o) = st.objects.get_mut(path) {
            f(o);
            o["metadata"]["resourceVersion"] = json!(rv);
        }
    }
}

fn status(code: u16, reason: &str) -> (StatusCode, Value) {
    let value = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code, "metadata": {}});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        value,
    )
}

fn merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                merge(d.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (d, s) => *d = s.clone(),
    }
}

fn serve(
    state: &Mutex<FakeState>,
    method: &http::Method,
    path: &str,
    body: &[u8],
) -> (StatusCode, Value) {
    let mut st = state.lock().unwrap();
    st.log.push(format!("{method} {path}"));
    let input: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    st.next_rv += 1;
    let rv = st.next_rv.to_string();
    let (obj_path, sub) = match path.strip_suffix("/status") {
        Some(p) if st.objects.contains_key(p) => (p.to_string(), true),
        _ => (path.to_string(), false),
    };
    match method.as_str() {
        "GET" => match st.objects.get(&obj_path) {
            Some(o) => (StatusCode::OK, o.clone()),
            None => {
                let prefix = format!("{obj_path}/");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .collect();
                if !is_collection(&obj_path) {
                    status(404, "NotFound")
                } else {
                    (
                        StatusCode::OK,
                        json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}),
                    )
                }
            }
        },
        "POST" => {
            let mut obj = input;
            let name = match obj["metadata"]["name"].as_str() {
                Some(n) => n.to_string(),
                None => {
                    let n = format!(
                        "{}{rv}",
                        obj["metadata"]["generateName"].as_str().unwrap_or("obj-")
                    );
                    obj["metadata"]["name"] = json!(n);
                    n
                }
            };
            let key = format!("{path}/{name}");
            if st.objects.contains_key(&key) {
                return status(409, "AlreadyExists");
            }
            obj["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(key, obj.clone());
            (StatusCode::CREATED, obj)
        }
        "PUT" => {
            let Some(cur) = st.objects.get(&obj_path) else {
                return status(404, "NotFound");
            };
            let want = input["metadata"]["resourceVersion"].as_str();
            if want.is_some() && want != cur["metadata"]["resourceVersion"].as_str() {
                return status(409, "Conflict");
            }
            let mut obj = input;
            obj["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(obj_path, obj.clone());
            (StatusCode::OK, obj)
        }
        "PATCH" => {
            let mut obj = st
                .objects
                .get(&obj_path)
                .cloned()
                .unwrap_or(json!({"metadata": {}}));
            if sub {
                obj["status"] = input["status"].clone();
            } else if let Value::Array(ops) = &input {
                json_patch_finalizers(&mut obj, ops);
            } else {
                merge(&mut obj, &input);
            }
            obj["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(obj_path, obj.clone());
            (StatusCode::OK, obj)
        }
        "DELETE" => match st.objects.remove(&obj_path) {
            Some(o) => (StatusCode::OK, o),
            None => status(404, "NotFound"),
        },
        _ => status(405, "MethodNotAllowed"),
    }
}

/// Whether `path` names a collection (ends in a plural this crate lists).
fn is_collection(path: &str) -> bool {
    const PLURALS: &[&str] = &[
        "pods",
        "persistentvolumeclaims",
        "configmaps",
        "nodes",
        "leases",
        "plexes",
        "mirroredvolumes",
        "events",
        "serviceaccounts",
        "roles",
        "rolebindings",
    ];
    path.rsplit('/')
        .next()
        .is_some_and(|last| PLURALS.contains(&last))
}

/// The JSON-patch operations kube's finalizer helper sends on `/metadata/finalizers`.
fn json_patch_finalizers(obj: &mut Value, ops: &[Value]) {
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        if !path.starts_with("/metadata/finalizers") {
            continue;
        }
        let list = &mut obj["metadata"]["finalizers"];
        match op["op"].as_str() {
            Some("add") if path.ends_with("/-") => match list.as_array_mut() {
                Some(a) => a.push(op["value"].clone()),
                None => *list = json!([op["value"].clone()]),
            },
            Some("add") => *list = op["value"].clone(),
            Some("remove") => {
                let idx = path
                    .rsplit('/')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok());
                if let (Some(a), Some(i)) = (list.as_array_mut(), idx) {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            _ => {}
        }
    }
}
