//! `deploy/` checked offline: every file a kustomization names exists, no manifest is left out
//! of `kubectl apply -k deploy/`, and every object validates (strict: no unknown fields) against
//! the Kubernetes schemas of the oldest and newest versions supported, with kubernetes-validate
//! from PyPI (Debian's kubectl is too old to trust for this).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::sh;

const VALIDATOR: &str = "kubernetes-validate==1.37.0";
const VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

mod monitoring;

/// What users apply: `kubectl apply -k deploy/`, or with prometheus-operator
/// `deploy/crds/` and `deploy/monitoring/` (which includes `deploy/agent/`).
const KUSTOMIZATIONS: [&str; 2] = ["deploy", "deploy/monitoring"];

pub fn check(root: &Path) -> anyhow::Result<()> {
    let deploy = root.join("deploy");
    let mut reached = Reached::default();
    for dir in KUSTOMIZATIONS {
        collect(&root.join(dir), &mut reached)?;
    }
    let mut all = BTreeSet::new();
    manifests_in(&deploy, &mut all)?;
    let orphans: Vec<String> = all
        .iter()
        .filter(|p| !reached.resources.contains(*p) && !reached.patches.contains(*p))
        .map(|p| p.display().to_string())
        .collect();
    if !orphans.is_empty() {
        bail!(
            "not in any kustomization under deploy/: {}",
            orphans.join(", ")
        );
    }

    // A virtual environment of its own: Debian's Python refuses installs outside one.
    let venv = root.join("target/manifest-venv");
    let python = venv.join("bin/python3");
    if !venv.join("bin/kubernetes-validate").exists() {
        sh::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating a Python venv (python3-venv)")?;
        sh::run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg(VALIDATOR),
        )
        .context("installing kubernetes-validate from PyPI")?;
    }
    // Each file, and what each kustomization renders (patches applied).
    let mut files: Vec<PathBuf> = reached.resources.iter().cloned().collect();
    let mut monitoring = Vec::new();
    for dir in KUSTOMIZATIONS {
        let docs = monitoring::render(&root.join(dir))?;
        let out = root.join(format!("target/rendered-{}.yaml", dir.replace('/', "-")));
        let text: Vec<String> = docs
            .iter()
            .map(serde_yaml::to_string)
            .collect::<Result<_, _>>()?;
        std::fs::write(&out, text.join("---\n"))?;
        files.push(out);
        if dir == "deploy/monitoring" {
            monitoring = docs;
        }
    }
    for version in VERSIONS {
        sh::run(
            Command::new(&python)
                .args([
                    "-m",
                    "kubernetes_validate",
                    "--strict",
                    "--quiet",
                    "--no-warn",
                    "-k",
                    version,
                ])
                .args(&files),
        )
        .with_context(|| format!("deploy/ against Kubernetes {version}"))?;
    }
    monitoring::check(root, &monitoring)?;
    eprintln!(
        "deploy/: {} manifests and {} kustomizations valid against Kubernetes {}, the monitoring objects against prometheus-operator's",
        reached.resources.len(),
        KUSTOMIZATIONS.len(),
        VERSIONS.join(" and ")
    );
    Ok(())
}

/// Files the kustomizations name: resources, and patches (partial objects, checked rendered).
#[derive(Default)]
struct Reached {
    resources: BTreeSet<PathBuf>,
    patches: BTreeSet<PathBuf>,
}

/// The manifests `dir/kustomization.yaml` reaches, through directories it names.
fn collect(dir: &Path, out: &mut Reached) -> anyhow::Result<()> {
    let file = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let resources = doc
        .get("resources")
        .and_then(|r| r.as_sequence())
        .with_context(|| format!("{}: no resources", file.display()))?;
    for entry in resources {
        let name = entry.as_str().context("a resource that is not a string")?;
        // `../agent` from deploy/monitoring/ is deploy/agent/: one file, one path.
        let path = dir
            .join(name)
            .canonicalize()
            .unwrap_or_else(|_| dir.join(name));
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.is_file() {
            out.resources.insert(path);
        } else {
            bail!("{}: resource {name} does not exist", file.display());
        }
    }
    let patches = doc.get("patches").and_then(|p| p.as_sequence());
    for patch in patches.into_iter().flatten() {
        let Some(name) = patch.get("path").and_then(|p| p.as_str()) else {
            continue;
        };
        let Ok(path) = dir.join(name).canonicalize() else {
            bail!("{}: patch {name} does not exist", file.display());
        };
        out.patches.insert(path);
    }
    Ok(())
}

fn manifests_in(dir: &Path, out: &mut BTreeSet<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            manifests_in(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.insert(path.canonicalize()?);
        }
    }
    Ok(())
}

/// `deploy/monitoring/`: the alert rules load (`promtool check rules`) and fire as their tests
/// say (`promtool test rules`, with Debian's Prometheus, which `cargo xtask setup` installs).
pub fn check_alerts(root: &Path) -> anyhow::Result<()> {
    let dir = root.join("deploy/monitoring");
    sh::run(Command::new("promtool").current_dir(&dir).args([
        "check",
        "rules",
        "enforcer.rules.yml",
    ]))
    .context("promtool check rules (cargo xtask setup installs prometheus)")?;
    sh::run(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "enforcer.rules.test.yml",
    ]))
    .context("promtool test rules")
}
