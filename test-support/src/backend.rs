//! [`EchoBackend`]: a real HTTP/1.1 (and h2c) upstream on `127.0.0.1:0` that answers every
//! request with JSON describing what it received, for checking what the proxy forwards.
//!
//! Each backend runs its own current-thread tokio runtime on a background thread, so it works
//! the same from sync tests and from `#[tokio::test]` of any flavour.
//!
//! The answer is `{"instance", "method", "path", "headers", "body_len", "authority",
//! "version", "peer"}`,
//! where `path` is the raw request target including the query (never normalized) and
//! `headers` maps lowercased names to arrays of values. The body is read as a stream and only
//! counted, so uploads of hundreds of megabytes are fine.
//!
//! Special paths (matched on the *end* of the path, so `/portal/slow` works behind a route
//! prefix): `…/slow?ms=N` waits N ms before answering, `…/status/N` answers status N,
//! `…/set-cookie?a=1&b=2` adds one `Set-Cookie: name=value; path=/` per query pair.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// How many [`RecordedRequest`]s a backend keeps (oldest dropped first).
const MAX_RECORDED: usize = 1000;

/// One request as the backend saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Raw request target including the query, as sent on the wire (origin form).
    pub path: String,
    /// The URI authority, if the request carried one (HTTP/2 `:authority`, absolute form).
    pub authority: Option<String>,
    /// Header values by lowercased name, in arrival order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Body bytes received.
    pub body_len: u64,
    /// `HTTP/1.1`, `HTTP/2.0`, …
    pub version: String,
    /// The client's (usually the proxy's) address.
    pub peer: SocketAddr,
    /// Set if the body stream failed, e.g. the client went away mid-upload.
    pub body_error: Option<String>,
}

impl RecordedRequest {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|values| values.first())
            .map(String::as_str)
    }
}

#[derive(Debug)]
struct Shared {
    name: String,
    healthy: AtomicBool,
    count: AtomicU64,
    requests: Mutex<VecDeque<RecordedRequest>>,
    panics: Mutex<Vec<String>>,
}

/// A running echo server; see the module docs. Stopped, and its thread joined, on drop.
#[derive(Debug)]
pub struct EchoBackend {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: RuntimeThread,
    serving: Option<Serving>,
}

#[derive(Debug)]
struct Serving {
    stop: oneshot::Sender<()>,
    done: mpsc::Receiver<()>,
}

impl EchoBackend {
    /// Starts a backend named `name` (reported as `"instance"`) on `127.0.0.1:0`.
    pub fn start(name: &str) -> EchoBackend {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a backend on `addr` (e.g. `127.0.0.2:PORT`, to give several backends one port
    /// on different loopback addresses, as DNS-discovered pods have).
    pub fn start_on(name: &str, addr: SocketAddr) -> EchoBackend {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("echo backend {name}: cannot bind {addr}: {e}"));
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let mut backend = EchoBackend {
            shared: Arc::new(Shared {
                name: name.to_string(),
                healthy: AtomicBool::new(true),
                count: AtomicU64::new(0),
                requests: Mutex::new(VecDeque::new()),
                panics: Mutex::new(Vec::new()),
            }),
            addr,
            runtime: RuntimeThread::start(name),
            serving: None,
        };
        backend.serve(listener);
        backend
    }

    /// The listening address (`127.0.0.1:port`); stays the same across [`EchoBackend::restart`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The instance name given to [`EchoBackend::start`].
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// When false, every request is answered `503` (the body is still read and counted).
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Requests received so far (all paths and statuses, including 503s).
    pub fn request_count(&self) -> u64 {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// The last (up to 1000) requests received, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .expect("requests lock")
            .iter()
            .cloned()
            .collect()
    }

    /// True between start/restart and stop.
    pub fn is_running(&self) -> bool {
        self.serving.is_some()
    }

    /// Closes the listener and drops every live connection, like a killed container: new
    /// connects are refused and in-flight requests see the connection close. Returns once
    /// that is done. Idempotent.
    pub fn stop(&mut self) {
        let Some(serving) = self.serving.take() else {
            return;
        };
        let _ = serving.stop.send(());
        serving
            .done
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("echo backend {}: did not stop within 20s", self.name()));
    }

