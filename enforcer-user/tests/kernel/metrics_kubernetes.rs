//! Kubernetes mode's metrics: the unmapped window (a pod's cgroup runs before the API server
//! names its pod, under the unmapped scope) is counted while open and measured when it closes.

use std::time::Duration;

use crate::{fake_node::FakeNode, harness::World, kubernetes::uid};

/// The value of the sample `name` (with its labels, as printed), if served.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_unmapped_window_is_counted_while_open_and_measured_when_it_closes() {
    let world = World::new("k8swindow");
    let node = FakeNode::start(
        &world,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {egress-enforcer: enabled}}",
    );
    let agent = &node.agent;
    // The kubelet made the pod's cgroup; the API server has not told the agent of the pod.
    node.tree.container(&uid(0x3c), '7');
    agent.wait_for(Duration::from_secs(10), "one unmapped pod", || {
        let text = agent.metrics();
        sample(&text, "enforcer_pods{state=\"unmapped\"}") == Some(1.0)
            && sample(&text, "enforcer_pods_unmapped_oldest_seconds").is_some_and(|s| s > 0.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    node.pod_object("shop", "web", 0x3c, "");
    agent.wait_for(Duration::from_secs(10), "the window closed", || {
        let text = agent.metrics();
        sample(&text, "enforcer_pods{state=\"unmapped\"}") == Some(0.0)
            && sample(&text, "enforcer_pods{state=\"enforced\"}") == Some(1.0)
            && sample(&text, "enforcer_pod_unmapped_seconds_count") == Some(1.0)
            && sample(&text, "enforcer_pods_unmapped_oldest_seconds") == Some(0.0)
    });
    let text = agent.metrics();
    let took = sample(&text, "enforcer_pod_unmapped_seconds_sum").unwrap_or_default();
    assert!((0.5..10.0).contains(&took), "window {took} s\n{text}");

    // A pod the API server named before its cgroup came is mapped at first sight: a window
    // of zero, observed once.
    node.pod("shop", "db", 0x3d, "", '8');
    agent.wait_for(Duration::from_secs(10), "the second pod mapped", || {
        let text = agent.metrics();
        sample(&text, "enforcer_pods{state=\"enforced\"}") == Some(2.0)
            && sample(&text, "enforcer_pod_unmapped_seconds_count") == Some(2.0)
    });
    let text = agent.metrics();
    let sum = sample(&text, "enforcer_pod_unmapped_seconds_sum").unwrap_or_default();
    assert!(
        sum < took + 1.0,
        "the second window is short: {sum} s in all\n{text}"
    );
}
