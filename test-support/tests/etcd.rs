//! Self-tests of `Etcd`: health, put/get through the JSON gateway by hand (base64 keys), the
//! KV and lease helpers, restart with the same data, stop, and pause/resume.

use std::io::{Read, Write};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};
use test_support::{assert_eventually, http, Etcd};

#[tokio::test]
async fn health_and_put_get_over_the_json_gateway() {
    let etcd = Etcd::start();
    let (status, health) = http::get_json(&format!("{}/health", etcd.endpoint())).await;
    assert_eq!(status, 200);
    assert_eq!(health["health"], "true");

    let client = http::client();
    let key = BASE64.encode("/space/modules/portal");
    let put: Value = client
        .post(format!("{}/v3/kv/put", etcd.endpoint()))
        .json(&json!({ "key": key, "value": BASE64.encode(r#"{"name":"portal"}"#) }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        put["header"]["revision"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= 2
    );

    let range: Value = client
        .post(format!("{}/v3/kv/range", etcd.endpoint()))
        .json(&json!({ "key": key }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let value = BASE64
        .decode(range["kvs"][0]["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(value, br#"{"name":"portal"}"#);
}

#[test]
fn kv_and_lease_helpers() {
    let etcd = Etcd::start();
    let r1 = etcd.put("/space/modules/a", "1");
    let r2 = etcd.put("/space/modules/b", "2");
    assert!(r2 > r1);
    etcd.put("/space/other", "x");
    assert_eq!(etcd.get("/space/modules/a").as_deref(), Some("1"));
    assert_eq!(etcd.get("/space/missing"), None);
    assert_eq!(
        etcd.get_prefix("/space/modules/"),
        [
            ("/space/modules/a".to_string(), "1".to_string()),
            ("/space/modules/b".to_string(), "2".to_string())
        ]
    );
    assert_eq!(etcd.revision(), r2 + 1);

    let lease = etcd.grant_lease(60);
    etcd.put_with_lease(
        "/space/instances/a/i1",
        r#"{"address":"127.0.0.1:1"}"#,
        lease,
    );
    assert!(etcd.get("/space/instances/a/i1").is_some());
    etcd.revoke_lease(lease);
    assert_eq!(etcd.get("/space/instances/a/i1"), None);

    assert_eq!(etcd.delete("/space/modules/a"), 1);
    assert_eq!(etcd.delete_prefix("/space/"), 2);
    etcd.compact(etcd.revision());
}

#[test]
fn restart_keeps_data_and_ports_stop_makes_it_unreachable() {
    let mut etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let revision = etcd.put("/space/modules/core", "v1");

    etcd.stop();
    assert!(!etcd.is_healthy());
    assert!(!test_support::ports::is_listening(etcd.client_addr()));

    etcd.restart();
    assert_eq!(etcd.endpoint(), endpoint);
    assert_eq!(etcd.get("/space/modules/core").as_deref(), Some("v1"));
    assert_eq!(etcd.revision(), revision);
}

#[test]
fn pause_freezes_and_resume_thaws() {
    let mut etcd = Etcd::start();
    etcd.pause();
    assert!(etcd.is_paused());
    // The kernel still accepts the connection, but nobody answers.
    let mut stream = std::net::TcpStream::connect(etcd.client_addr()).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let err = stream
        .read(&mut buf)
        .expect_err("a paused etcd must not answer");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    etcd.resume();
    assert_eventually!(etcd.is_healthy());
}
