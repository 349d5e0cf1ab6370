//! SPACE's own HTTP/1.1 request loop: the fast path for the requests an EHR sends all day.
//!
//! Pingora's proxy framework spends about 80 thousand instructions on a keep-alive request
//! (docs/benchmarks.md): a boxed request future, header maps built and copied, a connection
//! pool with a task and channels per release, several timers. This loop does the same job
//! for the common request with per-connection buffers: the head is parsed in place, the
//! backend's head is written field by field from it, idle backend connections wait in a
//! thread-local list, and the response head is rewritten into the same output buffer.
//!
//! It serves a request only when everything goes to plan: a head it parses (see
//! [`request::parse`]), a route, no deny rule, a body within the limit, an instance to send
//! it to, a connection to that instance. Otherwise the connection, with every byte already
//! read, is handed to Pingora's request path (`SpaceProxy`), which owns refusals (400, 404,
//! 413, 431, 503), redirects, retries after a failed connect, HTTP/1.0, chunked uploads,
//! `Expect`, upgrades (WebSocket) and HTTP/2. After Pingora finishes a keep-alive request the
//! connection comes back here. Both paths route with the same table, pick instances with the
//! same picker and affinity, write the same forwarding headers and count into the same
//! metrics and access log.
mod deadline;
mod pool;
mod request;
mod response;

use std::{
    borrow::Cow,
    io,
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::{
    apps::{HttpServerApp, ServerApp},
    protocols::{http::ServerSession, l4, Stream, ALPN},
    server::ShutdownWatch,
};
use pingora_proxy::HttpProxy;
use space_registry::{CompiledModule, ModuleStats, ServerSettings};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::{
    affinity::{self, RequestFields},
    headers::{fill_request_id, is_well_formed_request_id},
    path::normalize_path,
    service::{
        connect_failed, error_body, route_host, AccessLine, Affinity, ProxyState, SpaceProxy,
        MAX_ATTEMPTS,
    },
};
use deadline::Watchdog;
use request::{RequestHead, MAX_HEADERS};
use response::{ChunkedEnd, Decorations, Framing, Parsed};

/// Largest backend response head relayed; a larger one is answered 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Request bodies up to this size travel in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;
/// Read buffers grow by this much.
const READ_CHUNK: usize = 16 * 1024;

/// The proxy's listener application: HTTP/1.1 here, everything else through Pingora.
pub struct SpaceApp {
    state: Arc<ProxyState>,
    fallback: Arc<HttpProxy<SpaceProxy>>,
    h2c: bool,
}

impl SpaceApp {
    pub fn new(state: Arc<ProxyState>, fallback: HttpProxy<SpaceProxy>, h2c: bool) -> Self {
        SpaceApp {
            state,
            fallback: Arc::new(fallback),
            h2c,
        }
    }
}

/// One client connection and its buffers, reused by every request on it.
struct Conn {
    stream: Stream,
    /// Client bytes not yet consumed: the current request's head and body, or the next one.
    buf: Vec<u8>,
    /// Heads being written: to the backend, then to the client.
    out: Vec<u8>,
    /// Backend bytes; the client's body bytes while they are relayed.
    rbuf: Vec<u8>,
    tls: bool,
    client_ip: Option<IpAddr>,
    trusted: bool,
    /// Timeouts of reads and writes towards the client.
    client_timer: Watchdog,
    /// Timeouts of reads and writes towards the backend.
    backend_timer: Watchdog,
}

impl Conn {
    fn new(stream: Stream, server: &ServerSettings) -> Self {
        let tls = stream.get_ssl_digest().is_some();
        let client_ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let trusted = client_ip.is_some_and(|ip| server.is_trusted_proxy(ip));
        Conn {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(4096),
            rbuf: Vec::with_capacity(READ_CHUNK),
            tls,
            client_ip,
            trusted,
            client_timer: Watchdog::default(),
            backend_timer: Watchdog::default(),
        }
    }
}

/// What happens to the connection after a request.
enum Next {
    KeepAlive,
    Close,
    /// Pingora takes the connection, starting with the bytes in `buf`.
    HandOff,
}

/// Why a request failed once it had left for the backend.
#[derive(Debug)]
enum Failure {
    /// A reused backend connection was closed before it answered anything: try a new one.
    Stale,
    Timeout,
    Upstream(&'static str),
    /// The client went away or stalled.
    Client,
}

#[async_trait]
impl ServerApp for SpaceApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.fallback.process_new(stream, shutdown).await;
        }
        let mut conn = Conn::new(stream, &self.state.server);
        loop {
            match self.serve(&mut conn, shutdown).await {
                Next::KeepAlive => {}
                Next::Close => {
                    let _ = AsyncWriteExt::shutdown(&mut conn.stream).await;
                    return None;
                }
                Next::HandOff => {
                    // The same socket comes back: keep its buffers, timers and address.
                    let Conn {
                        stream, mut buf, ..
                    } = conn;
                    let stream = self.hand_off(stream, &buf, shutdown).await?;
                    buf.clear();
                    conn = Conn {
                        stream,
                        buf,
                        ..conn
                    };
                }
            }
        }
    }

    async fn cleanup(&self) {
        self.fallback.http_cleanup().await;
    }
}

