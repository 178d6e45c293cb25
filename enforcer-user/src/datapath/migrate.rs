//! Moving to maps of a new shape with no gap in enforcement. The old programs keep enforcing
//! the old maps (they hold them open) while the new maps are created under `maps_next/` and
//! filled with the first plan; only then are the new programs attached, replacing the old
//! links, and `maps_next/` takes the place of `maps/`.
//!
//! A kill at any point leaves a state the next agent resumes from: while `maps/` still holds
//! the old shape it stages again; if the kill fell between the two renames, `maps_next/` is
//! promoted before anything else.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

const LIVE: &str = "maps";
// bpffs refuses names with a dot.
const NEXT: &str = "maps_next";
const OLD: &str = "maps_old";

/// Finishes a promotion a kill interrupted, so that `maps/` is never found missing while
/// `maps_next/` holds the maps the attached programs use.
pub fn recover(pin_root: &Path) -> anyhow::Result<()> {
    let (live, next) = (pin_root.join(LIVE), pin_root.join(NEXT));
    if !live.exists() && next.exists() {
        log::warn!(
            "finishing an interrupted map migration under {}",
            pin_root.display()
        );
        rename(&next, &live)?;
    }
    remove_dir(&pin_root.join(OLD))
}

/// An empty `maps_next/` for the new maps (an interrupted migration's leftovers are dropped:
/// no attached program uses them, as the programs attach only after the promotion's data is in).
pub fn stage(pin_root: &Path) -> anyhow::Result<PathBuf> {
    let next = pin_root.join(NEXT);
    remove_dir(&next)?;
    std::fs::create_dir_all(&next).with_context(|| format!("creating {}", next.display()))?;
    Ok(next)
}

/// After the new programs are attached: the new maps become `maps/`; the old pins go (the
/// maps themselves go with the last program that holds them).
pub fn promote(pin_root: &Path) -> anyhow::Result<()> {
    let (live, next, old) = (pin_root.join(LIVE), pin_root.join(NEXT), pin_root.join(OLD));
    remove_dir(&old)?;
    rename(&live, &old)?;
    rename(&next, &live)?;
    remove_dir(&old)
}

fn rename(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// Removes a directory of pins, if it exists.
fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}
