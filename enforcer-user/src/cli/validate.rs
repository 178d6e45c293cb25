use std::path::{Path, PathBuf};

use clap::Args;

use crate::{
    diag::Problem,
    policy::check,
    sources::{documents, Snapshot},
};

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Files or directories (searched recursively for `*.yaml` and `*.yml`).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1.., value_name = "FILE_OR_DIR")]
    files: Vec<PathBuf>,
}

/// Like `istioctl validate`: exit 0 when valid (warnings are printed), 1 when any object has an
/// error, each located by file, object and field.
pub fn validate(args: ValidateArgs) -> anyhow::Result<i32> {
    let mut snap = Snapshot::default();
    let mut files = Vec::new();
    for path in &args.files {
        collect(path, &mut files, &mut snap.problems);
    }
    for file in &files {
        let origin = file.display().to_string();
        match std::fs::read_to_string(file) {
            Ok(text) => snap.merge(documents::parse_documents(&origin, &text)),
            Err(err) => snap.problems.push(Problem::new(
                origin,
                "-",
                "-",
                format!("cannot read file: {err}"),
            )),
        }
    }
    let objects = snap.service_entries.len() + snap.workload_entries.len() + snap.sidecars.len();
    let checked = check::check(snap);
    let (errors, warnings): (Vec<&Problem>, Vec<&Problem>) =
        checked.problems.iter().partition(|p| p.is_error());
    for p in &warnings {
        println!("warning: {p}");
    }
    for p in &errors {
        println!("error: {p}");
    }
    let valid =
        checked.service_entries.len() + checked.workload_entries.len() + checked.sidecars.len();
    println!(
        "{} files, {objects} objects: {valid} valid, {} errors, {} warnings",
        files.len(),
        errors.len(),
        warnings.len()
    );
    Ok(if errors.is_empty() { 0 } else { 1 })
}

fn collect(path: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<Problem>) {
    if path.is_file() {
        files.push(path.to_path_buf());
        return;
    }
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(err) => {
            problems.push(Problem::new(
                path.display().to_string(),
                "-",
                "-",
                format!("cannot read: {err}"),
            ));
            return;
        }
    };
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect(&entry, files, problems);
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(entry);
        }
    }
}
