//! Kubernetes mode: Istio objects, Services, Namespaces and this node's Pods from the API
//! server, kept in reflector stores. The agent recomputes everything from the stores on every
//! change, so a missed or reordered event can only delay an update.

mod bootstrap;
mod istio_api;
pub mod node;
pub mod pod_links;
pub mod registry;
pub mod selector;
pub mod slice;
pub mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::{
    api::{Api, DynamicObject},
    core::ApiResource,
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher, WatchStreamExt as _,
    },
    Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

pub use selector::LabelSelector;

/// The namespace label that puts a namespace in AUDIT without a Sidecar.
pub const AUDIT_LABEL: (&str, &str) = ("egress-enforcer", "audit");
use slice::EndpointSlice;
pub use workloads::{NodePod, UNENFORCED, UNMAPPED};

use crate::{
    istio::OutboundMode,
    policy::{Desired, Origin, Rule, ScopePolicy, L4},
    sources::{documents, Snapshot},
};

/// Origin of every object read from the API server, in problems and explanations.
pub const ORIGIN: &str = "kubernetes";

#[derive(Clone, Debug)]
pub struct Options {
    /// Pods of this node only (`spec.nodeName`).
    pub node_name: String,
    /// Namespaces whose pods are enforced.
    pub namespace_selector: LabelSelector,
    /// Mesh config ConfigMaps (namespace, name), key `mesh`: the first that exists is used.
    pub mesh_config_maps: Vec<(String, String)>,
    /// Services are registered as `<name>.<namespace>.svc.<domain>`.
    pub cluster_domain: String,
    /// The CNI translates a Service's cluster IP to an endpoint at connect time (Cilium's
    /// kube-proxy replacement / socket LB), so the hooks see endpoint addresses: allow the
    /// controller-managed endpoints of ClusterIP Services as well as their cluster IPs.
    pub socket_lb: bool,
}

/// The API server's view, kept current by watchers.
pub struct Cluster {
    opts: Options,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    istio: Vec<(ApiResource, Store<DynamicObject>)>,
    mesh: Vec<Store<ConfigMap>>,
    tasks: Vec<JoinHandle<()>>,
    /// Where this agent reaches the API server (its client config), for unmapped pods.
    api_endpoints: Vec<SocketAddr>,
}

impl Cluster {
    /// Connects (in-cluster, or `KUBECONFIG` / `~/.kube/config`), checks the Istio CRDs, starts
    /// the watchers, and returns once every store holds a complete first list. `changed` gets
    /// `()` after every change.
    pub async fn connect(
        opts: Options,
        changed: mpsc::UnboundedSender<()>,
        pods_changed: mpsc::UnboundedSender<()>,
    ) -> anyhow::Result<Self> {
        let config = kube::Config::infer()
            .await
            .context("reading the Kubernetes client config (in-cluster config or KUBECONFIG)")?;
        let url = &config.cluster_url;
        let default_port = if url.scheme_str() == Some("http") {
            80
        } else {
            443
        };
        let api_endpoints = bootstrap::endpoints_of(
            url.host().unwrap_or_default(),
            url.port_u16().unwrap_or(default_port),
        );
        let client = Client::try_from(config).context("connecting to the Kubernetes API")?;
        let mut cluster = Self::connect_with(client, opts, changed, pods_changed).await?;
        cluster.api_endpoints = api_endpoints;
        Ok(cluster)
    }

