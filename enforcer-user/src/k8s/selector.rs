//! Label selectors as `kubectl -l` writes them, equality-based: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
//! joined by commas. Used for the namespaces whose pods are enforced.

use std::{collections::BTreeMap, fmt, str::FromStr};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    text: String,
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

impl FromStr for LabelSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in s.split(',').map(str::trim) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(key(k)?, value(v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key(k)?, value(v)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(key(k)?)
            } else {
                Requirement::Exists(key(part)?)
            };
            requirements.push(req);
        }
        Ok(Self {
            text: s.to_string(),
            requirements,
        })
    }
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if crate::policy::is_label_key(k) {
        Ok(k.to_string())
    } else {
        Err(format!("{k:?} is not a label key"))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if crate::policy::is_label_value(v) {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a label value"))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_like_kubectl() {
        let s: LabelSelector = "egress-enforcer=enabled".parse().unwrap();
        assert!(s.matches(&labels(&[("egress-enforcer", "enabled"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("egress-enforcer", "disabled")])));
        assert!(!s.matches(&labels(&[])));

        let s: LabelSelector = "istio-injection==enabled, !skip, team, env!=dev"
            .parse()
            .unwrap();
        assert!(s.matches(&labels(&[("istio-injection", "enabled"), ("team", "a")])));
        assert!(!s.matches(&labels(&[
            ("istio-injection", "enabled"),
            ("team", "a"),
            ("skip", "")
        ])));
        assert!(!s.matches(&labels(&[
            ("istio-injection", "enabled"),
            ("team", "a"),
            ("env", "dev")
        ])));
        assert!(!s.matches(&labels(&[("istio-injection", "enabled")])));
    }

    #[test]
    fn bad_selectors_say_which_part() {
        let err = "a=b,bad key=x".parse::<LabelSelector>().unwrap_err();
        assert!(err.contains("bad key"), "{err}");
        let err = "a=b c".parse::<LabelSelector>().unwrap_err();
        assert!(err.contains("b c"), "{err}");
    }
}