impl SpaceApp {
    fn shutting_down(&self, shutdown: &ShutdownWatch) -> bool {
        *shutdown.borrow() || self.state.shutting_down.load(Ordering::Relaxed)
    }

    /// Gives the connection to Pingora with the bytes already read. An h2c preface goes
    /// back into the socket's read buffer for Pingora's HTTP/2 server; HTTP/1 bytes become
    /// the start of Pingora's next request. Returns the connection when Pingora hands it
    /// back after a keep-alive request.
    async fn hand_off(
        &self,
        stream: Stream,
        read: &[u8],
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.h2c && stream.get_ssl_digest().is_none() && read.starts_with(b"PRI * HTTP/2.0") {
            let mut plain = stream.into_any().downcast::<l4::stream::Stream>().ok()?;
            plain.rewind(read);
            self.fallback.process_new(plain, shutdown).await;
            return None;
        }
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(Some(self.state.server.keepalive_secs()));
        if !read.is_empty() {
            session.set_pipelined_prefix(BytesMut::from(read));
        }
        let reused = self.fallback.process_new_http(session, shutdown).await?;
        // Pingora's pipelining is off, so no bytes of a next request come back with it.
        let (stream, _settings) = reused.consume();
        Some(stream)
    }

    /// Serves requests on the connection until it closes or goes to Pingora.
    async fn serve(&self, c: &mut Conn, shutdown: &ShutdownWatch) -> Next {
        loop {
            match self.serve_one(c, shutdown).await {
                Next::KeepAlive => continue,
                other => return other,
            }
        }
    }

