use super::*;
use crate::sources::documents::parse_documents;

/// The problems of one object of `kind` named `name` in namespace `default`.
fn problems(kind: &str, name: &str, spec: &str) -> Vec<Problem> {
    let yaml = format!("apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: '{name}', namespace: default}}\nspec: {spec}\n");
    let snap = parse_documents("r.yaml", &yaml);
    assert!(snap.problems.is_empty(), "{spec}: {:?}", snap.problems);
    match kind {
        "Gateway" => validate_gateway(&snap.gateways[0]),
        "VirtualService" => validate_virtual_service(&snap.virtual_services[0]),
        _ => validate_destination_rule(&snap.destination_rules[0]),
    }
}

const GW: &str = "Gateway";
const VS: &str = "VirtualService";
const DR: &str = "DestinationRule";

/// The seed's (001, step 5) objects, in flow style.
const SEED_GW: &str = "{selector: {istio: egressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [www.wikipedia.org]}]}";
const SEED_VS: &str = "{hosts: [www.wikipedia.org], gateways: [istio-system/istio-egressgateway, mesh], http: [{match: [{gateways: [mesh], port: 80}], route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, subset: wikipedia, port: {number: 80}}, weight: 100}]}, {match: [{gateways: [istio-system/istio-egressgateway]}], port: 80, route: [{destination: {host: www.wikipedia.org, port: {number: 80}}, weight: 100}]}]}";
const SEED_DR: &str =
    "{host: istio-egressgateway.istio-system.svc.cluster.local, subsets: [{name: wikipedia}]}";

/// The field of an expected error and a fragment of its message; `None` when valid.
type Want = Option<(&'static str, &'static str)>;

