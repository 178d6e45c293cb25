//! The bootstraps' shape, read back from their YAML.

use super::*;

fn parse(yaml: &str) -> serde_yaml::Value {
    serde_yaml::from_str(yaml).expect("the bootstrap is YAML")
}

fn gateway() -> EgressGateway {
    EgressGateway::new("/tmp/gw")
        .route_http(
            "www.example.test",
            Upstream::Static(vec!["198.51.100.10:80".parse().unwrap()]),
        )
        .route_http(
            "api.example.test",
            Upstream::Dns("api.example.test".into(), 80),
        )
        .route_tls(
            "secure.example.test",
            Upstream::Static(vec!["198.51.100.10:443".parse().unwrap()]),
        )
        .dns_resolver("127.0.0.1:5353".parse().unwrap())
}

fn listener<'a>(doc: &'a serde_yaml::Value, name: &str) -> &'a serde_yaml::Value {
    doc["static_resources"]["listeners"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|l| l["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn cluster<'a>(doc: &'a serde_yaml::Value, name: &str) -> &'a serde_yaml::Value {
    doc["static_resources"]["clusters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

#[test]
fn gateway_routes_http_by_host_with_no_catch_all() {
    let doc = parse(&gateway().yaml().unwrap());
    let http = listener(&doc, "0.0.0.0_8080");
    assert_eq!(
        http["address"]["socket_address"]["port_value"].as_u64(),
        Some(8080)
    );
    let hcm = &http["filter_chains"][0]["filters"][0];
    assert_eq!(
        hcm["name"].as_str(),
        Some("envoy.filters.network.http_connection_manager")
    );
    let vhosts = hcm["typed_config"]["route_config"]["virtual_hosts"]
        .as_sequence()
        .unwrap();
    assert_eq!(
        vhosts.len(),
        2,
        "one per host and no default: Envoy's 404 NR"
    );
    let www = &vhosts[0];
    let domains: Vec<&str> = www["domains"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert_eq!(domains, ["www.example.test", "www.example.test:*"]);
    assert_eq!(
        www["routes"][0]["route"]["cluster"].as_str(),
        Some("outbound|80||www.example.test")
    );
    let log = &hcm["typed_config"]["access_log"][0]["typed_config"];
    assert_eq!(log["path"].as_str(), Some("/tmp/gw/access.log"));
    assert_eq!(
        log["log_format"]["text_format_source"]["inline_string"].as_str(),
        Some(ISTIO_ACCESS_LOG_FORMAT)
    );
}

#[test]
fn gateway_clusters_static_and_strict_dns() {
    let doc = parse(&gateway().yaml().unwrap());
    let www = cluster(&doc, "outbound|80||www.example.test");
    assert_eq!(www["type"].as_str(), Some("STATIC"));
    let addr = &www["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(addr["address"].as_str(), Some("198.51.100.10"));
    assert_eq!(addr["port_value"].as_u64(), Some(80));

    let api = cluster(&doc, "outbound|80||api.example.test");
    assert_eq!(api["type"].as_str(), Some("STRICT_DNS"));
    let cares = &api["typed_dns_resolver_config"];
    assert_eq!(
        cares["name"].as_str(),
        Some("envoy.network.dns_resolver.cares")
    );
    let resolver = &cares["typed_config"]["resolvers"][0]["socket_address"];
    assert_eq!(resolver["address"].as_str(), Some("127.0.0.1"));
    assert_eq!(resolver["port_value"].as_u64(), Some(5353));
}

#[test]
fn strict_dns_needs_a_resolver() {
    let gw = EgressGateway::new("/tmp/gw").route_http("a.test", Upstream::Dns("a.test".into(), 80));
    let err = gw.yaml().unwrap_err().to_string();
    assert!(err.contains("resolver"), "{err}");
}

#[test]
fn gateway_passes_tls_through_by_sni() {
    let doc = parse(&gateway().yaml().unwrap());
    let tls = listener(&doc, "0.0.0.0_8443");
    assert_eq!(
        tls["listener_filters"][0]["name"].as_str(),
        Some("envoy.filters.listener.tls_inspector")
    );
    let chains = tls["filter_chains"].as_sequence().unwrap();
    assert_eq!(
        chains.len(),
        1,
        "no default chain: an unknown SNI is closed"
    );
    assert_eq!(
        chains[0]["filter_chain_match"]["server_names"][0].as_str(),
        Some("secure.example.test")
    );
    let proxy = &chains[0]["filters"][0];
    assert_eq!(
        proxy["name"].as_str(),
        Some("envoy.filters.network.tcp_proxy")
    );
    assert_eq!(
        proxy["typed_config"]["cluster"].as_str(),
        Some("outbound|443||secure.example.test")
    );
    let own_log = &tls["access_log"][0];
    assert!(own_log["typed_config"]["path"].is_string());
    assert_eq!(
        own_log["filter"]["response_flag_filter"]["flags"][0].as_str(),
        Some("NR"),
        "the listener logs the connections no chain took"
    );
}

#[test]
fn admin_only_on_a_unix_socket() {
    let doc = parse(&gateway().yaml().unwrap());
    let admin = &doc["admin"]["address"];
    assert!(admin["socket_address"].is_null());
    assert_eq!(admin["pipe"]["path"].as_str(), Some("/tmp/gw/admin.sock"));
}

#[test]
fn ipv6_listener_takes_ipv4_too() {
    let gw = gateway()
        .http_listener(Some("[::]:8080".parse().unwrap()))
        .tls_listener(None);
    let doc = parse(&gw.yaml().unwrap());
    let listeners = doc["static_resources"]["listeners"].as_sequence().unwrap();
    assert_eq!(listeners.len(), 1);
    let addr = &listeners[0]["address"]["socket_address"];
    assert_eq!(addr["address"].as_str(), Some("::"));
    assert_eq!(addr["ipv4_compat"].as_bool(), Some(true));
}

#[test]
fn sidecar_blocks_what_is_not_registered() {
    let upstream = Upstream::Static(vec!["198.51.100.10:80".parse().unwrap()]);
    let listen = "127.0.0.1:15001".parse().unwrap();
    let boot = sidecar_registry_only(
        Path::new("/tmp/sc"),
        listen,
        &["www.example.test"],
        &upstream,
        None,
        false,
    )
    .unwrap();
    let doc = parse(&boot.yaml().unwrap());
    let hcm = &listener(&doc, "127.0.0.1_15001")["filter_chains"][0]["filters"][0]["typed_config"];
    assert!(hcm["access_log"].is_null(), "no access log by default");
    let routes = &hcm["route_config"];
    assert_eq!(routes["ignore_port_in_host_matching"].as_bool(), Some(true));
    let vhosts = routes["virtual_hosts"].as_sequence().unwrap();
    assert_eq!(vhosts.len(), 2);
    let route = &vhosts[0]["routes"][0]["route"];
    assert_eq!(
        route["cluster"].as_str(),
        Some("outbound|15001||www.example.test")
    );
    assert_eq!(route["retry_policy"]["num_retries"].as_u64(), Some(2));
    let block = &vhosts[1];
    assert_eq!(block["name"].as_str(), Some(BLOCK_ALL));
    assert_eq!(block["domains"][0].as_str(), Some("*"));
    assert_eq!(block["routes"][0]["name"].as_str(), Some(BLOCK_ALL));
    assert_eq!(
        block["routes"][0]["direct_response"]["status"].as_u64(),
        Some(502)
    );
    assert_eq!(
        cluster(&doc, "outbound|15001||www.example.test")["type"].as_str(),
        Some("STATIC")
    );
}

#[test]
fn sidecar_access_log_when_asked() {
    let upstream = Upstream::Static(vec!["198.51.100.10:80".parse().unwrap()]);
    let boot = sidecar_registry_only(
        Path::new("/tmp/sc"),
        "127.0.0.1:15001".parse().unwrap(),
        &["www.example.test"],
        &upstream,
        None,
        true,
    )
    .unwrap();
    let doc = parse(&boot.yaml().unwrap());
    let hcm = &listener(&doc, "127.0.0.1_15001")["filter_chains"][0]["filters"][0]["typed_config"];
    assert_eq!(
        hcm["access_log"][0]["typed_config"]["path"].as_str(),
        Some("/tmp/sc/access.log")
    );
}

#[test]
fn access_log_format_is_istios() {
    // Fields the tests and the demo read from gateway logs.
    for field in [
        "\"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW%",
        "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n",
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%",
    ] {
        assert!(ISTIO_ACCESS_LOG_FORMAT.contains(field), "{field}");
    }
}
