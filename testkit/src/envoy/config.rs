//! Envoy v3 static bootstraps shaped like what istiod pushes: an egress gateway (HTTP routes by
//! Host, TLS passthrough by SNI) and a sidecar's outbound HTTP listener under REGISTRY_ONLY.
//! Names follow Istio's (`outbound|PORT||HOST` clusters, `block_all`), so access logs read alike.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// Istio's `EnvoyTextLogFormat` (pilot/pkg/model/telemetry_logging.go), verbatim: the default
/// text access log of every Istio proxy since 1.9.
pub const ISTIO_ACCESS_LOG_FORMAT: &str = concat!(
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% ",
    "%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% ",
    "%RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% ",
    "\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% ",
    "%DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" ",
    "\"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" ",
    "%UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% ",
    "%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
);

/// Istio's name for the catch-all virtual host and route of REGISTRY_ONLY (`util.BlackHole`).
pub const BLOCK_ALL: &str = "block_all";

/// Where a routed host's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// A STATIC cluster of these addresses (a ServiceEntry with `resolution: STATIC`).
    Static(Vec<SocketAddr>),
    /// A STRICT_DNS cluster of this name and port, resolved by the bootstrap's DNS resolver
    /// (`resolution: DNS`).
    Dns(String, u16),
}

/// A bootstrap ready to run: its YAML, and the directory that holds its files (the config, the
/// admin socket, the access log, Envoy's own log).
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub(super) config: Value,
    pub(super) dir: PathBuf,
    pub(super) access_log: Option<PathBuf>,
}

impl Bootstrap {
    pub fn yaml(&self) -> anyhow::Result<String> {
        serde_yaml::to_string(&self.config).context("writing Envoy's bootstrap YAML")
    }

    /// The directory of the config, the admin socket and the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn admin_socket(dir: &Path) -> PathBuf {
        dir.join("admin.sock")
    }

    fn new(dir: &Path, listeners: Vec<Value>, clusters: Vec<Value>, log: Option<PathBuf>) -> Self {
        let config = json!({
            "node": {"id": "enforcer-test", "cluster": "enforcer-test"},
            // A Unix socket, not a TCP port: reachable from the test whatever network namespace
            // Envoy runs in, and from no other host.
            "admin": {"address": {"pipe": {
                "path": Self::admin_socket(dir).to_string_lossy(),
                "mode": 0o600,
            }}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        });
        Self {
            config,
            dir: dir.to_path_buf(),
            access_log: log,
        }
    }
}

/// Istio's egress gateway, as a builder: an HTTP listener routing by Host, a TLS listener passing
/// connections through by SNI. A host it does not route gets Envoy's 404 (`NR`, as Istio's
/// gateway answers), an unknown SNI a closed connection.
#[derive(Clone, Debug)]
pub struct EgressGateway {
    dir: PathBuf,
    http: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    http_routes: Vec<(String, Upstream)>,
    tls_routes: Vec<(String, Upstream)>,
    resolver: Option<SocketAddr>,
}