    /// `changed` gets `()` when the policy may have changed; `pods_changed` when only this
    /// node's pods did, which needs a replan, not a recompile.
    pub async fn connect_with(
        client: Client,
        opts: Options,
        changed: mpsc::UnboundedSender<()>,
        pods_changed: mpsc::UnboundedSender<()>,
    ) -> anyhow::Result<Self> {
        let istio_resources = istio_api::resources(&client).await?;
        let mut tasks = Vec::new();
        let mut start = |what: String, task: JoinHandle<()>| {
            log::debug!("watching {what}");
            tasks.push(task);
        };

        let (namespaces, w) = reflector::store();
        start(
            "namespaces".into(),
            watch(
                Api::all(client.clone()),
                watcher::Config::default(),
                w,
                &changed,
                "Namespaces",
            ),
        );
        let (pods, w) = reflector::store();
        let on_node =
            watcher::Config::default().fields(&format!("spec.nodeName={}", opts.node_name));
        start(
            "pods".into(),
            watch(Api::all(client.clone()), on_node, w, &pods_changed, "Pods"),
        );
        let (services, w) = reflector::store();
        start(
            "services".into(),
            watch(
                Api::all(client.clone()),
                watcher::Config::default(),
                w,
                &changed,
                "Services",
            ),
        );
        let (slices, w) = reflector::store();
        start(
            "endpointslices".into(),
            watch(
                Api::all(client.clone()),
                watcher::Config::default(),
                w,
                &changed,
                "EndpointSlices",
            ),
        );
        let mut istio = Vec::new();
        for ar in istio_resources {
            let w = Writer::new(ar.clone());
            let store = w.as_reader();
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let task = watch(
                api,
                watcher::Config::default(),
                w,
                &changed,
                "Istio objects",
            );
            start(ar.plural.clone(), task);
            istio.push((ar, store));
        }
        let mut mesh = Vec::new();
        for (ns, name) in &opts.mesh_config_maps {
            let (store, w) = reflector::store();
            let one = watcher::Config::default().fields(&format!("metadata.name={name}"));
            start(
                format!("configmap {ns}/{name}"),
                watch(
                    Api::namespaced(client.clone(), ns),
                    one,
                    w,
                    &changed,
                    "mesh ConfigMaps",
                ),
            );
            mesh.push(store);
        }

        let cluster = Self {
            opts,
            namespaces,
            pods,
            services,
            slices,
            istio,
            mesh,
            tasks,
            api_endpoints: Vec::new(),
        };
        cluster.wait_until_listed().await?;
        Ok(cluster)
    }

    async fn wait_until_listed(&self) -> anyhow::Result<()> {
        let all = async {
            self.namespaces.wait_until_ready().await?;
            self.pods.wait_until_ready().await?;
            self.services.wait_until_ready().await?;
            self.slices.wait_until_ready().await?;
            for (_, store) in &self.istio {
                store.wait_until_ready().await?;
            }
            for store in &self.mesh {
                store.wait_until_ready().await?;
            }
            Ok::<(), reflector::store::WriterDropped>(())
        };
        tokio::pin!(all);
        loop {
            tokio::select! {
                res = &mut all => return res.context("a watcher stopped before its first list"),
                () = tokio::time::sleep(Duration::from_secs(10)) => {
                    log::warn!("still waiting for the first list of every watched kind (see the warnings above); nothing is changed until then");
                }
            }
        }
    }