    /// Reads one request head and serves the request, or says why not.
    async fn serve_one(&self, c: &mut Conn, shutdown: &ShutdownWatch) -> Next {
        let server = &self.state.server;
        let Conn {
            stream,
            buf,
            out,
            rbuf,
            tls,
            client_ip,
            trusted,
            client_timer,
            backend_timer,
        } = c;
        let (tls, client_ip, trusted) = (*tls, *client_ip, *trusted);
        let mut io = Io {
            stream,
            out,
            rbuf,
            client_timer,
            backend_timer,
        };
        // 1. A complete head.
        let head_end = loop {
            if !buf.is_empty() {
                if let Some(n) = request::head_end(buf) {
                    break n;
                }
            }
            if buf.len() > server.max_header_size {
                return Next::HandOff;
            }
            if buf.is_empty() && self.shutting_down(shutdown) {
                return Next::Close;
            }
            match read_some(io.stream, buf, io.client_timer, server.client_idle_timeout).await {
                Ok(0) | Err(_) => return Next::Close,
                Ok(_) => {}
            }
        };
        if head_end > server.max_header_size {
            return Next::HandOff;
        }
        let started = Instant::now();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let Ok(head) = request::parse(buf, &mut headers) else {
            return Next::HandOff;
        };

        // 2. Route, as SpaceProxy::request_filter does; anything it would refuse goes there.
        if !tls && self.state.listeners.redirect_to_https && self.state.listeners.https.is_some() {
            return Next::HandOff;
        }
        let Ok(Cow::Borrowed(path)) = normalize_path(head.path) else {
            return Next::HandOff;
        };
        let table = self.state.routes.load();
        let host = route_host(head.host);
        let Some(route) = table.lookup(&host, path) else {
            return Next::HandOff;
        };
        let module = route.module;
        if (module.spec.strip_prefix && route.prefix_len > 1)
            || module.spec.deny.is_denied(path)
            || head.content_length > module.spec.max_body_size
        {
            return Next::HandOff;
        }

        let _in_flight = InFlight::begin(&self.state);
        let mut id_buf = [0u8; 32];
        let request_id: &[u8] = match head.header("x-request-id") {
            Some(v) if is_well_formed_request_id(v) => v,
            _ => {
                fill_request_id(&mut id_buf);
                &id_buf
            }
        };
        let t = &module.spec.timeouts;
        let unread_body = head
            .content_length
            .saturating_sub((buf.len() - head.len) as u64);

        // 3. Pick an instance and connect, as SpaceProxy::upstream_peer and fail_to_connect
        // do: a failed connect counts against the instance and moves to another while the
        // module's `retries` allow.
        let mut tried = [0u32; MAX_ATTEMPTS];
        let mut attempts = 0;
        let mut decision = Affinity::Off;
        let picked = loop {
            let chosen;
            (chosen, decision) = affinity::pick(
                module,
                table.affinity_keys(),
                &head,
                client_ip,
                &tried[..attempts],
                decision,
            );
            let Some(index) = chosen else {
                if attempts == 0 {
                    // Pingora's path answers 503 and counts it.
                    return Next::HandOff;
                }
                ModuleStats::bump(&module.stats.no_instance);
                break Err((503, "-"));
            };
            tried[attempts] = index as u32;
            attempts += 1;
            let attempt = Attempt::begin(module, index);
            let addr = module.instances[index].spec.addr;
            if let Some(s) = pool::take(addr, t.idle, started) {
                break Ok((index, s, true, attempt));
            }
            match connect(addr, t.connect).await {
                Ok(s) => break Ok((index, s, false, attempt)),
                Err(_) => {
                    drop(attempt);
                    if !connect_failed(module, index, attempts) {
                        break Err((502, module.instances[index].spec.id.as_str()));
                    }
                }
            }
        };
        let (index, mut upstream, mut reused, _attempt) = match picked {
            Ok(picked) => picked,
            Err((status, instance)) => {
                let io = Io {
                    stream,
                    out,
                    rbuf,
                    client_timer,
                    backend_timer,
                };
                return self
                    .refuse(
                        io,
                        (client_ip, tls),
                        &head,
                        module,
                        (instance, attempts),
                        status,
                        started,
                        request_id,
                        unread_body,
                    )
                    .await;
            }
        };
        let instance = &module.instances[index];
        let addr = instance.spec.addr;

        // 4. The backend's head, with as much of the body as is already here.
        io.out.clear();
        request::write_upstream_head(
            io.out,
            &head,
            &request::Forwarding {
                client_ip,
                trusted,
                proto: if tls { "https" } else { "http" },
                request_id,
            },
        );
        let body_here = (buf.len() - head.len).min(head.content_length as usize);
        let body_rest = head.content_length - body_here as u64;
        let consumed = head.len + body_here;
        let request_sent_whole = body_rest == 0 && body_here <= INLINE_BODY;
        let request_len = io.out.len();
        let body = &buf[head.len..consumed];
        let mut leftover = Vec::new();

        let close = head.close || self.shutting_down(shutdown);
        let hsts = self
            .state
            .hsts
            .as_ref()
            .filter(|_| tls)
            .map(|v| v.as_bytes());
        let deco = Decorations {
            request_id,
            hsts,
            affinity: module.affinity.as_ref().map(|affinity| response::Pin {
                module,
                affinity,
                instance: index,
                decision,
                prefix_index: route.prefix_index,
                tls,
            }),
            close,
        };

        // 5. Send; read the response head. A reused connection the backend had closed is
        // replaced once, when the whole request is still at hand.
        let exchange = loop {
            let attempt = send_and_read_head(
                io.reborrow(),
                &mut upstream,
                Body {
                    here: body,
                    rest: body_rest,
                    leftover: &mut leftover,
                },
                request_len,
                head.is_head(),
                &deco,
                t,
                server.client_idle_timeout,
            )
            .await;
            match attempt {
                Err(Failure::Stale) if reused && request_sent_whole => {
                    reused = false;
                    match connect(addr, t.connect).await {
                        Ok(s) => upstream = s,
                        Err(_) => break Err(Failure::Upstream("connect failed")),
                    }
                }
                other => break other,
            }
        };
        let (meta, unread_body) = match exchange {
            Ok(e) => (e.meta, e.unread_body),
            Err(failure) => {
                let status = match failure {
                    Failure::Client => 0,
                    Failure::Timeout => 504,
                    Failure::Stale | Failure::Upstream(_) => 502,
                };
                if status > 0 {
                    let _ = write_error(io.reborrow(), status, request_id, t.write).await;
                }
                self.finish(
                    (client_ip, tls),
                    &head,
                    module,
                    instance.spec.id.as_str(),
                    attempts,
                    status,
                    started.elapsed(),
                    request_id,
                    failure_reason(&failure),
                );
                return Next::Close;
            }
        };
        instance.state.record_request_success();

        // 6. The body, relayed as it comes.
        let relayed = relay_body(io.reborrow(), &mut upstream, meta, t).await;
        let done = Instant::now();
        let backend_reusable = matches!(relayed, Ok(true)) && meta.backend_keepalive;
        if backend_reusable {
            pool::put(addr, upstream, server.upstream_keepalive_pool, done);
        }
        let error = match &relayed {
            Ok(_) => "",
            Err(f) => failure_reason(f),
        };
        self.finish(
            (client_ip, tls),
            &head,
            module,
            instance.spec.id.as_str(),
            attempts,
            meta.status,
            done.duration_since(started),
            request_id,
            error,
        );
        if relayed.is_ok() && unread_body > 0 {
            self.linger(io.reborrow(), unread_body).await;
        }
        if relayed.is_err() || close || unread_body > 0 || meta.framing == Framing::UntilClose {
            return Next::Close;
        }
        buf.drain(..consumed);
        buf.extend_from_slice(&leftover);
        Next::KeepAlive
    }