    /// Stops (if running) and listens again on the same port.
    ///
    /// Retries the bind for up to 20 s; panics if the port was taken meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        let start = Instant::now();
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if start.elapsed() >= crate::EVENTUALLY_DEADLINE => panic!(
                    "echo backend {}: cannot rebind {}: {e}",
                    self.name(),
                    self.addr
                ),
                Err(_) => std::thread::sleep(crate::POLL_INTERVAL),
            }
        };
        self.serve(listener);
    }

    /// Stops the backend and panics if any request handler panicked (their panics are
    /// otherwise only reported by `Drop`).
    pub fn join(mut self) {
        self.stop();
        self.check_panics();
    }

    fn check_panics(&self) {
        let panics = std::mem::take(&mut *self.shared.panics.lock().expect("panics lock"));
        if !panics.is_empty() {
            panic!(
                "echo backend {}: request handler panicked: {}",
                self.name(),
                panics.join("; ")
            );
        }
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = mpsc::channel();
        self.runtime
            .handle
            .spawn(accept_loop(listener, self.shared.clone(), stop_rx, done_tx));
        self.serving = Some(Serving {
            stop: stop_tx,
            done: done_rx,
        });
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            self.check_panics();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
    done: mpsc::Sender<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, shared.clone()));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                record_panic(&shared, finished);
            }
        }
    }
    drop(listener);
    connections.abort_all();
    while let Some(finished) = connections.join_next().await {
        record_panic(&shared, finished);
    }
    let _ = done.send(());
}

fn record_panic(shared: &Shared, finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished {
        if e.is_panic() {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".to_string());
            shared.panics.lock().expect("panics lock").push(message);
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move {
            let (response, panicked) =
                match tokio::spawn(handle(request, peer, shared.clone())).await {
                    Ok(response) => (response, None),
                    Err(e) => (
                        text_response(StatusCode::INTERNAL_SERVER_ERROR, "handler panicked"),
                        Some(Err(e)),
                    ),
                };
            if let Some(panicked) = panicked {
                record_panic(&shared, panicked);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    request: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    shared.count.fetch_add(1, Ordering::SeqCst);
    let (parts, mut body) = request.into_parts();

    let mut body_len = 0u64;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_len += data.len() as u64;
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }

    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let record = RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_string()),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers,
        body_len,
        version: format!("{:?}", parts.version),
        peer,
        body_error,
    };
    {
        let mut requests = shared.requests.lock().expect("requests lock");
        if requests.len() >= MAX_RECORDED {
            requests.pop_front();
        }
        requests.push_back(record.clone());
    }

    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let mut status = StatusCode::OK;
    let mut cookies = Vec::new();
    if !shared.healthy.load(Ordering::SeqCst) {
        status = StatusCode::SERVICE_UNAVAILABLE;
    } else if path.ends_with("/slow") {
        let ms = query_pairs(query)
            .find(|(k, _)| *k == "ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(code) = path
        .rsplit_once("/status/")
        .and_then(|(_, code)| code.parse::<u16>().ok())
    {
        status = match StatusCode::from_u16(code) {
            Ok(s) if !s.is_informational() => s,
            _ => return text_response(StatusCode::BAD_REQUEST, "status must be 200..=999"),
        };
    } else if path.ends_with("/set-cookie") {
        cookies = query_pairs(query)
            .map(|(name, value)| format!("{name}={value}; path=/"))
            .collect();
    }

    let body = json!({
        "instance": shared.name,
        "method": record.method,
        "path": record.path,
        "headers": record.headers,
        "body_len": record.body_len,
        "authority": record.authority,
        "version": record.version,
        "peer": record.peer.to_string(),
    });
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-echo-instance", shared.name.as_str());
    for cookie in cookies {
        builder = builder.header("set-cookie", cookie);
    }
    let body = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| text_response(StatusCode::BAD_REQUEST, "bad cookie in query"))
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

/// A current-thread tokio runtime driven by its own OS thread until dropped.
#[derive(Debug)]
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeThread {
    fn start(name: &str) -> RuntimeThread {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("echo-{name}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build echo backend runtime");
                handle_tx
                    .send(runtime.handle().clone())
                    .expect("send runtime handle");
                runtime.block_on(async {
                    let _ = shutdown_rx.await;
                });
            })
            .expect("spawn echo backend thread");
        RuntimeThread {
            handle: handle_rx.recv().expect("echo backend runtime started"),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
