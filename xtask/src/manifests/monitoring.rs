//! `deploy/monitoring/` for prometheus-operator: its kustomization renders (the patch applies),
//! its ServiceMonitor and PrometheusRule validate against prometheus-operator's CRD models
//! (npm's @kubernetes-models/prometheus-operator, locked in `monitoring-models/`, installed
//! under target/ on first use), and the PrometheusRule carries exactly the groups of `enforcer.rules.yml`.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};
use serde::Deserialize as _;

use crate::sh;

/// `kubectl kustomize dir`, as the documents it renders.
pub fn render(dir: &Path) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).map_err(Into::into))
        .collect()
}

pub fn check(root: &Path, rendered: &[serde_yaml::Value]) -> anyhow::Result<()> {
    same_rules(root, rendered)?;
    metrics_on_node(rendered)?;
    let models = root.join("target/monitoring-models");
    install_models(&models)?;
    let script = models.join("validate_monitoring.mjs");
    std::fs::write(&script, include_str!("validate_monitoring.mjs"))?;
    let mut node = Command::new("node")
        .arg(&script)
        .current_dir(&models)
        .stdin(Stdio::piped())
        .spawn()
        .context("running node")?;
    {
        let mut stdin = node.stdin.take().context("node's stdin")?;
        for doc in rendered {
            writeln!(stdin, "{}", serde_json::to_string(doc)?)?;
        }
    }
    if !node.wait()?.success() {
        bail!("deploy/monitoring/: invalid prometheus-operator objects (above)");
    }
    Ok(())
}

/// `npm ci` from the committed lock file (exact versions and hashes, no install scripts),
/// again whenever the lock file changes.
fn install_models(models: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(models)?;
    let lock = include_str!("monitoring-models/package-lock.json");
    let installed = models.join("node_modules/.package-lock.json");
    let current = std::fs::read_to_string(models.join("package-lock.json")).ok();
    if installed.exists() && current.as_deref() == Some(lock) {
        return Ok(());
    }
    std::fs::write(
        models.join("package.json"),
        include_str!("monitoring-models/package.json"),
    )?;
    std::fs::write(models.join("package-lock.json"), lock)?;
    sh::run(
        Command::new("npm")
            .args([
                "ci",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ])
            .current_dir(models),
    )
    .context("installing prometheus-operator's models from npm (nodejs)")
}

/// The PrometheusRule is the rule file, wrapped: alerts are tested once (promtool), on the file.
fn same_rules(root: &Path, rendered: &[serde_yaml::Value]) -> anyhow::Result<()> {
    let file = root.join("deploy/monitoring/enforcer.rules.yml");
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&file)?)?;
    let rule = rendered
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .context("deploy/monitoring/ renders no PrometheusRule")?;
    if rule["spec"]["groups"] != rules["groups"] {
        bail!(
            "deploy/monitoring/prometheusrule.yaml: spec.groups differ from enforcer.rules.yml's groups; copy them over"
        );
    }
    Ok(())
}

/// The overlay moves /metrics to the node's address, where the Service's endpoint is, and the
/// probes with it.
fn metrics_on_node(rendered: &[serde_yaml::Value]) -> anyhow::Result<()> {
    let ds = rendered
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("deploy/monitoring/ renders no DaemonSet")?;
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    let env = agent["env"].as_sequence().context("the agent has no env")?;
    let position = |name: &str| env.iter().position(|e| e["name"] == name);
    let host = position("ENFORCER_METRICS_HOST").context("no ENFORCER_METRICS_HOST")?;
    let addr = position("ENFORCER_METRICS_ADDR").context("no ENFORCER_METRICS_ADDR")?;
    let from_node = env[host]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP";
    let probes_follow = ["livenessProbe", "readinessProbe"]
        .iter()
        .all(|p| agent[*p]["httpGet"]["host"].is_null());
    // $(VAR) expands only variables defined earlier in the list.
    if !from_node || host > addr || !probes_follow {
        bail!("deploy/monitoring/: /metrics is not moved to the node's address (ENFORCER_METRICS_HOST from status.hostIP, before ENFORCER_METRICS_ADDR; probes without a host)");
    }
    Ok(())
}
