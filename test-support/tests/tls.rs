//! Self-tests of `TestPki` and the TLS probes against a tiny tokio-rustls server that picks
//! its certificate by SNI and offers ALPN h2 and http/1.1.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::ResolvesServerCertUsingSni;
use rustls::sign::CertifiedKey;
use test_support::tls::{self, ProbeOptions, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn certified_key(pki: &TestPki, names: &[&str]) -> CertifiedKey {
    let (cert, key) = pki.issue(names);
    let chain = tls::certs_from_pem(&format!("{cert}{}", pki.ca_pem()));
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider()).unwrap()
}

/// Serves TLS with `config` on 127.0.0.1:0, answering every request `200 ok` over HTTP/1.1.
async fn tls_server(config: rustls::ServerConfig) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Failed handshakes are part of the tests.
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

fn sni_server_config(pki: &TestPki) -> rustls::ServerConfig {
    let mut resolver = ResolvesServerCertUsingSni::new();
    resolver
        .add(
            "ehr.example.test",
            certified_key(pki, &["ehr.example.test"]),
        )
        .unwrap();
    resolver
        .add(
            "portal.example.test",
            certified_key(pki, &["portal.example.test", "*.modules.example.test"]),
        )
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

// The probes block; the server runs on this runtime, so it needs a second worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_see_the_certificate_chosen_by_sni_and_alpn() {
    let pki = TestPki::new();
    let addr = tls_server(sni_server_config(&pki)).await;

    let names = tokio::task::spawn_blocking(move || {
        (
            tls::fetch_peer_cert_names(addr, "ehr.example.test"),
            tls::fetch_peer_cert_names(addr, "portal.example.test"),
            tls::negotiated_alpn(addr, "ehr.example.test"),
            tls::probe_tls(addr, "unknown.example.test", &ProbeOptions::default()),
        )
    })
    .await
    .unwrap();
    assert_eq!(names.0, ["ehr.example.test"]);
    assert_eq!(names.1, ["portal.example.test", "*.modules.example.test"]);
    assert_eq!(names.2.as_deref(), Some(&b"h2"[..]));
    let unknown = names.3.expect_err("no certificate for an unknown name");
    assert!(unknown.contains("unknown.example.test"), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_version_and_verifies_against_a_ca() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let addr = tls_server(sni_server_config(&pki)).await;
    let ca = pki.ca_pem().to_string();
    let other_ca = other.ca_pem().to_string();

    let (tls12, verified, wrong_ca) = tokio::task::spawn_blocking(move || {
        let tls12 = tls::probe_tls(
            addr,
            "ehr.example.test",
            &ProbeOptions {
                versions: vec![&rustls::version::TLS12],
                alpn: vec![b"http/1.1".to_vec()],
                ..ProbeOptions::default()
            },
        );
        let verified = tls::probe_tls(
            addr,
            "ehr.example.test",
            &ProbeOptions {
                ca_pem: Some(ca),
                ..ProbeOptions::default()
            },
        );
        let wrong_ca = tls::probe_tls(
            addr,
            "ehr.example.test",
            &ProbeOptions {
                ca_pem: Some(other_ca),
                ..ProbeOptions::default()
            },
        );
        (tls12, verified, wrong_ca)
    })
    .await
    .unwrap();
    let tls12 = tls12.unwrap();
    assert_eq!(tls12.version, "TLSv1_2");
    assert_eq!(tls12.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(tls12.chain_len, 2);
    assert_eq!(verified.unwrap().version, "TLSv1_3");
    let wrong_ca = wrong_ca.expect_err("a foreign CA must not verify");
    assert!(wrong_ca.contains("UnknownIssuer"), "{wrong_ca}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_client_trusts_the_ca_and_ip_sans_are_reported() {
    let pki = TestPki::new();
    let addr = tls_server(sni_server_config(&pki)).await;
    let client = tls::https_client_builder(pki.ca_pem())
        .http1_only()
        .resolve("ehr.example.test", addr)
        .build()
        .unwrap();
    let response = client
        .get(format!("https://ehr.example.test:{}/", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");

    // A plain HTTPS client rejects the test CA.
    let untrusting = test_support::http::client_builder()
        .resolve("ehr.example.test", addr)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("https://ehr.example.test:{}/", addr.port()))
        .send()
        .await
        .is_err());

    let ip_addr = tls_server(pki.server_config(&["127.0.0.1", "localhost"])).await;
    let peer = tokio::task::spawn_blocking(move || {
        // An IP as "SNI" sends no SNI extension; the single-cert server answers anyway.
        tls::probe_tls(ip_addr, "127.0.0.1", &ProbeOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(peer.dns_names, ["localhost"]);
    assert_eq!(peer.ip_addrs, [std::net::IpAddr::from([127, 0, 0, 1])]);
}

#[test]
fn write_pair_writes_chain_and_key_and_expired_certs_are_rejected() {
    let pki = TestPki::new();
    let dir = test_support::temp_dir();
    let (crt, key) = pki.write_pair(dir.path(), "ehr", &["ehr.example.test"]);
    assert_eq!(crt, dir.path().join("ehr.crt"));
    let chain = tls::certs_from_pem(&std::fs::read_to_string(&crt).unwrap());
    assert_eq!(chain.len(), 2, "leaf then CA");
    PrivateKeyDer::from_pem_file(&key).expect("key PEM");
    assert_eq!(
        std::fs::read_to_string(pki.write_ca(dir.path())).unwrap(),
        pki.ca_pem()
    );
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["ca.crt", "ehr.crt", "ehr.key"],
        "no temp files left"
    );

    let (expired, _) = pki.issue_expired(&["old.example.test"]);
    let der = &tls::certs_from_pem(&expired)[0];
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(tls::certs_from_pem(pki.ca_pem())[0].clone())
        .unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let err = verifier
        .verify_server_cert(
            der,
            &[],
            &rustls::pki_types::ServerName::try_from("old.example.test").unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect_err("expired");
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
}
