//! The classic Prometheus text format (0.0.4), for clients that do not ask for OpenMetrics
//! (`promtool check metrics`, `curl`): prometheus-client writes OpenMetrics only. The two
//! differ, for what the agent serves, in a counter family's name (OpenMetrics names the family
//! without `_total`, classic text as its samples), `# UNIT` lines and the `# EOF` end.

/// Classic text from OpenMetrics text.
pub fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_as_their_samples_and_the_end_marker_goes() {
        let om = "# HELP enforcer_applies Applies.\n# TYPE enforcer_applies counter\nenforcer_applies_total 2\n# HELP enforcer_objects Objects.\n# TYPE enforcer_objects gauge\nenforcer_objects{kind=\"Gateway\"} 1\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP enforcer_applies_total Applies.\n# TYPE enforcer_applies_total counter\nenforcer_applies_total 2\n# HELP enforcer_objects Objects.\n# TYPE enforcer_objects gauge\nenforcer_objects{kind=\"Gateway\"} 1\n"
        );
    }
}
