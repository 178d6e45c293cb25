//! One node of a fake cluster, as the Kubernetes-mode tests start it: the testkit's API server
//! with the test's objects and a REGISTRY_ONLY mesh, dnsmasq, a kubelet tree, and an agent for
//! node-a.

use std::path::PathBuf;

use enforcer_testkit::apiserver::FakeApiServer;

use crate::{
    harness::{Agent, Dns, World},
    kubernetes::{pod_yaml, uid, KubeletTree, MESH_REGISTRY_ONLY},
};

pub(crate) struct FakeNode {
    // Dropped in this order: the agent before what it reads.
    pub(crate) agent: Agent,
    pub(crate) server: FakeApiServer,
    pub(crate) tree: KubeletTree,
    _dns: Dns,
}

impl FakeNode {
    /// `objects` (YAML) applied before the agent starts.
    pub(crate) fn start(world: &World, objects: &str) -> Self {
        let dns = Dns::new(world, 60, &[]);
        let server = FakeApiServer::start(&["v1"]).expect("fake API server");
        server.apply(objects).expect("applying the cluster");
        server.apply(MESH_REGISTRY_ONLY).expect("the mesh config");
        let kubeconfig = world.dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let tree = KubeletTree::new(world);
        let dns_addr = dns.addr();
        let args = [
            "--node-name",
            "node-a",
            "--kubelet-cgroups",
            &tree.relative,
            "--dns-server",
            &dns_addr,
        ];
        let agent = Agent::start_kubernetes(world, &kubeconfig, &args);
        Self {
            agent,
            server,
            tree,
            _dns: dns,
        }
    }

    /// A running pod of node-a: its object, with `labels` (`k: v, ...`).
    pub(crate) fn pod_object(&self, ns: &str, name: &str, n: u32, labels: &str) -> String {
        let uid = uid(n);
        self.server
            .apply(&pod_yaml(name, ns, &uid, labels))
            .expect("pod");
        uid
    }

    /// The pod's object and its container's cgroup (the `digit`th container id).
    pub(crate) fn pod(&self, ns: &str, name: &str, n: u32, labels: &str, digit: char) -> PathBuf {
        let uid = self.pod_object(ns, name, n, labels);
        self.tree.container(&uid, digit)
    }
}
