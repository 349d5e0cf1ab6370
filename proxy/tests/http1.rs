//! SPACE's own HTTP/1.1 loop against a backend that answers byte for byte what each test
//! needs: chunked bodies with trailers, bodies delimited by close, interim responses, HEAD,
//! idle connections the backend closes, broken responses, and pipelined clients.
mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{module, Space, NO_HEALTH};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A backend whose answer is chosen by the request path. Counts the connections it accepted.
struct ScriptedBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl ScriptedBackend {
    async fn start() -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        ScriptedBackend { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads requests (head plus Content-Length body) and answers each by its path.
async fn serve(mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if head.starts_with("POST /early-413 ") {
            // Refuses the upload from its head, as a container's own nginx does past its
            // client_max_body_size, and closes without reading the body.
            let _ = stream
                .write_all(
                    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
                )
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
        buf.drain(..head_end + length);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (answer, then_close): (String, bool) = match path.as_str() {
            "/chunked" => (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
                 5\r\nhello\r\n7;note=x\r\n, chart\r\n0\r\nX-Checksum: 42\r\n\r\n"
                    .into(),
                false,
            ),
            "/until-close" => (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it".into(),
                true,
            ),
            "/interim" => (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                 HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                    .into(),
                false,
            ),
            "/head" => (
                "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".into(),
                false,
            ),
            "/broken" => ("HTTP/1.1 2xx Nonsense\r\n\r\n".into(), true),
            // Answers, then closes without saying so (a backend whose keep-alive ended).
            "/then-close" => (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(),
                true,
            ),
            _ => (
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Echo-Path: {path}\r\n\r\n{body}",
                    body.len()
                ),
                false,
            ),
        };
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if then_close {
            return;
        }
    }
}

/// Sends `request` on a new connection and reads until SPACE closes it.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("SPACE closed the connection after the last response")
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

async fn space_for(backend: &ScriptedBackend) -> Space {
    let m = module("core", &["/"], &[backend.addr], NO_HEALTH);
    tokio::task::spawn_blocking(move || Space::start(&m))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_bodies_pass_through_with_trailers_and_keep_alive() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let out = exchange(
        space.http,
        "GET /chunked HTTP/1.1\r\nHost: ehr\r\n\r\nGET /after HTTP/1.1\r\nHost: ehr\r\nConnection: close\r\n\r\n",
    )
    .await;
    let responses: Vec<&str> = out.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
    assert_eq!(
        responses.len(),
        2,
        "two responses on one connection:\n{out}"
    );
    assert!(responses[0].contains("transfer-encoding: chunked"), "{out}");
    assert!(
        responses[0].ends_with("5\r\nhello\r\n7;note=x\r\n, chart\r\n0\r\nX-Checksum: 42\r\n\r\n"),
        "chunks and trailer arrive unchanged:\n{out}"
    );
    assert!(responses[1].contains("X-Echo-Path: /after"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_delimited_by_close_ends_the_client_connection() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let out = exchange(space.http, "GET /until-close HTTP/1.1\r\nHost: ehr\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\nall of it"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn interim_responses_are_not_relayed() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let out = exchange(
        space.http,
        "GET /interim HTTP/1.1\r\nHost: ehr\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nfinal"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn head_keeps_the_length_and_sends_no_body() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let out = exchange(
        space.http,
        "HEAD /head HTTP/1.1\r\nHost: ehr\r\n\r\nGET /next HTTP/1.1\r\nHost: ehr\r\nConnection: close\r\n\r\n",
    )
    .await;
    let responses: Vec<&str> = out.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
    assert_eq!(
        responses.len(),
        2,
        "two responses on one connection:\n{out}"
    );
    assert!(responses[0].contains("content-length: 1234"), "{out}");
    assert!(
        responses[0].ends_with("\r\n\r\n"),
        "no body after a HEAD answer:\n{out}"
    );
    assert!(responses[1].contains("X-Echo-Path: /next"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let out = exchange(
        space.http,
        "POST /one HTTP/1.1\r\nHost: ehr\r\nContent-Length: 3\r\n\r\nabcGET /two HTTP/1.1\r\nHost: ehr\r\n\r\nGET /three HTTP/1.1\r\nHost: ehr\r\nConnection: close\r\n\r\n",
    )
    .await;
    let one = out.find("X-Echo-Path: /one").expect("first answered");
    let two = out.find("X-Echo-Path: /two").expect("second answered");
    let three = out.find("X-Echo-Path: /three").expect("third answered");
    assert!(one < two && two < three, "{out}");
    assert!(
        out.contains("\r\n\r\nabc"),
        "the first body reached the backend:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_connection_closed_while_idle_is_replaced_without_an_error() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let client = test_support::http::client();
    for i in 0..10 {
        let r = client
            .get(space.url("/then-close"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    // Each answer ended the backend connection, so each request needed a new one.
    assert!(backend.connections() >= 10, "{}", backend.connections());
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_connections_are_reused() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let client = test_support::http::client();
    for _ in 0..50 {
        let r = client.get(space.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert!(
        backend.connections() <= 4,
        "50 sequential requests should share a few backend connections, used {}",
        backend.connections()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_that_does_not_parse_is_a_502() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let out = exchange(space.http, "GET /broken HTTP/1.1\r\nHost: ehr\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
    assert!(out.contains("x-request-id: "), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shortest_http1_request_is_answered_with_h2c_on() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    // 18 bytes: shorter than the HTTP/2 preface SPACE tells HTTP/2 apart by.
    let out = exchange(space.http, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1."), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_refuses_an_upload_early_is_heard() {
    let backend = ScriptedBackend::start().await;
    let space = space_for(&backend).await;
    let r = test_support::http::client()
        .post(space.url("/early-413"))
        .body(vec![b'x'; 8 * 1024 * 1024])
        .send()
        .await
        .unwrap_or_else(|e| panic!("expected the backend's 413, got {e:?}"));
    assert_eq!(r.status(), 413, "the backend's answer, not a 502");
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(r.text().await.unwrap(), "too large");
    // The connection that carried the unread upload is not reused; the next request works.
    let r = test_support::http::client()
        .get(space.url("/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