impl EgressGateway {
    /// A gateway on 0.0.0.0:8080 (HTTP) and 0.0.0.0:8443 (TLS) with no routes; `dir` will hold
    /// its files. An IPv6 listen address `[::]` accepts IPv4 too.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            http: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            tls: Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
            http_routes: Vec::new(),
            tls_routes: Vec::new(),
            resolver: None,
        }
    }

    /// Where the HTTP listener binds; `None` for none.
    pub fn http_listener(mut self, addr: Option<SocketAddr>) -> Self {
        self.http = addr;
        self
    }

    /// Where the TLS passthrough listener binds (only with a TLS route); `None` for none.
    pub fn tls_listener(mut self, addr: Option<SocketAddr>) -> Self {
        self.tls = addr;
        self
    }

    /// Requests with `Host: host` (any port) go to `upstream` (cluster `outbound|80||host`).
    pub fn route_http(mut self, host: &str, upstream: Upstream) -> Self {
        self.http_routes.push((host.to_string(), upstream));
        self
    }

    /// TLS connections with SNI `host` go to `upstream` (cluster `outbound|443||host`).
    pub fn route_tls(mut self, host: &str, upstream: Upstream) -> Self {
        self.tls_routes.push((host.to_string(), upstream));
        self
    }

    /// The DNS server of STRICT_DNS clusters; they need one (never the machine's resolver).
    pub fn dns_resolver(mut self, addr: SocketAddr) -> Self {
        self.resolver = Some(addr);
        self
    }

    /// Where the access log goes (Istio's text format).
    pub fn access_log_path(&self) -> PathBuf {
        self.dir.join("access.log")
    }

    pub fn bootstrap(&self) -> anyhow::Result<Bootstrap> {
        let log = self.access_log_path();
        let mut listeners = Vec::new();
        let mut clusters = Vec::new();
        for (host, upstream) in &self.http_routes {
            clusters.push(cluster(&cluster_name(80, host), upstream, self.resolver)?);
        }
        for (host, upstream) in &self.tls_routes {
            clusters.push(cluster(&cluster_name(443, host), upstream, self.resolver)?);
        }
        if let Some(addr) = self.http {
            let hosts = self.http_routes.iter().map(|(host, _)| gateway_vhost(host));
            let routes = json!({"name": format!("http.{}", addr.port()), "virtual_hosts": hosts.collect::<Vec<_>>()});
            listeners.push(http_listener(addr, routes, Some(&log)));
        }
        // Envoy takes no listener without a filter chain: with no TLS route, no TLS listener.
        if let Some(addr) = self.tls.filter(|_| !self.tls_routes.is_empty()) {
            listeners.push(tls_listener(addr, &self.tls_routes, &log));
        }
        Ok(Bootstrap::new(&self.dir, listeners, clusters, Some(log)))
    }

    pub fn yaml(&self) -> anyhow::Result<String> {
        self.bootstrap()?.yaml()
    }
}

/// What Istio gives a sidecar for an HTTP port under `outboundTrafficPolicy: REGISTRY_ONLY`,
/// simplified: one outbound listener on `listen` whose routes send the ServiceEntry's `hosts` to
/// `upstream` (with Istio's default retry policy) and everything else to `block_all`, a direct
/// 502. No iptables: clients connect to `listen` as they would through the sidecar's redirect.
/// Istio's own filters (metadata exchange, stats) are absent, so this is a lower bound of a
/// sidecar's cost. Access log (Istio's format, `dir`/access.log) only if `access_log`.
pub fn sidecar_registry_only(
    dir: &Path,
    listen: SocketAddr,
    hosts: &[&str],
    upstream: &Upstream,
    resolver: Option<SocketAddr>,
    access_log: bool,
) -> anyhow::Result<Bootstrap> {
    let port = listen.port();
    let log = access_log.then(|| dir.join("access.log"));
    let mut clusters = Vec::new();
    let mut vhosts = Vec::new();
    for host in hosts {
        let name = cluster_name(port, host);
        clusters.push(cluster(&name, upstream, resolver)?);
        vhosts.push(sidecar_vhost(host, port, &name));
    }
    vhosts.push(json!({
        "name": BLOCK_ALL,
        "domains": ["*"],
        "routes": [{"name": BLOCK_ALL, "match": {"prefix": "/"}, "direct_response": {"status": 502}}],
        "include_request_attempt_count": true,
    }));
    let routes = json!({
        "name": port.to_string(),
        "virtual_hosts": vhosts,
        "validate_clusters": false,
        "ignore_port_in_host_matching": true,
    });
    let listener = http_listener(listen, routes, log.as_deref());
    Ok(Bootstrap::new(dir, vec![listener], clusters, log))
}

fn cluster_name(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

fn socket_address(addr: SocketAddr) -> Value {
    let mut a =
        json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}});
    // `[::]` takes IPv4 connections too, as Istio's dual-stack listeners do.
    if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        a["socket_address"]["ipv4_compat"] = json!(true);
    }
    a
}

fn listener_name(addr: SocketAddr) -> String {
    format!("{}_{}", addr.ip(), addr.port())
}

fn file_access_log(path: &Path) -> Value {
    json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.to_string_lossy(),
            "log_format": {"text_format_source": {"inline_string": ISTIO_ACCESS_LOG_FORMAT}},
        },
    }])
}

/// A listener's own log, as Istio configures it: only connections that found no filter chain
/// (`NR`); the chains' filters log the rest.
fn listener_access_log(path: &Path) -> Value {
    let mut log = file_access_log(path);
    log[0]["filter"] = json!({"response_flag_filter": {"flags": ["NR"]}});
    log
}

