//! The admin listener (loopback by default; a bearer token is required when configured):
//! `/healthz`, `/readyz`, `/metrics` (Prometheus text), `/api/routes`, `/api/instances`.
use std::sync::{atomic::Ordering, Arc};

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora_core::{apps::http_app::ServeHttp, protocols::http::ServerSession};
use serde_json::json;

use crate::{metrics, reload::ReloadStats, service::ProxyState};

pub struct AdminApp {
    pub state: Arc<ProxyState>,
    pub reload: Arc<ReloadStats>,
    pub certs: Option<space_certs::CertStore>,
    pub token: Option<String>,
    pub listeners: crate::listening::ProxyListeners,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response parts are valid")
}

fn json_reply(v: serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    reply(StatusCode::OK, "application/json", body)
}

impl AdminApp {
    fn routes_json(&self) -> serde_json::Value {
        let table = self.state.routes.load();
        let modules: Vec<_> = table
            .modules()
            .iter()
            .map(|m| {
                let s = &m.spec;
                json!({
                    "name": s.name.as_str(),
                    "prefixes": s.prefixes.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                    "hosts": s.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "strip_prefix": s.strip_prefix,
                    "load_balancing": s.load_balancing.name(),
                    "session_cookies": s.session_cookies,
                    "deny": s.deny.patterns(),
                    "max_body_size": s.max_body_size,
                    "retries": s.retries,
                    "timeouts": {
                        "connect": humantime::format_duration(s.timeouts.connect).to_string(),
                        "read": humantime::format_duration(s.timeouts.read).to_string(),
                        "write": humantime::format_duration(s.timeouts.write).to_string(),
                        "idle": humantime::format_duration(s.timeouts.idle).to_string(),
                    },
                    "health_check": {
                        "enabled": s.health_check.enabled,
                        "path": s.health_check.path,
                        "expect_status": s.health_check.expect_status.to_string(),
                        "interval": humantime::format_duration(s.health_check.interval).to_string(),
                    },
                    "affinity": s.affinity.as_ref().map(|a| json!({
                        "cookie": a.cookie,
                        "max_age": a.max_age.map(|d| humantime::format_duration(d).to_string()),
                        "drain_timeout": humantime::format_duration(a.drain_timeout).to_string(),
                    })),
                    "instances": m.instances.len(),
                })
            })
            .collect();
        let last_error = self.reload.last_error();
        json!({
            "revision": table.revision(),
            "modules": modules,
            "last_reload_error": last_error,
            "refused": *self.state.desired.refusals(),
        })
    }

    fn discovery_json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let etcd = self.state.etcd.as_ref().map(|e| {
            json!({
                "connected": e.connected.load(Relaxed),
                "revision": e.revision.load(Relaxed),
                "serving_snapshot": e.serving_snapshot.load(Relaxed),
                "full_syncs": e.full_syncs.load(Relaxed),
                "reconnects": e.reconnects.load(Relaxed),
                "compactions": e.compactions.load(Relaxed),
                "events": e.events.load(Relaxed),
                "last_error": e.last_error.lock().unwrap_or_else(|x| x.into_inner()).clone(),
            })
        });
        let dns = self
            .state
            .dns
            .get()
            .map(|d| json!({ "resolver": d.resolver(), "modules": d.status() }));
        json!({
            "revision": self.state.routes.load().revision(),
            "etcd": etcd,
            "dns": dns,
            "refused": *self.state.desired.refusals(),
        })
    }

    fn instances_json(&self) -> serde_json::Value {
        let table = self.state.routes.load();
        let instances: Vec<_> = table
            .modules()
            .iter()
            .flat_map(|m| {
                m.instances.iter().map(move |i| {
                    json!({
                        "module": m.spec.name.as_str(),
                        "id": i.spec.id.as_str(),
                        "addr": i.spec.addr.to_string(),
                        "weight": i.spec.weight,
                        "draining": i.spec.draining,
                        "draining_for_secs": i.state.draining_for().map(|d| d.as_secs()),
                        "health": i.state.health(),
                        "in_flight": i.state.in_flight(),
                        "requests": i.state.requests(),
                    })
                })
            })
            .collect();
        json!({ "revision": table.revision(), "instances": instances })
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        // Loopback callers and probes need no token; everyone else does, when one is set.
        let loopback = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| a.ip().to_canonical().is_loopback());
        let probe = path == "/healthz" || path == "/readyz";
        if let Some(token) = self.token.as_ref().filter(|_| !loopback && !probe) {
            let ok = session
                .req_header()
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
            if !ok {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    b"401 Unauthorized: send Authorization: Bearer <token>\n".to_vec(),
                );
            }
        }
        match path.as_str() {
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.state.shutting_down.load(Ordering::Relaxed) {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", b"shutting down\n".to_vec())
                } else if !self.listeners.all_bound() {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", b"starting: proxy listeners not bound yet\n".to_vec())
                } else {
                    reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
                }
            }
            "/metrics" => {
                let table = self.state.routes.load();
                let certs = self.certs.as_ref().map(|c| c.stats());
                let body = metrics::render(&self.state, &table, &self.reload, certs.as_ref());
                reply(StatusCode::OK, "text/plain; version=0.0.4", body.into_bytes())
            }
            "/api/routes" => json_reply(self.routes_json()),
            "/api/instances" => json_reply(self.instances_json()),
            "/api/discovery" => json_reply(self.discovery_json()),
            "/api/certificates" => json_reply(json!({
                "certificates": self.certs.as_ref().map(|c| c.summary()).unwrap_or_default()
            })),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"404: try /healthz /readyz /metrics /api/routes /api/instances /api/discovery /api/certificates\n".to_vec()),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
