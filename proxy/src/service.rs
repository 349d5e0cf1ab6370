//! The request path: one [`ProxyHttp`] phase per method, in the order Pingora calls them
//! (see docs/request-path.md). Each phase says what it decides and what it answers.
//!
//! Per request: one route-table load, no map lookups (instance state and counters hang off
//! the table), a borrowed path unless normalization changed it.
use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue};
use pingora_core::{
    upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy},
    ErrorType,
};
use pingora_error::{Error, ErrorSource, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use space_registry::{
    CompiledModule, InstanceStates, ListenerSettings, ModuleStats, RouteTable, RouteTableHandle,
    ServerSettings,
};

use crate::{
    affinity,
    headers::{self, Forwarding},
    path::normalize_path,
};

/// Most connect retries a request can make (bounded by the module's `retries`, at most 10).
pub(crate) const MAX_ATTEMPTS: usize = 11;

/// A failed connect to instance `index` of `m`, after `attempts` attempts: counts against
/// the instance (`max_fails` takes it down) and says whether the request may try another
/// instance (the module's `retries` allow it and one is left untried).
pub(crate) fn connect_failed(m: &CompiledModule, index: usize, attempts: usize) -> bool {
    let inst = &m.instances[index];
    let hc = &m.spec.health_check;
    if inst
        .state
        .record_request_failure(hc.max_fails, hc.fail_timeout)
    {
        ModuleStats::bump(&m.stats.passive_ejections);
        tracing::warn!(module = %m.spec.name, instance = %inst.spec.id, addr = %inst.spec.addr,
            "instance marked down after {} failed connects", hc.max_fails);
    }
    let retries_left = attempts <= m.spec.retries as usize && attempts < MAX_ATTEMPTS;
    if retries_left && attempts < m.instances.len() {
        ModuleStats::bump(&m.stats.retries);
        true
    } else {
        false
    }
}

/// Process-wide counters that belong to no module.
#[derive(Debug, Default)]
pub struct GlobalStats {
    pub bad_path: AtomicU64,
    pub no_route: AtomicU64,
    pub header_too_large: AtomicU64,
    pub redirects: AtomicU64,
}

/// What the request path shares across requests.
pub struct ProxyState {
    /// The sources of the route table (file, etcd, DNS) and what they refused.
    pub desired: Arc<space_registry::Desired>,
    /// etcd provider counters, when etcd is configured.
    pub etcd: Option<Arc<space_registry::EtcdStats>>,
    /// DNS discovery, once its runtime has started it.
    pub dns: Arc<std::sync::OnceLock<space_registry::DnsDiscovery>>,
    pub routes: Arc<RouteTableHandle>,
    pub states: Arc<InstanceStates>,
    pub server: ServerSettings,
    pub listeners: ListenerSettings,
    pub hsts: Option<HeaderValue>,
    /// Requests between `request_filter` and `logging`: SIGTERM waits for this to reach 0.
    pub in_flight: AtomicU64,
    pub shutting_down: AtomicBool,
    pub global: GlobalStats,
}

/// The SPACE proxy logic.
pub struct SpaceProxy {
    pub state: Arc<ProxyState>,
}

/// Per-request state.
pub struct RequestCtx {
    started: Instant,
    counted: bool,
    /// The route table the request was routed with; `None` until it is routed.
    table: Option<Arc<RouteTable>>,
    /// Index of the module in `table`.
    module: usize,
    tls: bool,
    request_id: Option<HeaderValue>,
    tried: [u32; MAX_ATTEMPTS],
    attempts: usize,
    /// Index of the instance the current attempt went to; `in_flight` was bumped for it.
    current: Option<u32>,
    body_bytes: u64,
    /// Set when SPACE answered by itself (status and reason for the access log).
    local_reason: &'static str,
    /// What affinity decided for this request.
    affinity: Affinity,
    /// Index (in the module's prefixes) of the prefix that matched: the routing cookie's Path.
    prefix_index: u16,
}

/// What session affinity decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Affinity {
    /// The module has no affinity.
    Off,
    /// A valid routing cookie led to its instance: nothing to set.
    Kept,
    /// Valid, but signed by an older key: re-sign it.
    Resign,
    /// No usable routing cookie: a new pin is set on the response.
    New,
    /// The pinned instance could not serve: moved, and a new cookie is set.
    Repinned,
}

