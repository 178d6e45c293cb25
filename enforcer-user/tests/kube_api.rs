//! Kubernetes mode's sources against an HTTP server that speaks the list/watch protocol, through
//! kube-rs's real client: resourceVersions, chunked watch events, bookmarks, 410 Gone and the
//! relist after it, and objects in the shape the API server returns them.

use std::time::{Duration, Instant};

use enforcer_testkit::apiserver::FakeApiServer;
use enforcer_user::{
    istio::OutboundMode,
    k8s::{Cluster, Options},
    sources::Sources,
};
use tokio::sync::mpsc;

fn options() -> Options {
    Options {
        node_name: "node-a".into(),
        namespace_selector: "egress-enforcer=enabled".parse().expect("selector"),
        mesh_config_maps: vec![
            ("istio-system".into(), "istio".into()),
            ("enforcer-system".into(), "enforcer-mesh".into()),
        ],
        cluster_domain: "cluster.local".into(),
        socket_lb: false,
    }
}

async fn connect(server: &FakeApiServer) -> anyhow::Result<(Cluster, mpsc::UnboundedReceiver<()>)> {
    let (cluster, rx, _pods) = connect_split(server).await?;
    Ok((cluster, rx))
}

/// The cluster, its policy-change signal and its pod-change signal.
async fn connect_split(
    server: &FakeApiServer,
) -> anyhow::Result<(
    Cluster,
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedReceiver<()>,
)> {
    let config = kube::Config::new(server.url().parse()?);
    let client = kube::Client::try_from(config)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (pods_tx, pods_rx) = mpsc::unbounded_channel();
    let cluster = Cluster::connect_with(client, options(), tx, pods_tx).await?;
    Ok((cluster, rx, pods_rx))
}

/// A pod coming or going on this node changes where policy applies, not the policy: it must
/// not make every node recompile the cluster's policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_events_signal_a_replan_only_and_objects_are_stored_without_managed_fields(
) -> anyhow::Result<()> {
    let server = FakeApiServer::start(&["v1"])?;
    let (cluster, mut policy, mut pods) = connect_split(&server).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    while policy.try_recv().is_ok() {}
    while pods.try_recv().is_ok() {}
    server.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: 11111111-2222-3333-4444-555555555555}\nspec: {nodeName: node-a, containers: [{name: app, image: app:1}]}\n")?;
    tokio::time::timeout(Duration::from_secs(10), pods.recv())
        .await?
        .expect("a pod-change signal");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(policy.try_recv().is_err(), "a pod is not a policy change");
    until(&cluster, "the pod", |c| !c.node_pods().is_empty()).await;
    let stored = cluster.pods();
    assert!(
        stored.iter().all(|p| p.metadata.managed_fields.is_none()),
        "the fake API server sends managedFields; the store drops them"
    );
    Ok(())
}

