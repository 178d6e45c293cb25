//! Local mode: a directory of Istio YAML files, and an optional mesh config file.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

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
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    !hidden
        && path.is_file()
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        )
}

/// Watches the given directories and sends `()` on every change under them, coalesced so that an
/// editor's write-rename-chmod burst arrives as one.
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl DirWatcher {
    pub fn new(dirs: &[PathBuf], tx: mpsc::UnboundedSender<()>) -> anyhow::Result<Self> {
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|ev| !ev.kind.is_access()) {
                let _ = tx.send(());
            }
        })
        .context("creating a file watcher")?;
        for dir in dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        Ok(Self { _watcher: watcher })
    }
}

/// After a first event, waits until the channel has been quiet for `quiet`, so that an editor's
/// write-rename-chmod burst is read once.
pub async fn settle(rx: &mut mpsc::UnboundedReceiver<()>, quiet: Duration) {
    while let Ok(Some(())) = tokio::time::timeout(quiet, rx.recv()).await {}
}