impl RequestCtx {
    fn module(&self) -> Option<&CompiledModule> {
        self.table.as_ref().map(|t| &t.modules()[self.module])
    }

    /// Records the route: the table (kept alive for the request) and the module in it.
    fn route(&mut self, table: Arc<RouteTable>, module: usize) {
        self.table = Some(table);
        self.module = module;
    }
}

fn status_error(code: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(code), why)
}

/// The body of an error SPACE answers by itself, the same on both request paths.
pub(crate) fn error_body(code: u16) -> &'static str {
    match code {
        400 => "400 Bad Request\n",
        404 => "404 Not Found\n",
        413 => "413 Content Too Large\n",
        502 => "502 Bad Gateway: the module's instance could not be reached\n",
        503 => "503 Service Unavailable: no healthy instance, try again shortly\n",
        504 => "504 Gateway Timeout: the module's instance did not answer in time\n",
        _ => "error\n",
    }
}

/// Lowercase host without port, from :authority or Host. Borrowed unless it had uppercase.
fn request_host(req: &RequestHeader) -> std::borrow::Cow<'_, str> {
    let raw = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    route_host(raw)
}

/// The host a `Host` value routes by: lowercase, without port or trailing dot. Borrowed
/// unless it had uppercase.
pub(crate) fn route_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = if raw.starts_with('[') {
        raw.split_inclusive(']').next().unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

fn header_bytes(req: &RequestHeader) -> usize {
    let line =
        req.method.as_str().len() + req.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

impl SpaceProxy {
    /// Sends a short plain-text answer of SPACE's own.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: &'static str,
        extra: Option<(header::HeaderName, HeaderValue)>,
    ) -> Result<bool> {
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        if let Some((k, v)) = extra {
            resp.insert_header(k, v)?;
        }
        self.decorate_response(&mut resp, ctx);
        if status >= 400 && status != 404 {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.state.server.keepalive_secs()));
        }
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
            .await?;
        if status >= 400 && status != 404 {
            self.linger(session).await;
        }
        Ok(true)
    }

    /// Lingering close: after refusing a request whose body is still arriving, read and
    /// discard it for at most `lingering_time` before the connection closes. Closing a socket
    /// with unread bytes makes the kernel send a reset, and a client still writing its body
    /// then loses the answer already sent. A client that sent `Expect: 100-continue` has not
    /// sent the body, and HTTP/2 ends the stream on its own.
    async fn linger(&self, session: &mut Session) {
        let limit = self.state.server.lingering_time;
        if limit.is_zero()
            || session.is_http2()
            || session.req_header().headers.contains_key(header::EXPECT)
            || session.is_body_done()
        {
            return;
        }
        let _ = tokio::time::timeout(limit, session.drain_request_body()).await;
    }

    /// Headers SPACE adds to every response: X-Request-Id and, over TLS, HSTS.
    fn decorate_response(&self, resp: &mut ResponseHeader, ctx: &RequestCtx) {
        if let Some(id) = &ctx.request_id {
            let _ = resp.insert_header(headers::X_REQUEST_ID, id.clone());
        }
        if ctx.tls {
            if let Some(hsts) = &self.state.hsts {
                let _ = resp.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
        }
    }

    fn redirect_location(&self, req: &RequestHeader) -> Option<HeaderValue> {
        let https = self.state.listeners.https?;
        let host = request_host(req);
        if host.is_empty() {
            return None;
        }
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.into_owned()
        };
        let port = if https.port() == 443 {
            String::new()
        } else {
            format!(":{}", https.port())
        };
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        HeaderValue::from_str(&format!("https://{host}{port}{pq}")).ok()
    }

    fn end_attempt(&self, ctx: &mut RequestCtx) {
        if let (Some(i), Some(m)) = (ctx.current.take(), ctx.module()) {
            m.instances[i as usize].state.end_request();
        }
    }
}

