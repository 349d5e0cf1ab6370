//! Self-tests of `EchoBackend`: the JSON answer, special paths, health toggle, stop/restart,
//! streaming a 100 MB body, raw request targets and h2c.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use test_support::http::{self, RawResponse};
use test_support::EchoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn answers_with_a_description_of_the_request() {
    let backend = EchoBackend::start("echo-a");
    let response = http::client()
        .post(format!("{}/hello/world?x=1&y=2", backend.url()))
        .header("X-Multi", "one")
        .header("X-Multi", "two")
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-echo-instance"], "echo-a");
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["instance"], "echo-a");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/hello/world?x=1&y=2");
    assert_eq!(
        json["headers"]["x-multi"],
        serde_json::json!(["one", "two"])
    );
    assert_eq!(json["headers"]["host"][0], backend.addr().to_string());
    assert_eq!(json["body_len"], 5);
    assert_eq!(json["version"], "HTTP/1.1");

    assert_eq!(backend.request_count(), 1);
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/hello/world?x=1&y=2");
    assert_eq!(seen[0].header("x-multi"), Some("one"));
    backend.join();
}

#[tokio::test]
async fn special_paths_status_slow_and_set_cookie() {
    let backend = EchoBackend::start("special");
    let client = http::client();

    let teapot = client
        .get(format!("{}/status/418", backend.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(teapot.status(), 418);

    // Matched on the end of the path, so it works behind a route prefix.
    let (status, json) = http::get_json(&format!("{}/portal/status/404", backend.url())).await;
    assert_eq!(status, 404);
    assert_eq!(json["path"], "/portal/status/404");

    let empty = client
        .get(format!("{}/status/204", backend.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 204);
    assert!(empty.bytes().await.unwrap().is_empty());

    let (status, json) = http::get_json(&format!("{}/reports/slow?ms=200", backend.url())).await;
    assert_eq!(status, 200);
    assert_eq!(json["path"], "/reports/slow?ms=200");

    let cookies = client
        .get(format!("{}/set-cookie?a=1&b=two", backend.url()))
        .send()
        .await
        .unwrap();
    let set_cookie: Vec<_> = cookies
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(set_cookie, ["a=1; path=/", "b=two; path=/"]);
}

#[tokio::test]
async fn unhealthy_backend_answers_503_to_everything() {
    let backend = EchoBackend::start("sick");
    backend.set_healthy(false);
    let (status, json) = http::get_json(&format!("{}/status/200", backend.url())).await;
    assert_eq!(status, 503);
    assert_eq!(json["instance"], "sick");
    backend.set_healthy(true);
    let (status, _) = http::get_json(&backend.url()).await;
    assert_eq!(status, 200);
    assert_eq!(backend.request_count(), 2);
}

#[test]
fn stop_refuses_connects_and_drops_live_ones_restart_rebinds() {
    let mut backend = EchoBackend::start("killable");
    let addr = backend.addr();

    // A keep-alive connection that has completed one exchange.
    let mut live = TcpStream::connect(addr).unwrap();
    live.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = live.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    backend.stop();
    assert!(!backend.is_running());
    let refused = TcpStream::connect(addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    live.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    match live.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, got {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    backend.restart();
    assert_eq!(backend.addr(), addr);
    let response = http::get_blocking(addr, "/again").unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["instance"], "killable");
}

#[tokio::test]
async fn counts_a_100_mb_streamed_body() {
    const TOTAL: usize = 100 * 1024 * 1024;
    let backend = EchoBackend::start("upload");
    let mut stream = tokio::net::TcpStream::connect(backend.addr())
        .await
        .unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {TOTAL}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..TOTAL / chunk.len() {
        stream.write_all(&chunk).await.unwrap();
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let response = RawResponse::parse(&raw).expect("complete response");
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["body_len"], TOTAL as u64);
    assert_eq!(backend.requests()[0].body_len, TOTAL as u64);
}

#[tokio::test]
async fn raw_requests_keep_targets_that_clients_would_normalize() {
    let backend = EchoBackend::start("raw");
    for target in [
        "/a/../b",
        "//double//slash",
        "/%2e%2e/%2E%2e/etc",
        "/sites/./default/",
        "/a\\..\\b",
    ] {
        let raw = http::raw_request(
            backend.addr(),
            format!("GET {target} HTTP/1.1\r\nHost: ehr\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(http::status_of(&raw), 200, "{raw}");
        let response = RawResponse::parse(raw.as_bytes()).unwrap();
        assert_eq!(response.json()["path"], target);
    }
    // HEAD ends at the headers even though Content-Length is set.
    let head = http::raw_request(
        backend.addr(),
        "HEAD /x HTTP/1.1\r\nHost: ehr\r\n\r\n", // keep-alive: must not wait for EOF
    )
    .await;
    assert_eq!(http::status_of(&head), 200);
}

#[tokio::test]
async fn speaks_h2c_with_prior_knowledge() {
    let backend = EchoBackend::start("h2");
    let response = http::h2c_client()
        .get(format!("{}/over/h2?q=1", backend.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(json["path"], "/over/h2?q=1");
    assert_eq!(json["authority"], backend.addr().to_string());
}

#[test]
fn usable_from_sync_code_with_blocking_helpers() {
    let backend = EchoBackend::start("sync");
    let raw = http::raw_request_blocking(
        backend.addr(),
        "GET /sync HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    let response = RawResponse::parse(raw.as_bytes()).unwrap();
    assert_eq!(response.header("x-echo-instance"), Some("sync"));
    assert_eq!(response.json()["body_len"], 3);
    let posted =
        http::post_json_blocking(backend.addr(), "/p", &serde_json::json!({"k": "v"})).unwrap();
    assert_eq!(posted.json()["body_len"], 9);
}