/// Each case: kind, name, `spec` in flow style, and what is expected. The comment names the
/// Istio function whose rule the case mirrors.
#[rustfmt::skip]
const CASES: &[(&str, &str, &str, Want)] = &[
    // ValidateGateway: the seed's Gateway.
    (GW, "egw", SEED_GW, None),
    // validateServer: no selector (every workload), and each host form a server may use.
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*', 'ns1/*.example.com', './api.example.com', '*/*', 192.0.2.1]}]}", None),
    // ValidateGateway: "gateway must have at least one server".
    (GW, "egw", "{selector: {istio: egressgateway}, servers: []}", Some(("spec.servers", "at least one server"))),
    // ValidateGateway: the name is a DNS label ("invalid gateway name").
    (GW, "egw.v1", SEED_GW, Some(("metadata.name", "invalid gateway name"))),
    // validateServerPort: "port is required".
    (GW, "egw", "{servers: [{hosts: [a.example.com]}]}", Some(("spec.servers[0].port", "port is required"))),
    // validateServerPort -> ValidatePort.
    (GW, "egw", "{servers: [{port: {number: 65536, name: http, protocol: HTTP}, hosts: [a.example.com]}]}", Some(("spec.servers[0].port.number", "1..65535"))),
    // validateServerPort: "port name must be set".
    (GW, "egw", "{servers: [{port: {number: 80, protocol: HTTP}, hosts: [a.example.com]}]}", Some(("spec.servers[0].port.name", "port name must be set"))),
    // validateServerPort: protocol.Parse gives Unsupported for an empty protocol.
    (GW, "egw", "{servers: [{port: {number: 80, name: http}, hosts: [a.example.com]}]}", Some(("spec.servers[0].port.protocol", "invalid protocol"))),
    // validateServerPort: "targetPort has no impact on Gateways".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP, targetPort: 8080}, hosts: [a.example.com]}]}", Some(("spec.servers[0].port.targetPort", "no impact"))),
    // validateServerBind -> ValidateIPAddress.
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.example.com], bind: localhost}]}", Some(("spec.servers[0].bind", "not a valid IP"))),
    // validateServer: "server config must contain at least one host".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: []}]}", Some(("spec.servers[0].hosts", "at least one host"))),
    // validateSidecarOrGatewayHostnamePart: "short names (non FQDN) are not allowed".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [egress]}]}", Some(("spec.servers[0].hosts[0]", "short names"))),
    // ValidateNamespaceSlashWildcardHostname: "invalid namespace value %q in gateway".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [Bad_NS/a.example.com]}]}", Some(("spec.servers[0].hosts[0]", "invalid namespace value"))),
    // ValidateNamespaceSlashWildcardHostname: an empty namespace or dnsName.
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [/a.example.com]}]}", Some(("spec.servers[0].hosts[0]", "cannot be empty"))),
    // ValidatePartialWildCard: "partial wildcard %q not allowed".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*foo.example.com']}]}", Some(("spec.servers[0].hosts[0]", "partial wildcard"))),
    // validateServer: "server must have TLS settings for HTTPS/TLS protocols".
    (GW, "egw", "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com]}]}", Some(("spec.servers[0].tls", "must have TLS settings"))),
    // validateServer: PASSTHROUGH on a TLS port (the egress-gateway task's HTTPS variant).
    (GW, "egw", "{servers: [{port: {number: 443, name: tls, protocol: TLS}, hosts: [a.example.com], tls: {mode: PASSTHROUGH}}]}", None),
    // validateServer: "server cannot have TLS settings for non HTTPS/TLS ports" (passthrough on TCP).
    (GW, "egw", "{servers: [{port: {number: 443, name: tcp, protocol: TCP}, hosts: [a.example.com], tls: {mode: PASSTHROUGH}}]}", Some(("spec.servers[0].tls", "non HTTPS/TLS ports"))),
    // validateServer: "server cannot have TLS settings for plain text HTTP ports".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.example.com], tls: {mode: SIMPLE, credentialName: c}}]}", Some(("spec.servers[0].tls", "plain text HTTP ports"))),
    // validateServer + gateway.IsPassThroughServer: an HTTP server may redirect to HTTPS.
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.example.com], tls: {httpsRedirect: true}}]}", None),
    // ServerTLSSettings.TLSmode: a value outside the enum fails to parse in Istio.
    (GW, "egw", "{servers: [{port: {number: 443, name: tls, protocol: TLS}, hosts: [a.example.com], tls: {mode: PASSTHRU}}]}", Some(("spec.servers[0].tls.mode", "unknown TLS mode"))),
    // validateTLSOptions: "SIMPLE TLS requires a server certificate".
    (GW, "egw", "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, privateKey: /k.pem}}]}", Some(("spec.servers[0].tls.serverCertificate", "SIMPLE TLS requires a server certificate"))),
    // validateTLSOptions: a credentialName replaces the certificate files.
    (GW, "egw", "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, credentialName: egw-cert}}]}", None),
    // validateTLSOptions: "MUTUAL TLS requires a client CA bundle".
    (GW, "egw", "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}}]}", Some(("spec.servers[0].tls.caCertificates", "client CA bundle"))),
    // validateTLSOptions: "ISTIO_MUTUAL TLS cannot have associated credentialName".
    (GW, "egw", "{servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: ISTIO_MUTUAL, credentialName: c}}]}", Some(("spec.servers[0].tls.credentialName", "ISTIO_MUTUAL TLS cannot"))),
    // ValidateGateway: "port names in servers must be unique".
    (GW, "egw", "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.example.com]}, {port: {number: 8080, name: http, protocol: HTTP}, hosts: [b.example.com]}]}", Some(("spec.servers[1].port.name", "must be unique"))),

    // ValidateVirtualService: the seed's VirtualService (its misplaced port only warns).
    (VS, "vs", SEED_VS, None),
    // ValidateVirtualService: a short host, a short gateway name, a short destination host.
    (VS, "vs", "{hosts: [reviews], gateways: [egw, mesh], http: [{route: [{destination: {host: reviews}}]}]}", None),
    // ValidateVirtualService: "http, tcp or tls must be provided in virtual service".
    (VS, "vs", "{hosts: [a.example.com]}", Some(("spec", "http, tcp or tls must be provided"))),
    // ValidateVirtualService: without hosts it is a delegate, which names no gateways.
    (VS, "vs", "{gateways: [mesh], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.gateways", "delegate virtual service must have no gateways"))),
    // ValidateWildcardDomain on each host.
    (VS, "vs", "{hosts: [Bad_Host.example.com], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.hosts[0]", "is invalid"))),
    // ValidateVirtualService: "wildcard host * is not allowed for virtual services bound to the mesh gateway".
    (VS, "vs", "{hosts: ['*'], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.hosts[0]", "wildcard host * is not allowed"))),
    // ValidateVirtualService: `*` is allowed when bound to gateways only.
    (VS, "vs", "{hosts: ['*'], gateways: [istio-system/egw], http: [{route: [{destination: {host: a.example.com}}]}]}", None),
    // ValidateVirtualService: "duplicate hosts in virtual service" (a wildcard overlapping a name).
    (VS, "vs", "{hosts: [a.example.com, '*.example.com'], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.hosts[0]", "duplicate hosts"))),
    // validateGatewayNames: "invalid value for gateway name".
    (VS, "vs", "{hosts: [a.example.com], gateways: [istio-system/Bad_Name], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.gateways[0]", "invalid value for gateway name"))),
    // validateGatewayNames: "config namespace and gateway name cannot be empty".
    (VS, "vs", "{hosts: [a.example.com], gateways: [istio-system/], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.gateways[0]", "cannot be empty"))),
    // validateGatewayNames -> ValidateFQDN: a short gateway name has no wildcard.
    (VS, "vs", "{hosts: [a.example.com], gateways: ['*'], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.gateways[0]", "wildcard"))),
    // validateHTTPRouteConflict: "HTTP route, redirect or direct_response is required".
    (VS, "vs", "{hosts: [a.example.com], http: [{match: [{port: 80}]}]}", Some(("spec.http[0].route", "redirect or direct_response is required"))),
    // validateHTTPRouteConflict: a redirect alone is a complete route.
    (VS, "vs", "{hosts: [a.example.com], http: [{redirect: {uri: /v2}}]}", None),
    // validateHTTPRouteConflict: "HTTP route cannot contain both route and redirect".
    (VS, "vs", "{hosts: [a.example.com], http: [{redirect: {uri: /v2}, route: [{destination: {host: a.example.com}}]}]}", Some(("spec.http[0]", "both route and redirect"))),
    // validateHTTPDirectResponse -> validateHTTPStatus.
    (VS, "vs", "{hosts: [a.example.com], http: [{directResponse: {status: 700}}]}", Some(("spec.http[0].directResponse.status", "not in range"))),
    // validateHTTPRouteConflict: a root route delegates and does nothing else.
    (VS, "vs", "{hosts: [a.example.com], http: [{delegate: {name: d}, route: [{destination: {host: a.example.com}}]}]}", Some(("spec.http[0].route", "root HTTP route"))),
    // validateHTTPRouteDestinations: "destination is required".
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{weight: 100}]}]}", Some(("spec.http[0].route[0].destination", "destination is required"))),
    // validateDestination -> ValidateWildcardDomain: the host is required.
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{destination: {subset: v1}}]}]}", Some(("spec.http[0].route[0].destination.host", "host is required"))),
    // validateDestination: "invalid destination host *".
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{destination: {host: '*'}}]}]}", Some(("spec.http[0].route[0].destination.host", "invalid destination host"))),
    // validateSubsetName: "subset name is invalid".
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{destination: {host: a.example.com, subset: V1}}]}]}", Some(("spec.http[0].route[0].destination.subset", "subset name is invalid"))),
    // validatePortSelector -> ValidatePort.
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{destination: {host: a.example.com, port: {number: 70000}}}]}]}", Some(("spec.http[0].route[0].destination.port.number", "1..65535"))),
    // validateWeight: "weight %d < 0".
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{destination: {host: a.example.com}, weight: -1}]}]}", Some(("spec.http[0].route[0].weight", "< 0"))),
    // validateHTTPRouteDestinations: "total destination weight = 0".
    (VS, "vs", "{hosts: [a.example.com], http: [{route: [{destination: {host: a.example.com}}, {destination: {host: b.example.com}}]}]}", Some(("spec.http[0].route", "total destination weight = 0"))),
    // validateHTTPRouteMatchRequest -> validateGatewayNames on match.gateways.
    (VS, "vs", "{hosts: [a.example.com], http: [{match: [{gateways: [bad_gw]}], route: [{destination: {host: a.example.com}}]}]}", Some(("spec.http[0].match[0].gateways[0]", "is invalid"))),
    // validateHTTPRouteMatchRequest: "sourceNamespace match %s is invalid".
    (VS, "vs", "{hosts: [a.example.com], http: [{match: [{sourceNamespace: Shop}], route: [{destination: {host: a.example.com}}]}]}", Some(("spec.http[0].match[0].sourceNamespace", "is invalid"))),
    // validateHTTPRouteMatchRequest -> ValidatePort on match.port.
    (VS, "vs", "{hosts: [a.example.com], http: [{match: [{port: 70000}], route: [{destination: {host: a.example.com}}]}]}", Some(("spec.http[0].match[0].port", "1..65535"))),
    // validateTLSRoute: the egress-gateway task's passthrough route from the mesh.
    (VS, "vs", "{hosts: [a.example.com], gateways: [mesh], tls: [{match: [{port: 443, sniHosts: [a.example.com]}], route: [{destination: {host: egw.istio-system.svc.cluster.local, port: {number: 443}}}]}]}", None),
    // validateTLSRoute: "TLS route must have at least one match condition".
    (VS, "vs", "{hosts: [a.example.com], tls: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.tls[0].match", "at least one match condition"))),
    // validateTLSMatch: "TLS match must have at least one SNI host".
    (VS, "vs", "{hosts: [a.example.com], tls: [{match: [{port: 443}], route: [{destination: {host: a.example.com}}]}]}", Some(("spec.tls[0].match[0].sniHosts", "at least one SNI host"))),
    // validateSniHost: "SNI host %q is not a compatible subset of any of the virtual service hosts".
    (VS, "vs", "{hosts: [a.example.com], tls: [{match: [{sniHosts: [b.example.com]}], route: [{destination: {host: a.example.com}}]}]}", Some(("spec.tls[0].match[0].sniHosts[0]", "not a compatible subset"))),
    // validateSniHost: a name under a wildcard host is a subset of it.
    (VS, "vs", "{hosts: ['*.example.com'], tls: [{match: [{sniHosts: [b.example.com]}], route: [{destination: {host: b.example.com}}]}]}", None),
    // validateTLSRoute: "TLS route is required".
    (VS, "vs", "{hosts: [a.example.com], tls: [{match: [{sniHosts: [a.example.com]}]}]}", Some(("spec.tls[0].route", "TLS route is required"))),
    // validateTCPRoute: "TCP route is required".
    (VS, "vs", "{hosts: [a.example.com], tcp: [{match: [{port: 5432}]}]}", Some(("spec.tcp[0].route", "TCP route is required"))),
    // validateTCPMatch -> ValidateIPSubnet.
    (VS, "vs", "{hosts: [a.example.com], tcp: [{match: [{destinationSubnets: [10.0.0.0/33]}], route: [{destination: {host: a.example.com}}]}]}", Some(("spec.tcp[0].match[0].destinationSubnets[0]", "not a valid"))),
    // validateExportTo -> visibility.Validate: "exportTo ~ (none) is not allowed".
    (VS, "vs", "{hosts: [a.example.com], exportTo: ['~'], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.exportTo", "not allowed for Istio configuration objects"))),
    // validateExportTo: "duplicate entries in exportTo: . and current namespace".
    (VS, "vs", "{hosts: [a.example.com], exportTo: ['.', default], http: [{route: [{destination: {host: a.example.com}}]}]}", Some(("spec.exportTo", "duplicate entries"))),

    // ValidateDestinationRule: the seed's DestinationRule (a subset without labels).
    (DR, "dr", SEED_DR, None),
    // ValidateDestinationRule -> ValidateWildcardDomain accepts `*`.
    (DR, "dr", "{host: '*', trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}}}", None),
    // ValidateDestinationRule -> ValidateWildcardDomain: "empty domain name not allowed".
    (DR, "dr", "{subsets: [{name: v1}]}", Some(("spec.host", "not a valid DNS name"))),
    // ValidateDestinationRule: "duplicate subset names".
    (DR, "dr", "{host: a.example.com, subsets: [{name: v1}, {name: v1}]}", Some(("spec.subsets[1].name", "duplicate subset names"))),
    // validateSubset -> validateSubsetName: "subset name cannot be empty".
    (DR, "dr", "{host: a.example.com, subsets: [{labels: {version: v1}}]}", Some(("spec.subsets[0].name", "cannot be empty"))),
    // validateSubset -> validateSubsetName: a DNS-1123 label.
    (DR, "dr", "{host: a.example.com, subsets: [{name: Wikipedia}]}", Some(("spec.subsets[0].name", "subset name is invalid"))),
    // validateSubset -> labels.Instance.Validate.
    (DR, "dr", "{host: a.example.com, subsets: [{name: v1, labels: {-version: v1}}]}", Some(("spec.subsets[0].labels.-version", "not a valid label key"))),
    // validateTrafficPolicy: "traffic policy must have at least one field".
    (DR, "dr", "{host: a.example.com, trafficPolicy: {}}", Some(("spec.trafficPolicy", "at least one field"))),
    // ClientTLSSettings.TLSmode: a value outside the enum.
    (DR, "dr", "{host: a.example.com, trafficPolicy: {tls: {mode: STRICT}}}", Some(("spec.trafficPolicy.tls.mode", "unknown TLS mode"))),
    // ValidateTLS: "client certificate required for mutual tls".
    (DR, "dr", "{host: a.example.com, trafficPolicy: {tls: {mode: MUTUAL, privateKey: /k.pem}}}", Some(("spec.trafficPolicy.tls.clientCertificate", "client certificate required"))),
    // validatePortTrafficPolicies: "portTrafficPolicy must have valid port".
    (DR, "dr", "{host: a.example.com, trafficPolicy: {portLevelSettings: [{tls: {mode: DISABLE}}]}}", Some(("spec.trafficPolicy.portLevelSettings[0].port", "must have valid port"))),
    // validatePortTrafficPolicies: "port traffic policy must have at least one field".
    (DR, "dr", "{host: a.example.com, trafficPolicy: {portLevelSettings: [{port: {number: 80}}]}}", Some(("spec.trafficPolicy.portLevelSettings[0]", "at least one field"))),
    // validateSubset -> validateTrafficPolicy: the egress TLS-origination task's subset.
    (DR, "dr", "{host: egw.istio-system.svc.cluster.local, subsets: [{name: cnn, trafficPolicy: {portLevelSettings: [{port: {number: 80}, tls: {mode: ISTIO_MUTUAL, sni: edition.cnn.com}}]}}]}", None),
    // validateExportTo: "destination rule with workload selector cannot have exportTo beyond current namespace".
    (DR, "dr", "{host: a.example.com, workloadSelector: {matchLabels: {app: web}}, exportTo: [shop], subsets: [{name: v1}]}", Some(("spec.exportTo", "beyond current namespace"))),
];

