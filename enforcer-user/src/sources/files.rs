//! Local mode: a directory of Istio YAML files, and an optional mesh config file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::{documents, Snapshot};
use crate::diag::Problem;

/// Reads every `*.yaml` and `*.yml` in `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Snapshot {
    let mut snap = Snapshot::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            snap.problems.push(Problem::new(
                dir.display().to_string(),
                "-",
                "-",
                format!("cannot read directory: {err}"),
            ));
            return snap;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_policy_file(p))
        .collect();
    files.sort();
    for path in files {
        let origin = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => snap.merge(documents::parse_documents(&origin, &text)),
            // Removed between listing and reading: it is gone, which the next event reports.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => snap.problems.push(Problem::new(
                origin,
                "-",
                "-",
                format!("cannot read file: {err}"),
            )),
        }
    }
    snap
}

pub fn load_mesh_file(path: &Path) -> Snapshot {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => documents::parse_mesh_file(&origin, &text),
        Err(err) => {
            let mut snap = Snapshot::default();
            snap.problems.push(Problem::new(
                origin,
                "MeshConfig",
                "-",
                format!("cannot read file: {err}"),
            ));
            snap
        }
    }
}

fn is_policy_file(path: &Path) -> bool {
    path.is_file() && has_policy_extension(path)
}

/// `*.yaml` or `*.yml`, not hidden (editors' swap and temporary files are hidden).
fn has_policy_extension(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    !hidden
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        )
}

/// What to watch: a directory, and which of its entries matter.
pub enum Watch {
    /// Policy files (`*.yaml`, `*.yml`) in this directory.
    PolicyDir(PathBuf),
    /// One file, through its directory, so that replacing it by rename is seen too.
    File(PathBuf),
}

/// Sends `()` on every change to a watched entry. Other files in those directories (the agent's
/// own log or status file, say) are ignored, or they would feed back into reloads.
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl DirWatcher {
    pub fn new(watches: Vec<Watch>, tx: mpsc::UnboundedSender<()>) -> anyhow::Result<Self> {
        let dirs: Vec<PathBuf> = watches
            .iter()
            .map(|w| match w {
                Watch::PolicyDir(dir) => dir.clone(),
                Watch::File(file) => match file.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                },
            })
            .collect();
        let relevant = move |path: &Path| {
            watches.iter().any(|w| match w {
                Watch::PolicyDir(dir) => {
                    path.parent() == Some(dir.as_path()) && has_policy_extension(path)
                }
                Watch::File(file) => path.file_name() == file.file_name(),
            })
        };
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if !ev.kind.is_access()
                    && (ev.need_rescan() || ev.paths.iter().any(|p| relevant(p)))
                {
                    let _ = tx.send(());
                }
            }
        })
        .context("creating a file watcher")?;
        for dir in &dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        Ok(Self { _watcher: watcher })
    }
}

/// Sends `()` on any change directly under `dir` (used for the managed cgroup directory).
pub fn watch_any(
    dir: &Path,
    tx: mpsc::UnboundedSender<()>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|ev| !ev.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .context("creating a cgroup watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}
