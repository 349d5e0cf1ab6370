//! Routing, path safety, forwarding headers, protocols and limits, through the real binary.
mod common;

use common::*;
use test_support::{
    http::{raw_request, status_of},
    EchoBackend, PhpServer,
};

fn three_modules() -> (EchoBackend, EchoBackend, EchoBackend, String) {
    let core = EchoBackend::start("core-1");
    let portal = EchoBackend::start("portal-1");
    let labs = EchoBackend::start("labs-1");
    let deny = r#"deny = ["/sites/*/documents/**", "/sql/**", "**/*.sql", "**/*.inc"]"#;
    let modules = [
        module(
            "core",
            &["/"],
            &[core.addr()],
            &format!("{deny}\n{NO_HEALTH}"),
        ),
        module("portal", &["/patient_portal"], &[portal.addr()], NO_HEALTH),
        module("labs", &["/modules/labs"], &[labs.addr()], NO_HEALTH),
    ]
    .join("\n");
    (core, portal, labs, modules)
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_longest_prefix_on_segment_boundaries() {
    let (_core, _portal, _labs, modules) = three_modules();
    let space = Space::start(&modules);
    let c = client();
    for (path, want) in [
        ("/", "core-1"),
        ("/interface/main/main.php", "core-1"),
        ("/patient_portal", "portal-1"),
        ("/patient_portal/home.php?x=1", "portal-1"),
        ("/patient_portalx/home.php", "core-1"),
        ("/modules/labs/orders", "labs-1"),
        ("/modules/lab", "core-1"),
    ] {
        let (status, instance) = get_instance(&c, &space.url(path)).await;
        assert_eq!((status, instance.as_str()), (200, want), "GET {path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_pass_through_unchanged_unless_strip_prefix() {
    let portal = EchoBackend::start("portal");
    let api = EchoBackend::start("api");
    let modules = [
        module("portal", &["/patient_portal"], &[portal.addr()], NO_HEALTH),
        module(
            "api",
            &["/api"],
            &[api.addr()],
            &format!("strip_prefix = true\n{NO_HEALTH}"),
        ),
    ]
    .join("\n");
    let space = Space::start(&modules);
    let c = client();
    c.get(space.url("/patient_portal/a.php?q=1"))
        .send()
        .await
        .unwrap();
    c.get(space.url("/api/v1/x?q=2")).send().await.unwrap();
    c.get(space.url("/api")).send().await.unwrap();
    assert_eq!(portal.requests()[0].path, "/patient_portal/a.php?q=1");
    let api_paths: Vec<_> = api.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(api_paths, vec!["/v1/x?q=2", "/"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_host_before_path() {
    let core = EchoBackend::start("core");
    let clinic = EchoBackend::start("clinic");
    let wild = EchoBackend::start("wild");
    let modules = [
        module("core", &["/"], &[core.addr()], NO_HEALTH),
        module(
            "clinic",
            &["/"],
            &[clinic.addr()],
            &format!("hosts = [\"clinic.example.test\"]\n{NO_HEALTH}"),
        ),
        module(
            "tenants",
            &["/"],
            &[wild.addr()],
            &format!("hosts = [\"*.tenants.test\"]\n{NO_HEALTH}"),
        ),
    ]
    .join("\n");
    let space = Space::start(&modules);
    for (host, want) in [
        ("clinic.example.test", "clinic"),
        ("CLINIC.example.test:8080", "clinic"),
        ("a.tenants.test", "wild"),
        ("a.b.tenants.test", "core"),
        ("other.test", "core"),
    ] {
        let raw = raw_request(
            space.http,
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status_of(&raw), 200, "{host}: {raw}");
        assert!(
            raw.contains(&format!("\"instance\":\"{want}\"")),
            "Host {host} should reach {want}: {raw}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_rules_and_traversal_never_reach_the_backend() {
    let (core, portal, _labs, modules) = three_modules();
    let space = Space::start(&modules);
    let denied = [
        "/sites/default/documents/1/x.pdf",
        "/sites/default/documents",
        "/sql/database.sql",
        "/library/globals.inc",
        "/patient_portal/../sites/default/documents/x",
        "/patient_portal/%2e%2e/sites/default/documents/x",
        "/patient_portal/%2E%2E/sites/default/documents/x",
        "//sites//default//documents//x",
        "/./sites/./default/documents/x",
        "/patient_portal/x/../../sites/default/documents/x",
        "/patient_portal\\..\\sites\\default\\documents\\x",
    ];
    for path in denied {
        let raw = raw_request(
            space.http,
            format!("GET {path} HTTP/1.1\r\nHost: ehr.test\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = status_of(&raw);
        assert!(
            status == 404 || status == 400,
            "{path} answered {status}: {raw}"
        );
    }
    for path in [
        "/../etc/passwd",
        "/patient_portal/../../etc/passwd",
        "/a%2fb",
        "/a%00b",
        "/a%zz",
    ] {
        let raw = raw_request(
            space.http,
            format!("GET {path} HTTP/1.1\r\nHost: ehr.test\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status_of(&raw), 400, "{path}: {raw}");
    }
    assert_eq!(core.request_count(), 0, "core saw {:?}", core.requests());
    assert_eq!(portal.request_count(), 0);

    // A normalized path that is allowed is forwarded in its normalized form.
    let raw = raw_request(space.http, "GET /patient_portal/./a//b.php?x=1 HTTP/1.1\r\nHost: ehr.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(portal.requests()[0].path, "/patient_portal/a/b.php?x=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_sees_forwarding_headers_and_request_id() {
    let core = EchoBackend::start("core");
    let space = Space::start(&module("core", &["/"], &[core.addr()], NO_HEALTH));
    let c = client();

    let r = c
        .get(space.url("/a"))
        .header("host", "ehr.example.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.test")
        .header("x-request-id", "client-id-123")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-123");
    let seen = &core.requests()[0];
    assert_eq!(seen.header("host"), Some("ehr.example.test"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("ehr.example.test"));
    assert_eq!(seen.header("x-request-id"), Some("client-id-123"));
    assert_eq!(
        seen.header("x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );

    // A malformed id is replaced, and the new one is returned to the client.
    let r = c
        .get(space.url("/b"))
        .header("x-request-id", "bad id <script>")
        .send()
        .await
        .unwrap();
    let returned = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(returned.len(), 32);
    assert_eq!(
        core.requests()[1].header("x-request-id"),
        Some(returned.as_str())
    );

    // Over TLS the backend is told https.
    let tls = test_support::tls::https_client(space.pki.ca_pem());
    let r = tls.get(space.https_url("/c")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        core.requests()[2].header("x-forwarded-proto"),
        Some("https")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxy_chain_is_kept() {
    let core = EchoBackend::start("core");
    let space = Space::start_with(
        &module("core", &["/"], &[core.addr()], NO_HEALTH),
        "trusted_proxies = [\"127.0.0.0/8\"]",
    );
    client()
        .get(space.url("/"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let seen = &core.requests()[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_over_tls_and_h2c() {
    let core = EchoBackend::start("core");
    let api = EchoBackend::start("api");
    let space = Space::start(&format!(
        "{}\n{}",
        module("core", &["/"], &[core.addr()], NO_HEALTH),
        module(
            "api",
            &["/api"],
            &[api.addr()],
            &format!("strip_prefix = true\n{NO_HEALTH}")
        )
    ));

    let tls = test_support::tls::https_client(space.pki.ca_pem());
    let r = tls.get(space.https_url("/tls")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(
        test_support::tls::negotiated_alpn(space.https, "localhost").as_deref(),
        Some(&b"h2"[..])
    );

    let h2c = test_support::http::h2c_client();
    let r = h2c.get(space.url("/h2c")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    // Both reached the HTTP/1.1 backend with a Host header.
    assert_eq!(
        core.requests()[0].header("host"),
        Some(&*format!("localhost:{}", space.https.port()))
    );
    assert!(core.requests()[1].header("host").is_some());

    // A rewritten path (strip_prefix) keeps the HTTP/2 request's host.
    let r = tls.get(space.https_url("/api/v1/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = &api.requests()[0];
    assert_eq!(seen.path, "/v1/x");
    assert_eq!(
        seen.header("host"),
        Some(&*format!("localhost:{}", space.https.port()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_chooses_between_certificates() {
    let core = EchoBackend::start("core");
    let space = Space::start(&module("core", &["/"], &[core.addr()], NO_HEALTH));
    space
        .pki
        .write_pair(&space.cert_dir(), "ehr", &["ehr.example.test"]);
    space
        .pki
        .write_pair(&space.cert_dir(), "portal", &["*.portal.example.test"]);
    test_support::assert_eventually!(
        test_support::tls::fetch_peer_cert_names(space.https, "ehr.example.test")
            == vec!["ehr.example.test".to_string()]
    );
    assert_eq!(
        test_support::tls::fetch_peer_cert_names(space.https, "clinic.portal.example.test"),
        vec!["*.portal.example.test".to_string()]
    );
    // Unknown names get the default certificate.
    assert_eq!(
        test_support::tls::fetch_peer_cert_names(space.https, "unknown.test"),
        vec!["localhost".to_string()]
    );
    // And the request works end to end under the chosen name.
    let tls = test_support::tls::https_client_builder(space.pki.ca_pem())
        .resolve("ehr.example.test", space.https)
        .build()
        .unwrap();
    let r = tls
        .get(format!("https://ehr.example.test:{}/", space.https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn body_limits_refuse_with_413_and_large_uploads_stream() {
    let small = EchoBackend::start("small");
    let big = EchoBackend::start("big");
    let modules = [
        module(
            "small",
            &["/"],
            &[small.addr()],
            &format!("max_body_size = \"1MiB\"\n{NO_HEALTH}"),
        ),
        module(
            "uploads",
            &["/uploads"],
            &[big.addr()],
            &format!("max_body_size = \"200MiB\"\n{NO_HEALTH}"),
        ),
    ]
    .join("\n");
    let space = Space::start(&modules);
    let c = client();

    // Declared too large: refused before anything is forwarded. SPACE reads and discards the
    // body it refused (lingering close), so the client gets the 413, not a connection reset.
    let r = c
        .post(space.url("/form"))
        .body(vec![b'x'; 2 * 1024 * 1024])
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => panic!("expected a 413 answer, got {e:?}"),
    }
    // Chunked (no Content-Length) and too large: cut off at the limit with 413.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..40)
        .map(|_| Ok(bytes::Bytes::from(vec![b'y'; 64 * 1024])))
        .collect();
    let r = c
        .post(space.url("/stream"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => panic!("expected a 413 answer to the streamed body, got {e}"),
    }
    assert!(small.requests().iter().all(|r| r.body_len <= 1024 * 1024));

    // 100 MB where allowed streams through.
    let total: u64 = 100 * 1000 * 1000;
    let chunk = bytes::Bytes::from(vec![b'z'; 1000 * 1000]);
    let stream =
        futures_util::stream::iter((0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = c
        .post(space.url("/uploads/backup.sql.gz"))
        .header("content-length", total)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["body_len"].as_u64(), Some(total));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431() {
    let core = EchoBackend::start("core");
    let space = Space::start_with(
        &module("core", &["/"], &[core.addr()], NO_HEALTH),
        "max_header_size = \"8KiB\"",
    );
    let big = "a".repeat(10 * 1024);
    let raw = raw_request(
        space.http,
        format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: c={big}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status_of(&raw), 431, "{raw}");
    let raw = raw_request(
        space.http,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 200);
    assert_eq!(core.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn php_sessions_work_through_the_proxy() {
    let php = PhpServer::start("php-1");
    let space = Space::start(&module("portal", &["/"], &[php.addr()], NO_HEALTH));
    let c = test_support::http::cookie_client();
    for expected in 1..=5 {
        let v: serde_json::Value = c
            .get(space.url("/counter.php"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["counter"].as_i64(), Some(expected), "{v}");
        assert_eq!(v["instance"], "php-1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_route_is_404_and_admin_reports_routes() {
    let labs = EchoBackend::start("labs");
    let space = Space::start(&module(
        "labs",
        &["/modules/labs"],
        &[labs.addr()],
        NO_HEALTH,
    ));
    let r = client().get(space.url("/interface/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (status, routes) = test_support::http::get_json(&space.admin_url("/api/routes")).await;
    assert_eq!(status, 200);
    assert_eq!(routes["modules"][0]["name"], "labs");
    assert_eq!(routes["modules"][0]["prefixes"][0], "/modules/labs");
    let metrics = space.metrics().await;
    assert!(
        metrics.contains("space_refused_requests_total{module=\"\",reason=\"no_route\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_host_get_an_answer() {
    let core = EchoBackend::start("core");
    let space = Space::start(&module("core", &["/"], &[core.addr()], NO_HEALTH));
    let raw = raw_request(space.http, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&raw), 400, "{raw}");
    // (Longer than the 24-byte HTTP/2 preface that Pingora's h2c detection waits for.)
    let raw = raw_request(
        space.http,
        "GET / HTTP/1.0\r\nUser-Agent: old-client\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    assert_eq!(
        core.requests()[0].header("host"),
        Some(&*core.addr().to_string())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_over_tls_forwards_https_and_replaces_forged_headers() {
    let core = EchoBackend::start("core");
    let space = Space::start(&module("core", &["/"], &[core.addr()], NO_HEALTH));
    let tls = test_support::tls::https_client_builder(space.pki.ca_pem())
        .http1_only()
        .build()
        .unwrap();
    for i in 0..3 {
        let r = tls
            .get(space.https_url(&format!("/chart/{i}?q=1")))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "http")
            .header("forwarded", "for=6.6.6.6")
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_11);
        assert_eq!(r.status(), 200);
        let returned = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let seen = &core.requests()[i];
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("forwarded"), None);
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some(&*format!("localhost:{}", space.https.port()))
        );
        assert_eq!(seen.header("x-request-id"), Some(returned.as_str()));
    }
}
