//! A real Envoy as Istio's egress gateway and as a REGISTRY_ONLY sidecar, on loopback only.
//! Envoy must be installed (`cargo xtask setup`): without it these tests fail and say so.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use enforcer_testkit::{
    envoy::{self, sidecar_registry_only, EgressGateway, Upstream},
    http::{self, HttpServer},
    python, script, Dnsmasq,
};

const LOG_WAIT: Duration = Duration::from_secs(3);

/// A fresh directory, removed on drop (declared first in a test, so dropped last).
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("enforcer-envoy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the work directory");
        Self(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn require_envoy() {
    if let Err(e) = envoy::binary() {
        panic!("{e:#}");
    }
}

/// `tls_server.py` with a self-signed certificate for `name`; killed on drop.
struct TlsServer {
    child: Child,
    addr: SocketAddr,
    cert: PathBuf,
}

impl TlsServer {
    fn start(dir: &Path, name: &str) -> Self {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", &format!("/CN={name}")])
            .args(["-addext", &format!("subjectAltName=DNS:{name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = Command::new(python())
            .arg(script("tls_server.py"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tls_server.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("reading tls_server.py's first line");
        let port: u16 = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("tls_server.py said {line:?}"));
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            cert,
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl to `https://name/` through `via`, verifying the server's certificate: stdout, or stderr.
fn curl_tls(via: SocketAddr, name: &str, cert: &Path) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--noproxy", "*", "--cacert"])
        .arg(cert)
        .args(["--resolve", &format!("{name}:{}:{}", via.port(), via.ip())])
        .arg(format!("https://{name}:{}/", via.port()))
        .output()
        .expect("curl (cargo xtask setup installs it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn egress_gateway_routes_by_host_and_sni() {
    require_envoy();
    let work = WorkDir::new("gateway");
    let dir = &work.0;
    let upstream =
        HttpServer::start("127.0.0.1:0".parse().unwrap(), "hello from upstream\n").unwrap();
    let tls = TlsServer::start(dir, "secure.example.test");
    let dns = Dnsmasq::start(
        "127.0.0.1:0".parse().unwrap(),
        dir,
        30,
        &[("api.example.test", "127.0.0.1")],
    )
    .unwrap();
    let (http_at, tls_at) = (free_port(), free_port());
    let gateway = EgressGateway::new(dir)
        .http_listener(Some(http_at))
        .tls_listener(Some(tls_at))
        .route_http("www.example.test", Upstream::Static(vec![upstream.addr()]))
        .route_http(
            "api.example.test",
            Upstream::Dns("api.example.test".into(), upstream.addr().port()),
        )
        .route_tls("secure.example.test", Upstream::Static(vec![tls.addr]))
        .dns_resolver(dns.addr)
        .spawn(&[])
        .unwrap();

    let (status, body) = http::get(http_at, "www.example.test", "/").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello from upstream\n"));
    let line = gateway
        .wait_for_access_log(LOG_WAIT, |l| l.contains("\"www.example.test\""))
        .unwrap();
    assert!(line.contains(&format!("\"{}\"", upstream.addr())), "{line}");
    assert!(line.contains("outbound|80||www.example.test"), "{line}");
    assert!(line.contains("\" 200 - via_upstream "), "{line}");

    // STRICT_DNS: the name resolved by the given server, never the machine's.
    let (status, _) = http::get(http_at, "api.example.test:8080", "/").unwrap();
    assert_eq!(status, 200);

    let (status, _) = http::get(http_at, "unknown.example.test", "/").unwrap();
    assert_eq!(status, 404, "a host the gateway does not route");
    let line = gateway
        .wait_for_access_log(LOG_WAIT, |l| l.contains("\"unknown.example.test\""))
        .unwrap();
    assert!(line.contains(" 404 NR route_not_found "), "{line}");

    let body = curl_tls(tls_at, "secure.example.test", &tls.cert).unwrap();
    assert_eq!(
        body, "tls hello secure.example.test\n",
        "passed through, SNI intact"
    );
    let line = gateway
        .wait_for_access_log(LOG_WAIT, |l| {
            l.contains("outbound|443||secure.example.test")
        })
        .unwrap();
    assert!(
        line.contains(" secure.example.test "),
        "the SNI is logged: {line}"
    );
    assert!(line.contains(&format!("\"{}\"", tls.addr)), "{line}");

    let refused = curl_tls(tls_at, "other.example.test", &tls.cert);
    assert!(refused.is_err(), "an unknown SNI is closed: {refused:?}");
    let line = gateway
        .wait_for_access_log(LOG_WAIT, |l| l.contains(" other.example.test "))
        .unwrap();
    assert!(line.contains(" NR filter_chain_not_found "), "{line}");
    let passed = gateway.access_log_lines();
    let passed = passed.iter().filter(|l| l.contains("outbound|443||"));
    assert_eq!(passed.count(), 1, "one line per connection");
    // Shown with --nocapture: what the gateway's log looks like.
    eprintln!("{}", gateway.access_log_lines().join("\n"));
}

#[test]
fn registry_only_sidecar_blocks_other_hosts() {
    require_envoy();
    let work = WorkDir::new("sidecar");
    let dir = &work.0;
    let upstream = HttpServer::start("127.0.0.1:0".parse().unwrap(), "registered\n").unwrap();
    let listen = free_port();
    let sidecar = sidecar_registry_only(
        dir,
        listen,
        &["www.example.test"],
        &Upstream::Static(vec![upstream.addr()]),
        None,
        true,
    )
    .unwrap()
    .spawn(&[])
    .unwrap();
    let (status, body) = http::get(listen, "www.example.test", "/").unwrap();
    assert_eq!((status, body.as_str()), (200, "registered\n"));
    let (status, _) = http::get(listen, "elsewhere.example.test", "/").unwrap();
    assert_eq!(status, 502, "REGISTRY_ONLY: Istio's BlackHole answer");
    let line = sidecar
        .wait_for_access_log(LOG_WAIT, |l| l.contains("\"elsewhere.example.test\""))
        .unwrap();
    assert!(line.trim_end().ends_with(" block_all"), "{line}");
}

/// A network namespace with only loopback up; deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("enforcer-envoy-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("running ip");
            assert!(
                out.status.success(),
                "ip {args:?} (needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ip(&["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn runs_behind_a_command_prefix_in_a_netns() {
    require_envoy();
    let work = WorkDir::new("netns");
    let ns = Netns::new();
    // Its loopback, not ours: the same port is free here whatever the namespace holds.
    let listen = free_port();
    let envoy = sidecar_registry_only(
        &work.0,
        listen,
        &["www.example.test"],
        &Upstream::Static(vec![listen]),
        None,
        false,
    )
    .unwrap()
    .spawn(&["ip", "netns", "exec", &ns.0])
    .expect("ready, as seen through the admin socket from outside the namespace");
    assert!(envoy
        .admin("/stats?filter=^server.live$")
        .unwrap()
        .contains("server.live: 1"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", "Host: elsewhere.example.test", "--max-time", "5"])
        .arg(format!("http://{listen}/"))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "502",
        "answered inside the namespace"
    );
    assert!(
        http::get(listen, "elsewhere.example.test", "/").is_err(),
        "nothing listens on {listen} out here"
    );
}
