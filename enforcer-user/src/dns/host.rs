//! Host names as Istio matches them (`pkg/config/host/name.go`): a concrete name is covered by
//! a pattern `*suffix` when it ends with `suffix`. So `*.example.com` covers `a.example.com`
//! and `a.b.example.com`, never `example.com`; the partial wildcard `*foo.com` (Istio's
//! validation only warns) covers `foo.com` and `barfoo.com`; `*` covers every name.

use std::collections::BTreeSet;

/// A name as DNS carries it, made comparable: lowercase, without the root's trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether the concrete `name` is covered by `pattern` (both normalized).
pub fn covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => name.ends_with(suffix),
        None => pattern == name,
    }
}

/// The hosts of one set of ServiceEntries, for matching the names in DNS answers: exact names
/// by lookup, wildcards by suffix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hosts {
    exact: BTreeSet<String>,
    /// The suffixes of wildcard patterns (`*.example.com` is `.example.com`).
    suffixes: BTreeSet<String>,
}

impl Hosts {
    pub fn insert(&mut self, host: &str) {
        let host = normalize(host);
        match host.strip_prefix('*') {
            Some(suffix) => self.suffixes.insert(suffix.to_string()),
            None => self.exact.insert(host),
        };
    }

    /// Whether some host covers `name` (normalized here).
    pub fn covers(&self, name: &str) -> bool {
        let name = normalize(name);
        self.exact.contains(&name) || self.suffixes.iter().any(|s| name.ends_with(s.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Hosts {
        let mut h = Hosts::default();
        for host in list {
            h.insert(host);
        }
        h
    }

    #[test]
    fn a_wildcard_covers_one_or_more_labels_never_its_apex() {
        let h = hosts(&["*.wikipedia.org"]);
        assert!(h.covers("en.wikipedia.org"));
        assert!(h.covers("upload.en.wikipedia.org"));
        assert!(!h.covers("wikipedia.org"));
        assert!(!h.covers("notwikipedia.org"));
        assert!(!h.covers("wikipedia.org.evil.example"));
    }

    #[test]
    fn a_partial_wildcard_covers_any_name_ending_in_it_the_apex_too() {
        let h = hosts(&["*foo.com"]);
        assert!(h.covers("foo.com"));
        assert!(h.covers("barfoo.com"));
        assert!(h.covers("a.foo.com"));
        assert!(!h.covers("foo.com.au"));
    }

    #[test]
    fn names_compare_without_case_or_the_roots_dot() {
        let h = hosts(&["API.Example.COM", "*.Cdn.Example.NET."]);
        assert!(h.covers("api.example.com."));
        assert!(h.covers("edge-1.CDN.example.net"));
        assert!(!h.covers("example.com"));
    }

    #[test]
    fn a_lone_star_covers_everything_and_nothing_covers_an_empty_set() {
        assert!(hosts(&["*"]).covers("anything.example"));
        assert!(!Hosts::default().covers("example.com"));
        assert!(Hosts::default().is_empty());
    }

    #[test]
    fn covers_agrees_with_the_set() {
        for (pattern, name, want) in [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "example.com", false),
            ("*example.com", "example.com", true),
            ("example.com", "a.example.com", false),
            ("*", "x", true),
        ] {
            assert_eq!(covers(pattern, name), want, "{pattern} {name}");
            assert_eq!(hosts(&[pattern]).covers(name), want, "{pattern} {name}");
        }
    }
}
