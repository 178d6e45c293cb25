//! The agent container of `deploy/agent/daemonset.yaml`, read as podman must reproduce it:
//! arguments, environment, security context, host network, mounts and memory limit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde_yaml::Value;

/// Where a mount comes from on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    HostPath(PathBuf),
    EmptyDir,
}

#[derive(Clone, Debug)]
pub struct Mount {
    pub name: String,
    pub source: Source,
    pub path: PathBuf,
    pub read_only: bool,
    /// `HostToContainer` and the like, as a podman bind propagation.
    pub propagation: Option<String>,
}

/// An environment variable: a value (with `$(VAR)` references), or a field of the pod.
#[derive(Clone, Debug)]
pub enum Env {
    Value(String),
    Field(String),
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub args: Vec<String>,
    pub env: Vec<(String, Env)>,
    pub caps_add: Vec<String>,
    pub drop_all: bool,
    pub seccomp_unconfined: bool,
    pub apparmor_unconfined: bool,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    pub privileged: bool,
    pub host_network: bool,
    pub memory: Option<String>,
    pub mounts: Vec<Mount>,
}

impl Spec {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let ds: Value = serde_yaml::from_str(&text)?;
        let pod = &ds["spec"]["template"]["spec"];
        let agent = pod["containers"]
            .as_sequence()
            .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
            .context("no container named agent")?;
        let sc = &agent["securityContext"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
        let mut mounts = Vec::new();
        for m in agent["volumeMounts"].as_sequence().into_iter().flatten() {
            let name = m["name"].as_str().context("a volumeMount without name")?;
            let volume = volumes
                .iter()
                .find(|v| v["name"] == name)
                .with_context(|| format!("no volume {name}"))?;
            let source = if let Some(host) = volume["hostPath"]["path"].as_str() {
                Source::HostPath(PathBuf::from(host))
            } else if volume.get("emptyDir").is_some() {
                Source::EmptyDir
            } else {
                bail!("volume {name}: only hostPath and emptyDir are reproduced");
            };
            mounts.push(Mount {
                name: name.to_string(),
                source,
                path: PathBuf::from(m["mountPath"].as_str().context("no mountPath")?),
                read_only: m["readOnly"].as_bool().unwrap_or(false),
                propagation: m["mountPropagation"].as_str().map(str::to_string),
            });
        }
        let mut env = Vec::new();
        for e in agent["env"].as_sequence().into_iter().flatten() {
            let name = e["name"]
                .as_str()
                .context("an env without name")?
                .to_string();
            let value = match (
                e["value"].as_str(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => Env::Value(v.to_string()),
                (None, Some(field)) => Env::Field(field.to_string()),
                _ => bail!("env {name}: only values and fieldRefs are reproduced"),
            };
            env.push((name, value));
        }
        Ok(Self {
            args: strings(&agent["args"]),
            env,
            caps_add: strings(&sc["capabilities"]["add"]),
            drop_all: strings(&sc["capabilities"]["drop"])
                .iter()
                .any(|c| c == "ALL"),
            seccomp_unconfined: sc["seccompProfile"]["type"] == "Unconfined",
            apparmor_unconfined: sc["appArmorProfile"]["type"] == "Unconfined",
            read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            no_new_privileges: sc["allowPrivilegeEscalation"] == Value::Bool(false),
            privileged: sc["privileged"].as_bool().unwrap_or(false),
            host_network: pod["hostNetwork"].as_bool().unwrap_or(false),
            memory: agent["resources"]["limits"]["memory"]
                .as_str()
                .map(str::to_string),
            mounts,
        })
    }

    /// The environment as the kubelet makes it: fields of the pod filled in, and `$(VAR)`
    /// expanded from variables defined before it.
    pub fn environment(&self, field: impl Fn(&str) -> String) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (name, value) in &self.env {
            let value = match value {
                Env::Field(f) => field(f),
                Env::Value(v) => out
                    .iter()
                    .fold(v.clone(), |v, (n, val)| v.replace(&format!("$({n})"), val)),
            };
            out.push((name.clone(), value));
        }
        out
    }

    /// The memory limit as podman takes it: Kubernetes' Mi and Gi are its m and g.
    pub fn podman_memory(&self) -> Option<String> {
        self.memory
            .as_deref()
            .map(|m| m.replace("Mi", "m").replace("Gi", "g"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemonset_is_read_whole() {
        let spec = Spec::read(&crate::sh::root().join("deploy/agent/daemonset.yaml")).unwrap();
        assert!(spec.args.iter().any(|a| a == "--kubernetes"));
        assert!(spec.drop_all && !spec.privileged && spec.host_network);
        assert!(spec.caps_add.iter().any(|c| c == "BPF"));
        assert!(spec
            .mounts
            .iter()
            .any(|m| m.path == Path::new("/run/enforcer")));
        let env = spec.environment(|f| format!("<{f}>"));
        let addr = env
            .iter()
            .find(|(n, _)| n == "ENFORCER_METRICS_ADDR")
            .unwrap();
        assert_eq!(
            addr.1, "127.0.0.1:9978",
            "$(VAR) expanded from the one before"
        );
        assert!(env
            .iter()
            .any(|(n, v)| n == "NODE_NAME" && v == "<spec.nodeName>"));
    }
}