    /// Answers 502 (every connect failed) or 503 (no instance left to try) before anything
    /// reached a backend, reads and discards what is left of the body (lingering close, as
    /// SpaceProxy does), and closes.
    #[allow(clippy::too_many_arguments)]
    async fn refuse(
        &self,
        mut io: Io<'_>,
        client: (Option<IpAddr>, bool),
        head: &RequestHead<'_>,
        module: &CompiledModule,
        (instance, attempts): (&str, usize),
        status: u16,
        started: Instant,
        request_id: &[u8],
        unread_body: u64,
    ) -> Next {
        let limit = module.spec.timeouts.write;
        if write_error(io.reborrow(), status, request_id, limit)
            .await
            .is_ok()
        {
            self.linger(io.reborrow(), unread_body).await;
        }
        let reason = if status == 503 {
            "no instance available"
        } else {
            "connect failed"
        };
        self.finish(
            client,
            head,
            module,
            instance,
            attempts,
            status,
            started.elapsed(),
            request_id,
            reason,
        );
        Next::Close
    }

    /// Lingering close: reads and discards what is left of a request body nobody will
    /// read, for at most `lingering_time`, so that closing does not reset the connection
    /// under the answer the client has yet to read.
    async fn linger(&self, io: Io<'_>, unread_body: u64) {
        let limit = self.state.server.lingering_time;
        let mut left = unread_body;
        let _ = timeout(limit, async {
            while left > 0 {
                io.rbuf.clear();
                match read_some(io.stream, io.rbuf, io.client_timer, limit).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n as u64),
                }
            }
        })
        .await;
    }

    /// Counts the response and writes the access-log line.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        (client_ip, tls): (Option<IpAddr>, bool),
        head: &RequestHead<'_>,
        module: &CompiledModule,
        instance: &str,
        attempts: usize,
        status: u16,
        elapsed: Duration,
        request_id: &[u8],
        error: &str,
    ) {
        module
            .stats
            .record_response(status, elapsed.as_micros() as u64);
        if self.state.server.access_log {
            AccessLine {
                client: client_ip,
                method: head.method,
                path: head.path,
                status,
                module: module.spec.name.as_str(),
                instance,
                attempts,
                elapsed,
                body_bytes: head.content_length,
                tls,
                request_id,
                local: "",
                error,
            }
            .emit();
        }
    }
}

