//! Seed 001 steps 5 and 6: mesh traffic to www.wikipedia.org through a real Envoy playing
//! istio-egressgateway, a local pod in istio-system labelled istio=egressgateway.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use enforcer_testkit::envoy::{EgressGateway, Upstream};

use super::{report, title, wait, Demo, CGROUP_PARENT, PIN_ROOT};
use crate::sh;

/// Local pods get addresses here (clear of the test hosts and the CDN's pools).
pub const POD_CIDR: &str = "203.0.113.96/28";
pub const POD_CIDR6: &str = "2001:db8:fe::/120";
const GATEWAY_NETNS: &str = "enfdemo-egw";
const CLIENT_NETNS: &str = "enfdemo-cli";
/// www.wikipedia.org in the demo's DNS.
const WIKI: &str = "203.0.113.10";

impl Demo {
    pub(super) fn gateway_steps(&mut self) -> anyhow::Result<()> {
        let src = sh::root().join("policies");
        let policies = self.work.join("policies");
        let copy = |name: &str| fs::copy(src.join(name), policies.join(name)).map(drop);

        title("Step 7 (seed 001, step 5): Envoy as istio-egressgateway, and the Gateway, DestinationRule and VirtualService (policies/001-egress-gateway*.yaml)");
        self.start_gateway()?;
        self.start_client_pod()?;
        copy("001-egress-gateway-service.yaml")?;
        copy("001-egress-gateway.yaml")?;
        let before = self.gateway_log().len();
        // The agent makes the gateway pod its Service's endpoint once it sees both.
        wait(Duration::from_secs(10), || {
            self.curl_ok("http://www.wikipedia.org/") && self.gateway_log().len() > before
        })
        .context("requests never reached the gateway")?;
        self.expect_curl("default", "http://www.wikipedia.org/", true)?;

        title("Step 8 (seed 001, step 6): the gateway's log shows the request; going around it is refused");
        let line = self.gateway_log().pop().unwrap_or_default();
        println!("  istio-egressgateway access log:\n    {line}");
        let logged = line.contains("www.wikipedia.org") && line.contains(&format!("\"{WIKI}:80\""));
        report(
            "istio-system",
            "gateway log names the host and upstream",
            "see above",
            logged,
        )?;
        let bypass = Command::new("ip")
            .args(["netns", "exec", CLIENT_NETNS, "curl", "-s", "-m", "2"])
            .arg(format!("http://{WIKI}/"))
            .output()?;
        let shown = if bypass.status.success() {
            "reached the host directly".to_string()
        } else {
            "dropped by TC".to_string()
        };
        report(
            "default",
            &format!("curl http://{WIKI}/ around the gateway"),
            &shown,
            !bypass.status.success(),
        )?;
        self.show_last_denial()?;

        title("Step 9: delete the VirtualService: direct routing again, the gateway sees nothing");
        fs::remove_file(policies.join("001-egress-gateway.yaml"))?;
        std::thread::sleep(Duration::from_millis(500));
        let before = self.gateway_log().len();
        self.expect_curl("default", "http://www.wikipedia.org/", true)?;
        let unchanged = self.gateway_log().len() == before;
        report(
            "istio-system",
            "gateway log after the request",
            if unchanged {
                "no new line"
            } else {
                "a new line"
            },
            unchanged,
        )?;
        Ok(())
    }

    /// Envoy in a local pod: routes Host www.wikipedia.org to the address the demo's DNS gives
    /// it, with Istio's access log format.
    fn start_gateway(&mut self) -> anyhow::Result<()> {
        let bin = self.bin.display().to_string();
        let prefix = [
            bin.as_str(),
            "exec",
            "--namespace",
            "istio-system",
            "--label",
            "istio=egressgateway",
            "--netns",
            GATEWAY_NETNS,
            "--bpffs-root",
            PIN_ROOT,
            "--cgroup-parent",
            CGROUP_PARENT,
            "--",
        ];
        let envoy = EgressGateway::new(self.work.join("egw"))
            .http_listener(Some("[::]:8080".parse()?))
            .route_http(
                "www.wikipedia.org",
                Upstream::Static(vec![format!("{WIKI}:80").parse()?]),
            )
            .spawn(&prefix)
            .context("starting Envoy as the egress gateway (cargo xtask setup installs it)")?;
        println!("  Envoy {} as istio-egressgateway: enforcer exec --netns {GATEWAY_NETNS} --namespace istio-system --label istio=egressgateway -- envoy (HTTP on :8080)", enforcer_testkit::envoy::VERSION);
        self.gateway = Some(envoy);
        Ok(())
    }

    /// A pod in default that only waits: its network namespace is where a bypass is tried.
    fn start_client_pod(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .args(["exec", "--namespace", "default", "--netns", CLIENT_NETNS])
            .args(["--bpffs-root", PIN_ROOT, "--cgroup-parent", CGROUP_PARENT])
            .args(["--", "sleep", "600"])
            .stdout(Stdio::null())
            // Its own process group, so that cleanup ends the pod's command with it.
            .process_group(0)
            .spawn()?;
        self.pods.push(child);
        wait(Duration::from_secs(10), || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    CLIENT_NETNS,
                    "ip",
                    "-4",
                    "addr",
                    "show",
                    "eth0",
                ])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("inet "))
        })
        .context("the client pod did not start")
    }

    fn gateway_log(&self) -> Vec<String> {
        self.gateway
            .as_ref()
            .map(|g| g.access_log_lines())
            .unwrap_or_default()
    }

    fn curl_ok(&self, url: &str) -> bool {
        sh::output(&mut self.client(
            "default",
            &["curl", "-s", "-m", "2", "-o", "/dev/null", url],
        ))
        .is_ok_and(|o| o.status.success())
    }
}

/// The routes back from the test hosts to local pods.
pub fn route_back(net: &enforcer_testkit::TestNet) -> anyhow::Result<()> {
    net.route_back(POD_CIDR)?;
    net.route_back(POD_CIDR6)?;
    Ok(())
}