    /// The Istio objects, the registry of Services and the mesh config, as one snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for (ar, store) in &self.istio {
            let mut objects = store.state();
            objects.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name)
                    .cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            for obj in objects {
                let mut value = serde_json::to_value(&*obj).unwrap_or_default();
                // List items may come without their type; the store knows it.
                value["apiVersion"] = ar.api_version.clone().into();
                value["kind"] = ar.kind.clone().into();
                add_object(&mut snap, ORIGIN, value);
            }
        }
        registry::add_to(
            &mut snap,
            &self.services.state(),
            &self.slices.state(),
            &self.opts.cluster_domain,
            self.opts.socket_lb,
        );
        // Istio's own mesh config wins; enforcer's is the fallback.
        if let Some(cm) = self.mesh.iter().find_map(|s| s.state().into_iter().next()) {
            let mut value = serde_json::to_value(&*cm).unwrap_or_default();
            value["kind"] = "ConfigMap".into();
            add_object(&mut snap, ORIGIN, value);
        }
        snap
    }

    /// Namespaces whose pods are enforced: by the selector, or in AUDIT by their label.
    pub fn enforced_namespaces(&self) -> BTreeSet<String> {
        self.namespaces_where(|labels| {
            self.opts.namespace_selector.matches(labels)
                || labels.get(AUDIT_LABEL.0).map(String::as_str) == Some(AUDIT_LABEL.1)
        })
    }

    /// Namespaces labelled `egress-enforcer=audit`: enforced in AUDIT, a dry run.
    pub fn audit_namespaces(&self) -> BTreeSet<String> {
        self.namespaces_where(|labels| {
            labels.get(AUDIT_LABEL.0).map(String::as_str) == Some(AUDIT_LABEL.1)
        })
    }

    fn namespaces_where(
        &self,
        keep: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
    ) -> BTreeSet<String> {
        self.namespaces
            .state()
            .iter()
            .filter(|ns| keep(&ns.metadata.labels.clone().unwrap_or_default()))
            .filter_map(|ns| ns.metadata.name.clone())
            .collect()
    }

    /// What a pod needs before its policy is known: see [`bootstrap::rules`].
    pub fn bootstrap_rules(&self) -> Vec<Rule> {
        bootstrap::rules(
            &self.services.state(),
            &self.slices.state(),
            &self.api_endpoints,
        )
    }

    /// This node's Pod objects as stored.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        self.pods.state()
    }

    /// This node's pods that are not finished (a finished pod's cgroup is gone or going).
    pub fn node_pods(&self) -> Vec<NodePod> {
        self.pods
            .state()
            .iter()
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .filter_map(|p| NodePod::from_pod(p))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn add_object(snap: &mut Snapshot, origin: &str, value: serde_json::Value) {
    let label = format!(
        "{} {}/{}",
        value["kind"].as_str().unwrap_or_default(),
        value["metadata"]["namespace"].as_str().unwrap_or_default(),
        value["metadata"]["name"].as_str().unwrap_or_default()
    );
    match serde_yaml::to_value(&value) {
        Ok(yaml) => documents::parse_object(origin, &label, yaml, snap),
        Err(err) => log::error!("{origin}: {label}: cannot be read: {err}"),
    }
}

/// Keeps `writer`'s store equal to what the API server lists and watches, restarting with
/// backoff after errors (a 410 Gone relists). Sends `()` after every change.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    changed: &mpsc::UnboundedSender<()>,
    what: &'static str,
) -> JoinHandle<()>
where
    K: Resource + Slim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let changed = changed.clone();
    tokio::spawn(async move {
        // managedFields are most of an object's size and of no use here.
        let stream = watcher(api, config)
            .default_backoff()
            .modify(|obj| {
                obj.meta_mut().managed_fields = None;
                obj.slim();
            })
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    let _ = changed.send(());
                }
                Ok(_) => {}
                Err(err) => log::warn!("watching {what}: {err}; retrying"),
            }
        }
    })
}

/// Adds the scopes Kubernetes mode maps cgroups to besides namespaces: pods not enforced
/// (allowed), and pod cgroups not mapped yet (`unmapped`), which may reach only what any pod
/// needs to start: `bootstrap` (see [`Cluster::bootstrap_rules`]) and the DNS servers every
/// scope may reach.
pub fn add_node_scopes(
    desired: &mut Desired,
    unmapped: OutboundMode,
    bootstrap: &[Rule],
    dns_servers: &[SocketAddr],
) {
    let origin = Arc::new(Origin::builtin("what a pod needs to start"));
    let dns = dns_servers
        .iter()
        .flat_map(|&s| [L4::Udp, L4::Tcp].map(|l4| Rule::host(l4, s.port(), s.ip())));
    let rules = bootstrap
        .iter()
        .copied()
        .chain(dns)
        .map(|r| (r, vec![Arc::clone(&origin)]))
        .collect();
    for (name, mode, rules) in [
        (UNENFORCED, OutboundMode::AllowAny, BTreeMap::new()),
        (UNMAPPED, unmapped, rules),
    ] {
        desired.scopes.insert(
            name.to_string(),
            ScopePolicy {
                namespace: name.to_string(),
                mode,
                rules,
                ..ScopePolicy::default()
            },
        );
    }
}

/// What a store keeps of an object: only what the agent reads. Every node holds every Service
/// and EndpointSlice of the cluster, so the rest would cost memory on every node.
trait Slim {
    fn slim(&mut self) {}
}

impl Slim for Namespace {}
impl Slim for Pod {}
impl Slim for ConfigMap {}
impl Slim for DynamicObject {}

impl Slim for Service {
    fn slim(&mut self) {
        self.status = None;
        self.metadata.labels = None;
        if let Some(annotations) = &mut self.metadata.annotations {
            annotations.retain(|k, _| k == registry::EXPORT_TO);
        }
        if let Some(spec) = &mut self.spec {
            spec.selector = None;
            spec.session_affinity_config = None;
            spec.load_balancer_source_ranges = None;
            spec.external_ips = None;
        }
    }
}

/// Holds only addresses and ports already (see `slice`).
impl Slim for EndpointSlice {}