/// Waits (bounded) until `cond` holds for the cluster's current view.
async fn until(cluster: &Cluster, what: &str, cond: impl Fn(&Cluster) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond(cluster) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hosts(cluster: &Cluster) -> Vec<String> {
    let sources = Sources::from_snapshot(cluster.snapshot());
    let mut hosts: Vec<String> = sources
        .entries
        .iter()
        .flat_map(|se| se.spec.hosts.clone())
        .collect();
    hosts.sort();
    hosts
}

/// A ServiceEntry as `kubectl get -o json` shows it from a real API server (Istio 1.2x).
const SERVICE_ENTRY_AS_SERVED: &str = r#"{
  "apiVersion": "networking.istio.io/v1",
  "kind": "ServiceEntry",
  "metadata": {
    "annotations": {
      "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"networking.istio.io/v1\",\"kind\":\"ServiceEntry\",\"metadata\":{\"annotations\":{},\"name\":\"httpbin-ext\",\"namespace\":\"shop\"},\"spec\":{\"hosts\":[\"httpbin.org\"],\"location\":\"MESH_EXTERNAL\",\"ports\":[{\"name\":\"http\",\"number\":80,\"protocol\":\"HTTP\"}],\"resolution\":\"DNS\"}}\n"
    },
    "creationTimestamp": "2026-11-20T10:11:12Z",
    "generation": 1,
    "managedFields": [
      {
        "apiVersion": "networking.istio.io/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
          "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
          "f:spec": {".": {}, "f:hosts": {}, "f:location": {}, "f:ports": {}, "f:resolution": {}}
        },
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "time": "2026-11-20T10:11:12Z"
      }
    ],
    "name": "httpbin-ext",
    "namespace": "shop",
    "resourceVersion": "1234",
    "uid": "4b1e3c1d-7f0a-4e55-9d8e-0c1b2a3d4e5f"
  },
  "spec": {
    "hosts": ["httpbin.org"],
    "location": "MESH_EXTERNAL",
    "ports": [{"name": "http", "number": 80, "protocol": "HTTP"}],
    "resolution": "DNS"
  },
  "status": {}
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_follow_changes_and_relist_after_410() -> anyhow::Result<()> {
    let server = FakeApiServer::start(&["v1", "v1beta1"])?;
    server.apply_value(serde_json::from_str(SERVICE_ENTRY_AS_SERVED)?)?;
    // More objects than one list page holds (kube asks for 500), so the first list pages.
    let many: String = (0..510)
        .map(|i| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}}}\n---\n"))
        .collect();
    server.apply(&many)?;
    server.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {egress-enforcer: enabled}}")?;

    let (cluster, mut changes) = connect(&server).await?;
    assert_eq!(hosts(&cluster), ["httpbin.org"], "the served shape is read");
    assert_eq!(
        cluster
            .enforced_namespaces()
            .into_iter()
            .collect::<Vec<_>>(),
        ["shop"]
    );
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.starts_with("LIST /api/v1/namespaces"))
            .count()
            >= 2,
        "511 namespaces take two pages: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /apis/networking.istio.io/v1")),
        "the served version is discovered"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("LIST /apis/networking.istio.io/v1/serviceentries")),
        "v1 is preferred over v1beta1: {requests:?}"
    );

    // Watch events: added, modified, deleted.
    server.apply("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: shop}\nspec: {hosts: [api.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}")?;
    until(&cluster, "the added entry", |c| {
        hosts(c).contains(&"api.example.com".to_string())
    })
    .await;
    server.apply("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: shop}\nspec: {hosts: [api2.example.com], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}")?;
    until(&cluster, "the modified entry", |c| {
        hosts(c) == ["api2.example.com", "httpbin.org"]
    })
    .await;
    server.delete("ServiceEntry", "shop", "httpbin-ext")?;
    until(&cluster, "the deletion", |c| {
        hosts(c) == ["api2.example.com"]
    })
    .await;
    assert!(changes.try_recv().is_ok(), "changes are signalled");

    // Idle: bookmarks arrive and the watch carries on from them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.apply("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: late, namespace: shop}\nspec: {hosts: [late.example.com], ports: [{number: 80, name: http}], resolution: DNS}")?;
    until(&cluster, "an entry after bookmarks", |c| {
        hosts(c).len() == 2
    })
    .await;

    // History compacted while the watches are down, and a deletion in the gap: the watch
    // resumes from a resourceVersion the server no longer has, gets 410, and relists, which is
    // the only way the client learns of the deletion.
    server.compact_and_drop_watches();
    server.delete("ServiceEntry", "shop", "api")?;
    until(&cluster, "the deletion seen through a relist", |c| {
        hosts(c) == ["late.example.com"]
    })
    .await;
    let requests = server.requests();
    let gone = requests
        .iter()
        .position(|r| r.starts_with("GONE /apis/networking.istio.io/v1/serviceentries"))
        .expect("a 410 for the Istio watch");
    assert!(
        requests[gone..]
            .iter()
            .any(|r| r.starts_with("LIST /apis/networking.istio.io/v1/serviceentries")),
        "a relist after the 410: {requests:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_config_istio_first_then_our_own_and_services_in_the_registry() -> anyhow::Result<()> {
    let server = FakeApiServer::start(&["v1beta1"])?;
    server.apply(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: enforcer-mesh, namespace: enforcer-system}
data:
  mesh: |
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
  annotations: {networking.istio.io/exportTo: "."}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-abc, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.7]}]
ports: [{name: http, port: 8080}]
"#,
    )?;
    let (cluster, _changes) = connect(&server).await?;
    let sources = Sources::from_snapshot(cluster.snapshot());
    assert_eq!(
        sources.mesh.mode,
        OutboundMode::RegistryOnly,
        "our own ConfigMap"
    );
    let api = sources
        .entries
        .iter()
        .find(|se| se.spec.hosts == ["api.shop.svc.cluster.local"])
        .expect("the Service is in the registry");
    assert_eq!(api.spec.addresses, ["10.96.0.10"]);
    assert_eq!(api.spec.export_to.as_deref(), Some(&[".".to_string()][..]));

    server.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    outboundTrafficPolicy: {mode: ALLOW_ANY}\n")?;
    until(&cluster, "Istio's ConfigMap to win", |c| {
        Sources::from_snapshot(c.snapshot()).mesh.mode == OutboundMode::AllowAny
    })
    .await;
    server.delete("ConfigMap", "istio-system", "istio")?;
    until(&cluster, "the fallback again", |c| {
        Sources::from_snapshot(c.snapshot()).mesh.mode == OutboundMode::RegistryOnly
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_crds_are_named() -> anyhow::Result<()> {
    let server = FakeApiServer::start(&[])?;
    let err = match connect(&server).await {
        Ok(_) => panic!("connected without Istio's CRDs"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("networking.istio.io") && err.contains("deploy/crds"),
        "{err}"
    );
    Ok(())
}
