//! A Kubernetes API server for tests: the list/watch protocol over HTTP/1.1 on loopback, as
//! kube-rs's client speaks it. Lists carry a resourceVersion and page with `limit`/`continue`;
//! watches stream chunked JSON events from a resourceVersion (each event split across two
//! chunks), send bookmarks, and answer a resourceVersion older than the kept history with a 410
//! Gone ERROR event, which makes a client relist. Objects get uid, resourceVersion,
//! creationTimestamp, generation and managedFields as the real server adds them.

mod http;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Context as _};
use serde_json::{json, Value};

/// A kind the server serves.
#[derive(Clone, Debug)]
struct Kind {
    group: String,
    version: String,
    plural: String,
    kind: String,
    namespaced: bool,
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

struct Event {
    rv: u64,
    kind: usize,
    kind_name: &'static str,
    object: Value,
}

struct State {
    rv: u64,
    uids: u64,
    kinds: Vec<Kind>,
    /// (kind index, namespace, name) -> object.
    objects: BTreeMap<(usize, String, String), Value>,
    history: Vec<Event>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    oldest: u64,
    /// Bumped to end every open watch.
    epoch: u64,
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    bookmark_every: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Serves the core kinds enforcer watches, and the Istio kinds under `istio_versions`
    /// (none: Istio's CRDs are not installed).
    pub fn start(istio_versions: &[&str]) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", istio_versions)
    }

    /// As [`FakeApiServer::start`], listening on `bind` (a test host's address, where loopback
    /// would be too kind: the enforcer always allows loopback).
    pub fn start_on(bind: &str, istio_versions: &[&str]) -> anyhow::Result<Self> {
        let core = |plural: &str, kind: &str, namespaced| Kind {
            group: String::new(),
            version: "v1".into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
        };
        let mut kinds = vec![
            core("namespaces", "Namespace", false),
            core("pods", "Pod", true),
            core("services", "Service", true),
            core("configmaps", "ConfigMap", true),
            Kind {
                group: "discovery.k8s.io".into(),
                version: "v1".into(),
                plural: "endpointslices".into(),
                kind: "EndpointSlice".into(),
                namespaced: true,
            },
        ];
        for version in istio_versions {
            for (plural, kind) in [
                ("serviceentries", "ServiceEntry"),
                ("workloadentries", "WorkloadEntry"),
                ("sidecars", "Sidecar"),
                ("gateways", "Gateway"),
                ("virtualservices", "VirtualService"),
                ("destinationrules", "DestinationRule"),
            ] {
                kinds.push(Kind {
                    group: "networking.istio.io".into(),
                    version: version.to_string(),
                    plural: plural.into(),
                    kind: kind.into(),
                    namespaced: true,
                });
            }
        }
        let listener = TcpListener::bind(bind)
            .with_context(|| format!("binding the fake API server on {bind}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                uids: 0,
                kinds,
                objects: BTreeMap::new(),
                history: Vec::new(),
                oldest: 0,
                epoch: 0,
                requests: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            bookmark_every: Duration::from_millis(500),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || http::accept_loop(listener, s));
        Ok(Self {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server, for KUBECONFIG.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces every object in `yaml` (documents separated by `---`), as
    /// `kubectl apply` would. Returns the stored objects.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(doc).context("parsing YAML")?;
            if value.is_null() {
                continue;
            }
            out.push(self.apply_value(value)?);
        }
        Ok(out)
    }

    pub fn apply_value(&self, mut obj: Value) -> anyhow::Result<Value> {
        let mut st = self.shared.lock();
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind_name = obj["kind"].as_str().unwrap_or_default().to_string();
        let kind = st
            .kinds
            .iter()
            .position(|k| k.api_version() == api_version && k.kind == kind_name)
            .ok_or_else(|| anyhow!("the server does not serve {api_version} {kind_name}"))?;
        let namespaced = st.kinds[kind].namespaced;
        let name = obj["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("{kind_name} without metadata.name"))?
            .to_string();
        let ns = if namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        st.rv += 1;
        let rv = st.rv;
        let key = (kind, ns.clone(), name);
        let previous = st.objects.get(&key).cloned();
        let meta = obj["metadata"]
            .as_object_mut()
            .ok_or_else(|| anyhow!("no metadata"))?;
        if namespaced {
            meta.insert("namespace".into(), json!(ns));
        }
        let (uid, created, generation) = match &previous {
            Some(p) => (
                p["metadata"]["uid"].clone(),
                p["metadata"]["creationTimestamp"].clone(),
                p["metadata"]["generation"].as_u64().unwrap_or(1) + 1,
            ),
            None => {
                st.uids += 1;
                (
                    json!(format!("0e0f{:04x}-5a1d-4c3b-9e8f-{:012x}", st.uids, rv)),
                    json!(timestamp(rv)),
                    1,
                )
            }
        };
        meta.entry("uid").or_insert(uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), json!(generation));
        let fields: serde_json::Map<String, Value> = obj
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"))
            .map(|(k, v)| (format!("f:{k}"), field_set(v)))
            .collect();
        obj["metadata"]["managedFields"] = json!([{
            "apiVersion": api_version,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "time": timestamp(rv),
        }]);
        let kind_event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, obj.clone());
        st.history.push(Event {
            rv,
            kind,
            kind_name: kind_event,
            object: obj.clone(),
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(obj)
    }

    /// Deletes an object; `namespace` is empty for cluster-scoped kinds.
    pub fn delete(&self, kind_name: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
        let mut st = self.shared.lock();
        let kind = st
            .kinds
            .iter()
            .position(|k| k.kind == kind_name)
            .ok_or_else(|| anyhow!("unknown kind {kind_name}"))?;
        let mut obj = st
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
            .ok_or_else(|| anyhow!("no {kind_name} {namespace}/{name}"))?;
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(Event {
            rv,
            kind,
            kind_name: "DELETED",
            object: obj,
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Forgets the event history (as etcd compaction does) and ends every open watch: clients
    /// resume from a resourceVersion the server no longer has, get 410 Gone, and relist.
    pub fn compact_and_drop_watches(&self) {
        let mut st = self.shared.lock();
        st.oldest = st.rv + 1;
        st.history.clear();
        st.epoch += 1;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// The requests served so far, as "LIST <path>", "WATCH <path> rv=<n>", "GONE <path>", ...
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// The shape of FieldsV1: every key of a map, recursively, as `f:<key>`.
fn field_set(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (format!("f:{k}"), field_set(v)))
                .collect(),
        ),
        _ => json!({}),
    }
}

/// An RFC 3339 time that grows with the resourceVersion (Sidecar precedence reads it).
fn timestamp(rv: u64) -> String {
    format!(
        "2026-11-{:02}T{:02}:{:02}:{:02}Z",
        1 + (rv / 86_400) % 28,
        (rv / 3600) % 24,
        (rv / 60) % 60,
        rv % 60
    )
}
