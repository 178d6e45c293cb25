//! Whether the maps an earlier agent pinned have the shape this agent's programs expect: map
//! type, key and value size, capacity and flags. aya adopts a pinned map by name and checks
//! none of that, so an upgrade that changed a layout (or a changed `--max-entries`) would be
//! misread silently; a mismatch makes the agent migrate to new maps instead.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use aya::maps::MapInfo;

/// What the kernel knows of a map's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The shapes the object defines, with the capacities the agent overrides.
pub fn expected(
    object: &[u8],
    overrides: &[(&str, u32)],
) -> anyhow::Result<BTreeMap<String, Shape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the BPF object")?;
    Ok(obj
        .maps
        .iter()
        // Sections such as .rodata are maps too, but never pinned.
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| {
            let max_entries = overrides
                .iter()
                .find(|(n, _)| n == name)
                .map_or(map.max_entries(), |&(_, v)| v);
            let shape = Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// The shape of the map pinned at `path`; `None` when nothing is pinned there.
pub fn pinned(path: &Path) -> anyhow::Result<Option<Shape>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path).with_context(|| format!("reading {}", path.display()))?;
    let map_type = info
        .map_type()
        .map(|t| t as u32)
        .with_context(|| format!("the type of {}", path.display()))?;
    Ok(Some(Shape {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// One line per pinned map under `dir` whose shape differs from `expected`. Maps not pinned
/// yet are created as expected and are no mismatch.
pub fn mismatches(expected: &BTreeMap<String, Shape>, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, want) in expected {
        if let Some(have) = pinned(&dir.join(name))? {
            if have != *want {
                out.push(describe(name, &have, want));
            }
        }
    }
    Ok(out)
}

fn describe(name: &str, have: &Shape, want: &Shape) -> String {
    format!(
        "{name}: pinned type {} key {} value {} entries {} flags {:#x}, expected type {} key {} value {} entries {} flags {:#x}",
        have.map_type, have.key_size, have.value_size, have.max_entries, have.flags,
        want.map_type, want.key_size, want.value_size, want.max_entries, want.flags
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_defines_every_pinned_map_with_overrides() {
        let object = super::super::BPF_OBJECT;
        let shapes = expected(object, &[(enforcer_common::map_names::ALLOW_EXACT, 1000)])
            .expect("the embedded object parses");
        let cgroups = shapes[enforcer_common::map_names::CGROUPS];
        assert_eq!((cgroups.key_size, cgroups.value_size), (8, 8));
        assert_eq!(
            shapes[enforcer_common::map_names::ALLOW_EXACT].max_entries,
            1000
        );
        assert_eq!(
            shapes[enforcer_common::map_names::ALLOW_EXACT].key_size,
            u32::try_from(std::mem::size_of::<enforcer_common::PolicyKey>()).unwrap_or(0)
        );
        assert!(
            shapes.keys().all(|n| n.starts_with("ENF_")),
            "{:?}",
            shapes.keys()
        );
        let other = Shape {
            value_size: 16,
            ..cgroups
        };
        assert!(describe("X", &other, &cgroups).contains("value 16"));
    }
}
