//! Seed 003 (Istio's samples/external: the hosts apt-get needs) step by step in the VM, as the
//! README's Vagrant section gives it: each command is what a user types in
//! `vagrant ssh -c "..."`, and it reaches Debian's real mirror (here through the host's NAT
//! and proxy).

use anyhow::bail;

use super::Vagrant;

pub struct Step {
    /// The command inside `vagrant ssh -c "..."`, exactly as the README shows it.
    pub command: &'static str,
    pub succeeds: bool,
    /// Said by its output (stdout and stderr); a copy says nothing, its exit status is enough.
    pub says: Option<&'static str>,
}

const CURL: &str = "sudo enforcer exec -n default -- curl -sS -o /dev/null -w '%{http_code}\\n' http://deb.debian.org/debian/dists/bookworm/InRelease";

pub const STEPS: &[Step] = &[
    // No policy: the mesh's default, ALLOW_ANY.
    Step {
        command: CURL,
        succeeds: true,
        says: Some("200"),
    },
    Step {
        command: "sudo cp /enforcer/policies/mesh/registry-only.yaml /etc/enforcer/policies/",
        succeeds: true,
        says: None,
    },
    Step {
        command: "sudo enforcer exec -n default -- apt-get update",
        succeeds: false,
        says: Some("Operation not permitted"),
    },
    Step {
        command: "sudo enforcer events -n default --last 1",
        succeeds: true,
        // No ServiceEntry names the address yet, so the record has no host name.
        says: Some("tcp DENIED no_rule connect4"),
    },
    Step {
        command: "sudo cp /enforcer/policies/003-external-hosts.yaml /etc/enforcer/policies/",
        succeeds: true,
        says: None,
    },
    Step {
        command: "sudo enforcer exec -n default -- apt-get update",
        succeeds: true,
        says: Some("Reading package lists"),
    },
    Step {
        command: "sudo enforcer explain -n default deb.debian.org:80",
        succeeds: true,
        says: Some("ServiceEntry default/make-aptget-work"),
    },
];

pub fn run(vagrant: &Vagrant) -> anyhow::Result<()> {
    for (i, step) in STEPS.iter().enumerate() {
        let (ok, out) = vagrant.capture(&["ssh", "-c", step.command])?;
        let said = step.says.is_none_or(|says| out.contains(says));
        eprintln!(
            "vagrant-test: step {}: {} -> {} [{}]",
            i + 1,
            step.command,
            if ok { "exit 0" } else { "failed" },
            if ok == step.succeeds && said {
                "ok"
            } else {
                "UNEXPECTED"
            }
        );
        if ok != step.succeeds || !said {
            bail!(
                "step {}: `{}` {} and its output {} {:?}",
                i + 1,
                step.command,
                if ok { "succeeded" } else { "failed" },
                if said { "says" } else { "does not say" },
                step.says.unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_shows_every_step_as_run_in_order() {
        let readme = std::fs::read_to_string(crate::sh::root().join("README.md")).unwrap();
        let mut rest = readme.as_str();
        for step in STEPS {
            let line = format!("vagrant ssh -c \"{}\"", step.command);
            let at = rest
                .find(&line)
                .unwrap_or_else(|| panic!("README.md lacks, after the step before: {line}"));
            rest = &rest[at + line.len()..];
        }
    }
}