#[async_trait]
impl ProxyHttp for SpaceProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            counted: false,
            table: None,
            module: 0,
            tls: false,
            request_id: None,
            tried: [0; MAX_ATTEMPTS],
            attempts: 0,
            current: None,
            body_bytes: 0,
            local_reason: "",
            affinity: Affinity::Off,
            prefix_index: 0,
        }
    }

    /// No downstream modules: SPACE does not compress, and an unused compression context
    /// would cost an allocation per request.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    /// Decides whether the request goes anywhere. Answers by itself (returns `Ok(true)`):
    /// 431 for an oversized head, 308 to HTTPS when configured, 400 for a path that fails
    /// normalization, 404 for no route or a deny rule, 413 for a declared body over the
    /// module's limit. Otherwise routes the request and rewrites its path to the normalized
    /// (and, with `strip_prefix`, shortened) form.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        ctx.counted = true;
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if self.state.shutting_down.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            // Only where the client allows it: Pingora has already turned keep-alive off for
            // `Connection: close` and for HTTP/1.0 without `Connection: keep-alive`.
            session.set_keepalive(Some(self.state.server.keepalive_secs()));
        }

        let req = session.req_header();
        ctx.request_id = Some(match req.headers.get(headers::X_REQUEST_ID) {
            Some(v) if headers::is_well_formed_request_id(v.as_bytes()) => v.clone(),
            _ => headers::new_request_id(),
        });

        if header_bytes(req) > self.state.server.max_header_size {
            ModuleStats::bump(&self.state.global.header_too_large);
            ctx.local_reason = "header too large";
            return self
                .answer(
                    session,
                    ctx,
                    431,
                    "431 Request Header Fields Too Large\n",
                    None,
                )
                .await;
        }

        if !ctx.tls && self.state.listeners.redirect_to_https {
            if let Some(location) = self.redirect_location(req) {
                ModuleStats::bump(&self.state.global.redirects);
                ctx.local_reason = "redirect to https";
                return self
                    .answer(
                        session,
                        ctx,
                        308,
                        "308 Permanent Redirect\n",
                        Some((header::LOCATION, location)),
                    )
                    .await;
            }
        }

        let has_host = req.uri.authority().is_some() || req.headers.contains_key(header::HOST);
        if !has_host && req.version == http::Version::HTTP_11 {
            // RFC 9112 §3.2: a request without Host is refused.
            ModuleStats::bump(&self.state.global.bad_path);
            ctx.local_reason = "no host";
            return self
                .answer(
                    session,
                    ctx,
                    400,
                    "400 Bad Request: Host header required\n",
                    None,
                )
                .await;
        }

        let path = req.uri.path();
        let normalized = match normalize_path(path) {
            Ok(p) => p,
            Err(_) => {
                ModuleStats::bump(&self.state.global.bad_path);
                ctx.local_reason = "bad path";
                return self
                    .answer(session, ctx, 400, "400 Bad Request: invalid path\n", None)
                    .await;
            }
        };

        let table = self.state.routes.load();
        let host = request_host(req);
        let Some(route) = table.lookup(&host, &normalized) else {
            ModuleStats::bump(&self.state.global.no_route);
            ctx.local_reason = "no route";
            return self
                .answer(session, ctx, 404, "404 Not Found\n", None)
                .await;
        };
        let module = route.module;
        let module_index = route.module_index;
        let prefix_len = route.prefix_len;

        if module.spec.deny.is_denied(&normalized) {
            ModuleStats::bump(&module.stats.denied);
            ctx.local_reason = "denied";
            ctx.route(table, module_index);
            return self
                .answer(session, ctx, 404, "404 Not Found\n", None)
                .await;
        }

        let declared = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > module.spec.max_body_size) {
            ModuleStats::bump(&module.stats.body_too_large);
            ctx.local_reason = "body too large";
            ctx.route(table, module_index);
            return self
                .answer(session, ctx, 413, "413 Content Too Large\n", None)
                .await;
        }

        ctx.prefix_index = route.prefix_index;
        let strip = module.spec.strip_prefix && prefix_len > 1;
        let rewrite = strip || matches!(normalized, std::borrow::Cow::Owned(_));
        if rewrite {
            let mut new_path = if strip {
                let rest = &normalized[prefix_len..];
                if rest.is_empty() {
                    "/".to_string()
                } else {
                    rest.to_string()
                }
            } else {
                normalized.into_owned()
            };
            if let Some(q) = req.uri.query() {
                new_path.push('?');
                new_path.push_str(q);
            }
            // Keep scheme and authority: HTTP/2 requests carry the host only there.
            let mut parts = req.uri.clone().into_parts();
            parts.path_and_query = Some(
                new_path
                    .parse()
                    .map_err(|_| status_error(400, "rewritten path is not a valid URI"))?,
            );
            let uri = http::Uri::from_parts(parts)
                .map_err(|_| status_error(400, "rewritten path is not a valid URI"))?;
            session.req_header_mut().set_uri(uri);
        }

        ctx.route(table, module_index);
        Ok(false)
    }

    /// Counts the body as it streams; past the module's limit fails the request with 413
    /// (the body is never buffered whole).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if let Some(m) = ctx.module() {
                if ctx.body_bytes > m.spec.max_body_size {
                    ModuleStats::bump(&m.stats.body_too_large);
                    ctx.local_reason = "body too large";
                    return Err(status_error(
                        413,
                        "request body over the module's max_body_size",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Chooses the instance: the module's policy over available, non-draining instances not
    /// yet tried for this request. None available: 503.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.end_attempt(ctx);
        let Some(module) = ctx.module() else {
            return Err(status_error(404, "no route"));
        };
        let tried = &ctx.tried[..ctx.attempts];
        let keys = ctx.table.as_ref().and_then(|t| t.affinity_keys());
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let (chosen, decision) = affinity::pick(
            module,
            keys,
            session.req_header(),
            client_ip,
            tried,
            ctx.affinity,
        );
        let Some(index) = chosen else {
            ModuleStats::bump(&module.stats.no_instance);
            ctx.affinity = decision;
            ctx.local_reason = "no instance available";
            return Err(status_error(503, "no healthy instance"));
        };
        let instance = &module.instances[index];
        instance.state.begin_request();
        let t = &module.spec.timeouts;
        let mut peer = HttpPeer::new(instance.spec.addr, false, String::new());
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        // Pingora's standard policy strips hop-by-hop and Connection-named fields before
        // upstream_request_filter (headers::prepare_upstream_request relies on it). A request
        // with none of them comes out of it unchanged: `preserve` skips the work.
        peer.options.http_upstream_request_policy = if headers::has_hop_by_hop(session.req_header())
        {
            HttpUpstreamRequestPolicy::standard()
        } else {
            HttpUpstreamRequestPolicy::preserve()
        };
        if ctx.attempts < MAX_ATTEMPTS {
            ctx.tried[ctx.attempts] = index as u32;
            ctx.attempts += 1;
        }
        ctx.current = Some(index as u32);
        ctx.affinity = decision;
        Ok(Box::new(peer))
    }

    /// A connect failure counts against the instance (max_fails takes it down) and is
    /// retried on another instance while the module's `retries` allow.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(i), Some(m)) = (ctx.current, ctx.module()) {
            e.set_retry(connect_failed(m, i as usize, ctx.attempts));
        }
        e
    }

    /// Writes the forwarding headers for the backend.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client_ip: Option<IpAddr> = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let trusted = client_ip.is_some_and(|ip| self.state.server.is_trusted_proxy(ip));
        if !upstream.headers.contains_key(header::HOST) && upstream.uri.authority().is_none() {
            // An HTTP/1.0 client sent no Host: name the instance, as nginx does.
            if let (Some(i), Some(m)) = (ctx.current, ctx.module()) {
                let addr = m.instances[i as usize].spec.addr.to_string();
                let _ = upstream.insert_header(header::HOST, addr);
            }
        }
        let request_id = ctx.request_id.get_or_insert_with(headers::new_request_id);
        headers::prepare_upstream_request(
            upstream,
            &Forwarding {
                client_ip,
                trusted,
                proto: if ctx.tls { "https" } else { "http" },
                request_id,
            },
        );
        Ok(())
    }

    /// The backend answered: reset its failure count; add X-Request-Id and HSTS.
    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(i), Some(m)) = (ctx.current, ctx.module()) {
            m.instances[i as usize].state.record_request_success();
            if let Some(a) = &m.affinity {
                affinity::decorate_response(
                    m,
                    a,
                    resp,
                    i as usize,
                    ctx.affinity,
                    ctx.prefix_index,
                    ctx.tls,
                );
            }
        }
        self.decorate_response(resp, ctx);
        Ok(())
    }

    /// SPACE's own error answers: short text bodies, never a hang. Upstream timeouts are
    /// 504, other upstream failures 502, declared statuses (413, 503) as given.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 && session.response_written().is_none() {
            let body = error_body(code);
            let retry_after =
                (code == 503).then(|| (header::RETRY_AFTER, HeaderValue::from_static("5")));
            // The downstream may already be gone; nothing more to do then.
            let _ = self.answer(session, ctx, code, body, retry_after).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// What Pingora's own error lines say about a request: method, path and host, never the
    /// query string (it can hold patient data).
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!(
            "{} {}, Host: {}",
            req.method,
            req.uri.path(),
            request_host(req)
        )
    }

    /// Quiet Pingora's error log for outcomes SPACE already reports (413, 503, client gone).
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        matches!(error.etype(), ErrorType::HTTPStatus(_))
    }

    /// Releases the instance, counts the response, writes the access-log line. The line is
    /// PHI-safe: no query string, no cookie or Authorization values.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.end_attempt(ctx);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.elapsed();
        if let Some(m) = ctx.module() {
            m.stats.record_response(status, elapsed.as_micros() as u64);
        }
        if self.state.server.access_log {
            access_log(session, e, ctx, status, elapsed);
        }
        if ctx.counted {
            ctx.counted = false;
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn access_log(
    session: &Session,
    e: Option<&Error>,
    ctx: &RequestCtx,
    status: u16,
    elapsed: Duration,
) {
    let req = session.req_header();
    let module = ctx.module();
    let instance = match (module, ctx.tried.get(ctx.attempts.wrapping_sub(1))) {
        (Some(m), Some(&i)) if ctx.attempts > 0 => m.instances[i as usize].spec.id.as_str(),
        _ => "-",
    };
    AccessLine {
        client: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        method: req.method.as_str(),
        path: req.uri.path(),
        status,
        module: module.map_or("-", |m| m.spec.name.as_str()),
        instance,
        attempts: ctx.attempts,
        elapsed,
        body_bytes: ctx.body_bytes,
        tls: ctx.tls,
        request_id: ctx.request_id.as_ref().map_or(&b"-"[..], |v| v.as_bytes()),
        local: ctx.local_reason,
        error: e.map(|e| e.etype().as_str()).unwrap_or(""),
    }
    .emit();
}

/// One access-log line (target `access`). PHI-safe: the path without its query string, and
/// no cookie or credential values.
pub(crate) struct AccessLine<'a> {
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub module: &'a str,
    pub instance: &'a str,
    pub attempts: usize,
    pub elapsed: Duration,
    pub body_bytes: u64,
    pub tls: bool,
    pub request_id: &'a [u8],
    pub local: &'a str,
    pub error: &'a str,
}

impl AccessLine<'_> {
    pub fn emit(&self) {
        let mut ip = [0u8; 48];
        let ip_len = self.client.map_or(0, |c| headers::format_ip(c, &mut ip));
        tracing::info!(
            target: "access",
            client = %std::str::from_utf8(&ip[..ip_len]).unwrap_or(""),
            method = %self.method,
            path = %self.path,
            status = self.status,
            module = self.module,
            instance = self.instance,
            attempts = self.attempts,
            duration_ms = self.elapsed.as_secs_f64() * 1000.0,
            body_bytes = self.body_bytes,
            tls = self.tls,
            request_id = std::str::from_utf8(self.request_id).unwrap_or("-"),
            local = self.local,
            error = self.error,
        );
    }
}