#[test]
fn validation_table() {
    assert!(CASES.len() >= 24);
    for (i, (kind, name, spec, want)) in CASES.iter().enumerate() {
        let found = problems(kind, name, spec);
        let errors: Vec<&Problem> = found.iter().filter(|p| p.is_error()).collect();
        match want {
            None => assert!(
                errors.is_empty(),
                "case {i} ({kind} {spec}) should be valid: {errors:?}"
            ),
            Some((field, fragment)) => {
                assert!(
                errors.iter().any(|p| p.field == *field && p.message.contains(fragment)),
                "case {i} ({kind} {spec}) wanted an error at {field} with {fragment:?}: {found:?}"
            )
            }
        }
        for p in &found {
            assert_eq!(
                (p.file.as_str(), p.object.as_str()),
                ("r.yaml", format!("{kind} default/{name}").as_str())
            );
        }
    }
}

fn warnings(kind: &str, spec: &str) -> Vec<(String, String)> {
    let found = problems(kind, "x", spec);
    assert!(found.iter().all(|p| !p.is_error()), "{found:?}");
    found.into_iter().map(|p| (p.field, p.message)).collect()
}

#[test]
fn the_seeds_port_beside_match_only_warns() {
    let found = warnings(VS, SEED_VS);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "spec.http[1].port");
    assert!(found[0]
        .1
        .contains("unknown field \"port\" in an HTTP route"));
}