fn failure_reason(f: &Failure) -> &'static str {
    match f {
        Failure::Stale => "backend closed the connection",
        Failure::Timeout => "backend timed out",
        Failure::Upstream(why) => why,
        Failure::Client => "client went away",
    }
}

/// The client connection's stream and buffers, borrowed apart from its read buffer (which
/// the parsed head borrows).
struct Io<'a> {
    stream: &'a mut Stream,
    out: &'a mut Vec<u8>,
    rbuf: &'a mut Vec<u8>,
    client_timer: &'a mut Watchdog,
    backend_timer: &'a mut Watchdog,
}

impl Io<'_> {
    fn reborrow(&mut self) -> Io<'_> {
        Io {
            stream: &mut *self.stream,
            out: &mut *self.out,
            rbuf: &mut *self.rbuf,
            client_timer: &mut *self.client_timer,
            backend_timer: &mut *self.backend_timer,
        }
    }
}

/// The request body: the part already read, and how much more the client will send.
struct Body<'a, 'b> {
    here: &'a [u8],
    rest: u64,
    /// Bytes read past the body: the start of the client's next request.
    leftover: &'b mut Vec<u8>,
}

/// Sends the request (head, then any body still arriving from the client) and reads the
/// backend's head, writing the client's head into `io.out`.
#[allow(clippy::too_many_arguments)]
async fn send_and_read_head(
    io: Io<'_>,
    upstream: &mut TcpStream,
    body: Body<'_, '_>,
    request_len: usize,
    request_is_head: bool,
    deco: &Decorations<'_>,
    t: &space_modules::Timeouts,
    client_timeout: Duration,
) -> Result<Exchange, Failure> {
    let Io {
        stream,
        out,
        rbuf,
        client_timer,
        backend_timer,
    } = io;
    let Body {
        here,
        mut rest,
        leftover,
    } = body;
    let stale = |e: io::Error| {
        if e.kind() == io::ErrorKind::TimedOut {
            Failure::Timeout
        } else {
            Failure::Stale
        }
    };
    rbuf.clear();
    out.truncate(request_len);
    // `sent` turns false when the backend answers (or closes) before it has the whole
    // request: what it sent is then in `rbuf`, and the rest of the body is not sent.
    let mut sent;
    if here.len() <= INLINE_BODY {
        out.extend_from_slice(here);
        sent = send(upstream, out, rbuf, backend_timer, t.write)
            .await
            .map_err(stale)?;
    } else {
        sent = send(upstream, out, rbuf, backend_timer, t.write)
            .await
            .map_err(stale)?;
        if sent {
            // A backend that stops taking the body may have answered: read on to see.
            sent = send(upstream, here, rbuf, backend_timer, t.write)
                .await
                .unwrap_or(false);
        }
    }
    while rest > 0 && sent {
        out.clear();
        match read_some(stream, out, client_timer, client_timeout).await {
            Ok(0) | Err(_) => return Err(Failure::Client),
            Ok(n) => {
                let take = (n as u64).min(rest) as usize;
                if take < n {
                    leftover.extend_from_slice(&out[take..n]);
                }
                rest -= take as u64;
                sent = send(upstream, &out[..take], rbuf, backend_timer, t.write)
                    .await
                    .unwrap_or(false);
            }
        }
    }
    let early = !sent;
    let close_deco;
    let deco = if early {
        // The client is still sending a body nobody reads: the connection ends after this.
        close_deco = Decorations {
            close: true,
            ..*deco
        };
        &close_deco
    } else {
        deco
    };
    let mut have = !rbuf.is_empty();
    loop {
        if !have {
            match read_some(upstream, rbuf, backend_timer, t.read).await {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(Failure::Timeout),
                Ok(0) | Err(_) if rbuf.is_empty() => return Err(Failure::Stale),
                Ok(0) | Err(_) => return Err(Failure::Upstream("backend closed mid-head")),
                Ok(_) => {}
            }
        }
        have = false;
        loop {
            out.clear();
            match response::parse_and_rewrite(rbuf, request_is_head, deco, out) {
                Ok(Parsed::Final(meta)) => {
                    return Ok(Exchange {
                        meta,
                        unread_body: if early { rest } else { 0 },
                    })
                }
                Ok(Parsed::Interim(n)) => {
                    rbuf.drain(..n);
                }
                Ok(Parsed::Partial) if rbuf.len() > MAX_RESPONSE_HEAD => {
                    return Err(Failure::Upstream("response head too large"))
                }
                Ok(Parsed::Partial) => break,
                Err(why) => return Err(Failure::Upstream(why)),
            }
            if rbuf.is_empty() {
                break;
            }
        }
    }
}

