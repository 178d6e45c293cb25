//! What the container meets: the testkit's API server with one enforced namespace, one pod and
//! one ServiceEntry; a kubelet tree with the pod's container cgroup; test hosts in a network
//! namespace; and the host paths the DaemonSet mounts, moved aside where a real agent's are.

use std::{
    cell::Cell,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use enforcer_testkit::{
    apiserver::FakeApiServer,
    cgroups::{cgroup2_mount, in_cgroup, remove_tree},
    python, script, TestNet,
};

/// The ServiceEntry's address, and one no entry allows; both test hosts serve port 80.
pub const ALLOWED: &str = "198.51.100.10";
pub const REFUSED: &str = "198.51.100.11";
/// The test's kubelet tree, under the cgroup2 root.
const KUBELET: &str = "enforcer-image-test-kubelet";
/// The agent's bpffs directory on this host, instead of `/sys/fs/bpf/enforcer`.
const PIN_DIR: &str = "/sys/fs/bpf/enforcer-image-test";
const POD_UID: &str = "1a2b3c4d-2222-4222-8333-444455556666";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {egress-enforcer: enabled}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: enforcer-mesh, namespace: enforcer-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 198.51.100.10}]
"#;

pub struct World {
    work: PathBuf,
    hosts: TestNet,
    _server: FakeApiServer,
    cgroup2: PathBuf,
    container: PathBuf,
    /// The hosts' log lines before this variant.
    seen: Cell<usize>,
}