#[test]
fn fields_istio_has_but_enforcer_does_not_type_do_not_warn() {
    let spec = "{hosts: [a.example.com], http: [{match: [{uri: {prefix: /v1}, headers: {x-user: {exact: a}}}], timeout: 5s, retries: {attempts: 2}, rewrite: {uri: /}, route: [{destination: {host: a.example.com}}]}]}";
    assert_eq!(warnings(VS, spec), []);
}

#[test]
fn an_unknown_field_in_a_match_warns() {
    let spec = "{hosts: [a.example.com], http: [{match: [{prot: 80}], route: [{destination: {host: a.example.com}}]}]}";
    let found = warnings(VS, spec);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "spec.http[0].match[0].prot");
}

#[test]
fn a_legacy_gateway_name_warns_with_the_preferred_form() {
    let spec = "{hosts: [a.example.com], gateways: [egw.istio-system.svc.cluster.local], http: [{route: [{destination: {host: a.example.com}}]}]}";
    let found = warnings(VS, spec);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].1.contains("\"istio-system/egw\""), "{found:?}");
}

#[test]
fn an_ip_as_sni_host_warns() {
    let spec = "{hosts: [a.example.com], tls: [{match: [{sniHosts: [192.0.2.1]}], route: [{destination: {host: a.example.com}}]}]}";
    let found = warnings(VS, spec);
    assert_eq!(found[0].0, "spec.tls[0].match[0].sniHosts[0]");
}

#[test]
fn passthrough_written_on_an_http_server_warns() {
    let spec = "{servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [a.example.com], tls: {mode: PASSTHROUGH}}]}";
    let found = warnings(GW, spec);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "spec.servers[0].tls.mode");
}

#[test]
fn an_object_with_an_error_is_dropped_by_check() {
    let yaml = format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr}}\nspec: {{subsets: [{{name: v1}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec: {SEED_VS}\n");
    let checked = crate::policy::check::check(parse_documents("r.yaml", &yaml));
    assert!(checked.destination_rules.is_empty());
    assert_eq!(
        checked.virtual_services.len(),
        1,
        "a warning keeps the object"
    );
}