/// A response whose head is ready for the client.
struct Exchange {
    meta: response::ResponseMeta,
    /// Request body bytes the client has yet to send: the backend answered before taking
    /// the whole body, and the client connection closes after the response.
    unread_body: u64,
}

/// Writes `bytes` to the backend. `Ok(false)` when the backend answers or closes before it
/// has taken them all (nginx relays such an early answer, a 413 from the container's own
/// web server for one); what it sent is then in `rbuf`. The common case, a kernel that
/// takes everything at once, is one `write` and no waiting.
async fn send(
    upstream: &TcpStream,
    bytes: &[u8],
    rbuf: &mut Vec<u8>,
    timer: &mut Watchdog,
    limit: Duration,
) -> io::Result<bool> {
    let mut left = bytes;
    match upstream.try_write(left) {
        Ok(n) => left = &left[n..],
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    if left.is_empty() {
        return Ok(true);
    }
    let wait = async {
        loop {
            tokio::select! {
                ready = upstream.readable() => {
                    ready?;
                    if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
                        rbuf.reserve(READ_CHUNK);
                    }
                    match upstream.try_read_buf(rbuf) {
                        // An answer, or a close: either way the rest is not wanted.
                        Ok(_) => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                ready = upstream.writable() => {
                    ready?;
                    match upstream.try_write(left) {
                        Ok(n) => {
                            left = &left[n..];
                            if left.is_empty() {
                                return Ok(true);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    };
    match timer.run(limit, wait).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Writes the client's head (in `io.out`) and relays the body. `Ok(true)` when the backend
/// sent exactly one response (its connection can serve another request).
async fn relay_body(
    io: Io<'_>,
    upstream: &mut TcpStream,
    meta: response::ResponseMeta,
    t: &space_modules::Timeouts,
) -> Result<bool, Failure> {
    let Io {
        stream,
        out,
        rbuf,
        client_timer,
        backend_timer,
    } = io;
    let here = &rbuf[meta.head_len..];
    let mut chunked = ChunkedEnd::default();
    let mut remaining = 0u64;
    let (part, mut done) = match meta.framing {
        Framing::Empty => (0, true),
        Framing::Length(n) => {
            let part = (here.len() as u64).min(n) as usize;
            remaining = n - part as u64;
            (part, remaining == 0)
        }
        Framing::Chunked => {
            let part = chunked.feed(here).map_err(Failure::Upstream)?;
            (part, chunked.is_done())
        }
        Framing::UntilClose => (here.len(), false),
    };
    let mut exact = part == here.len();
    out.extend_from_slice(&rbuf[meta.head_len..meta.head_len + part]);
    write_flush(stream, out, client_timer, t.write)
        .await
        .map_err(|_| Failure::Client)?;
    while !done {
        rbuf.clear();
        let n = match read_some(upstream, rbuf, backend_timer, t.read).await {
            Ok(0) if meta.framing == Framing::UntilClose => break,
            Ok(0) => return Err(Failure::Upstream("backend closed mid-body")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(Failure::Timeout),
            Err(_) => return Err(Failure::Upstream("backend read failed mid-body")),
        };
        let take = match meta.framing {
            Framing::Length(_) => {
                let take = (n as u64).min(remaining) as usize;
                remaining -= take as u64;
                done = remaining == 0;
                take
            }
            Framing::Chunked => {
                let take = chunked.feed(&rbuf[..n]).map_err(Failure::Upstream)?;
                done = chunked.is_done();
                take
            }
            _ => n,
        };
        exact = take == n;
        write_flush(stream, &rbuf[..take], client_timer, t.write)
            .await
            .map_err(|_| Failure::Client)?;
    }
    Ok(exact)
}

/// Answers a request the backend failed, and closes.
async fn write_error(
    io: Io<'_>,
    status: u16,
    request_id: &[u8],
    limit: Duration,
) -> io::Result<()> {
    let Io {
        stream,
        out,
        client_timer,
        ..
    } = io;
    let line: &[u8] = match status {
        503 => b"HTTP/1.1 503 Service Unavailable\r\n",
        504 => b"HTTP/1.1 504 Gateway Timeout\r\n",
        _ => b"HTTP/1.1 502 Bad Gateway\r\n",
    };
    let body = error_body(status).as_bytes();
    out.clear();
    out.extend_from_slice(line);
    request::push_field(out, b"content-type", b"text/plain; charset=utf-8");
    response::push_length(out, body.len() as u64);
    request::push_field(out, b"cache-control", b"no-store");
    if status == 503 {
        request::push_field(out, b"retry-after", b"5");
    }
    request::push_field(out, b"x-request-id", request_id);
    request::push_field(out, b"connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    write_flush(stream, out, client_timer, limit).await
}

async fn connect(addr: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let stream = timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads what is available (at least one byte, 0 at end of stream) onto the end of `buf`,
/// within `limit` once it has to wait.
async fn read_some<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
    timer: &mut Watchdog,
    limit: Duration,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    match timer.run(limit, r.read_buf(buf)).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Writes all of `bytes` and flushes, within `limit` once it has to wait.
async fn write_flush<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bytes: &[u8],
    timer: &mut Watchdog,
    limit: Duration,
) -> io::Result<()> {
    let write = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    match timer.run(limit, write).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Counts a request in flight (SIGTERM waits for none) for as long as it lives.
struct InFlight<'a>(&'a ProxyState);

impl<'a> InFlight<'a> {
    fn begin(state: &'a ProxyState) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An instance's count of requests in flight (least-connections), for as long as it lives.
struct Attempt<'a>(&'a space_registry::InstanceState);

impl<'a> Attempt<'a> {
    fn begin(module: &'a CompiledModule, index: usize) -> Self {
        let state = &module.instances[index].state;
        state.begin_request();
        Attempt(state)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.0.end_request();
    }
}