impl World {
    pub fn new() -> anyhow::Result<Self> {
        let work = crate::sh::root().join("target/image-test");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(work.join("kube"))?;
        let id = std::process::id() % 100_000;
        let mut hosts = TestNet::new(
            &format!("enfimg-{id}"),
            &format!("enfi{id}"),
            &[ALLOWED, REFUSED],
        )?;
        hosts.serve(&[80], &[])?;
        let server = FakeApiServer::start(&["v1"])?;
        server.apply(CLUSTER)?;
        server.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: {POD_UID}, labels: {{app: web}}}}\n\
             spec: {{nodeName: node-a, containers: [{{name: app, image: app:1}}]}}\nstatus: {{phase: Running}}\n"
        ))?;
        server.write_kubeconfig(&work.join("kube/kubeconfig"))?;
        let cgroup2 = cgroup2_mount()?;
        let container = cgroup2.join(KUBELET).join(format!(
            "kubepods/besteffort/pod{POD_UID}/cri-containerd-{}.scope",
            "1".repeat(64)
        ));
        std::fs::create_dir_all(&container).context("creating the pod's cgroup")?;
        Ok(Self {
            work,
            hosts,
            _server: server,
            cgroup2,
            container,
            seen: Cell::new(0),
        })
    }

    /// A fresh start for the next variant: empty emptyDirs, no pins, the hosts' log marked.
    pub fn reset(&self) -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(self.work.join("empty"));
        let _ = std::fs::remove_dir_all(PIN_DIR);
        self.seen.set(self.hosts.received().len());
        Ok(())
    }

    /// The DaemonSet's host path on this host: the cgroup2 mount where it is not
    /// `/sys/fs/cgroup`, and the agent's bpffs directory moved aside.
    pub fn host_path(&self, path: &Path) -> anyhow::Result<PathBuf> {
        Ok(if path == Path::new("/sys/fs/cgroup") {
            self.cgroup2.clone()
        } else if path == Path::new("/sys/fs/bpf/enforcer") {
            std::fs::create_dir_all(PIN_DIR)?;
            PathBuf::from(PIN_DIR)
        } else if path.starts_with("/sys/fs/bpf") {
            anyhow::bail!(
                "the DaemonSet mounts {}: the test reproduces only /sys/fs/bpf/enforcer (the agent's own directory)",
                path.display()
            );
        } else {
            path.to_path_buf()
        })
    }

    pub fn empty_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.join("empty").join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The pod's fields the DaemonSet's environment takes.
    pub fn field(&self, field: &str) -> String {
        match field {
            "spec.nodeName" => "node-a".to_string(),
            "status.hostIP" => "127.0.0.1".to_string(),
            _ => String::new(),
        }
    }

    /// The API server, and this test's kubelet tree.
    pub fn extra_flags(&self) -> Vec<String> {
        vec![
            "-v".into(),
            format!("{}:/run/enforcer-test:ro", self.work.join("kube").display()),
            "-e".into(),
            "KUBECONFIG=/run/enforcer-test/kubeconfig".into(),
        ]
    }

    pub fn extra_args(&self) -> Vec<String> {
        vec![format!("--kubelet-cgroups={KUBELET}")]
    }

    /// Whether the agent wrote its status after an apply (into the emptyDir `run`).
    pub fn applied(&self) -> bool {
        std::fs::read(self.work.join("empty/run/status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|s| s["generation"].as_u64().unwrap_or(0) >= 1)
    }

    /// Whether the agent's programs are pinned in the host's bpffs directory it was given.
    pub fn pinned(&self) -> bool {
        Path::new(PIN_DIR)
            .join("programs/enforcer_connect4")
            .exists()
    }

    /// probe.py from the pod's container cgroup: 0 connected, 1 EPERM, 2 anything else.
    pub fn probe(&self, dst: &str) -> Option<i32> {
        in_cgroup(&self.container, python())
            .arg(script("probe.py"))
            .args(["tcp", dst, "80", "2"])
            .output()
            .ok()?
            .status
            .code()
    }

    /// Whether the test host logged a connection to `dst` since [`World::reset`].
    pub fn reached(&self, dst: &str) -> bool {
        let prefix = format!("tcp {dst}:80 ");
        self.hosts
            .received()
            .iter()
            .skip(self.seen.get())
            .any(|l| l.starts_with(&prefix))
    }

    /// The runtime's default seccomp profile (containers-common's) with `bpf` and
    /// `perf_event_open` allowed to every process, not only to those with SYS_ADMIN.
    pub fn seccomp_profile(&self) -> anyhow::Result<PathBuf> {
        const DEFAULT: &str = "/usr/share/containers/seccomp.json";
        const ALLOWED: [&str; 2] = ["bpf", "perf_event_open"];
        let text =
            std::fs::read_to_string(DEFAULT).with_context(|| format!("reading {DEFAULT}"))?;
        let mut profile: serde_json::Value = serde_json::from_str(&text)?;
        let rules = profile["syscalls"]
            .as_array_mut()
            .context("a profile without syscalls")?;
        for rule in rules.iter_mut() {
            if let Some(names) = rule["names"].as_array_mut() {
                names.retain(|n| !n.as_str().is_some_and(|n| ALLOWED.contains(&n)));
            }
        }
        rules.retain(|r| r["names"].as_array().is_some_and(|n| !n.is_empty()));
        rules.push(serde_json::json!({"names": ALLOWED, "action": "SCMP_ACT_ALLOW"}));
        let path = self.work.join("seccomp-enforcer.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&profile)?)?;
        Ok(path)
    }

    /// The variant's container log, kept under target/image-test/.
    pub fn keep_log(&self, variant: &str, logs: &str) {
        let name: String = variant
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let _ = std::fs::write(self.work.join(format!("{name}.log")), logs);
    }

    /// Removes the pins the variant left (unpinned links detach: enforcement stops).
    pub fn teardown_pins(&self, _spec: &super::Spec) -> anyhow::Result<()> {
        if Path::new(PIN_DIR).exists() {
            std::fs::remove_dir_all(PIN_DIR).with_context(|| format!("removing {PIN_DIR}"))?;
        }
        Ok(())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(PIN_DIR);
        remove_tree(&self.cgroup2.join(KUBELET));
    }
}