fn cluster(name: &str, upstream: &Upstream, resolver: Option<SocketAddr>) -> anyhow::Result<Value> {
    let endpoints: Vec<Value> = match upstream {
        Upstream::Static(addrs) => addrs
            .iter()
            .map(|a| json!({"endpoint": {"address": socket_address(*a)}}))
            .collect(),
        Upstream::Dns(host, port) => vec![json!({"endpoint": {"address": {
            "socket_address": {"address": host, "port_value": port}}}})],
    };
    let mut c = json!({
        "name": name,
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    });
    match upstream {
        Upstream::Static(addrs) if addrs.is_empty() => bail!("cluster {name}: no addresses"),
        Upstream::Static(_) => c["type"] = json!("STATIC"),
        Upstream::Dns(..) => {
            let Some(resolver) = resolver else {
                bail!("cluster {name} resolves by DNS: give the resolver (tests never use the machine's)");
            };
            // Istio also sets respect_dns_ttl, deprecated in this Envoy: names are resolved
            // again every 5 s (the default dns_refresh_rate) instead.
            c["type"] = json!("STRICT_DNS");
            c["dns_lookup_family"] = json!("V4_PREFERRED");
            c["typed_dns_resolver_config"] = cares(resolver);
        }
    }
    Ok(c)
}

fn cares(resolver: SocketAddr) -> Value {
    json!({
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [socket_address(resolver)],
            "use_resolvers_as_fallback": false,
            "dns_resolver_options": {"use_tcp_for_dns_lookups": false, "no_default_search_domain": true},
        },
    })
}

/// A gateway's virtual host: `host` with any port (Istio's `host` and `host:*` domains).
fn gateway_vhost(host: &str) -> Value {
    json!({
        "name": format!("{host}:80"),
        "domains": [host, format!("{host}:*")],
        "routes": [{
            "name": host,
            "match": {"prefix": "/"},
            "route": {"cluster": cluster_name(80, host), "timeout": "0s"},
        }],
    })
}

/// A sidecar's virtual host for a ServiceEntry host, as Istio builds it with
/// `ignore_port_in_host_matching`: the bare host, the route named `default`, no timeout, and
/// Istio's default retry policy (`retry.DefaultPolicy`).
fn sidecar_vhost(host: &str, port: u16, cluster: &str) -> Value {
    json!({
        "name": format!("{host}:{port}"),
        "domains": [host],
        "routes": [{
            "name": "default",
            "match": {"prefix": "/"},
            "decorator": {"operation": format!("{host}:{port}/*")},
            "route": {
                "cluster": cluster,
                // Istio also sets the deprecated max_grpc_timeout: 0s, which only gRPC reads.
                "timeout": "0s",
                "retry_policy": {
                    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                    "num_retries": 2,
                    "retry_host_predicate": [{
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
                    }],
                    "host_selection_retry_max_attempts": 5,
                },
            },
        }],
        "include_request_attempt_count": true,
    })
}

fn http_listener(addr: SocketAddr, route_config: Value, log: Option<&Path>) -> Value {
    let name = listener_name(addr);
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": format!("outbound_{name}"),
        "route_config": route_config,
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    });
    if let Some(log) = log {
        hcm["access_log"] = file_access_log(log);
    }
    json!({
        "name": name,
        "address": socket_address(addr),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm,
        }]}],
    })
}

/// TLS passthrough: `tls_inspector` reads the SNI, a filter chain per host proxies the bytes.
/// No default chain, so an unknown SNI is closed; the listener's own access log records that
/// (`NR`, filter_chain_not_found), as Istio's listeners do.
fn tls_listener(addr: SocketAddr, routes: &[(String, Upstream)], log: &Path) -> Value {
    let chains: Vec<Value> = routes
        .iter()
        .map(|(host, _)| {
            let cluster = cluster_name(443, host);
            json!({
                "filter_chain_match": {"server_names": [host]},
                "filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": cluster,
                        "cluster": cluster,
                        "access_log": file_access_log(log),
                    },
                }],
            })
        })
        .collect();
    json!({
        "name": listener_name(addr),
        "address": socket_address(addr),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }],
        "filter_chains": chains,
        "access_log": listener_access_log(log),
    })
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
