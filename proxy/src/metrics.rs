//! Prometheus text exposition of SPACE's counters. The request path updates plain atomics
//! held by the route table (no label lookups per request); this module renders them when
//! `/metrics` is scraped.
use std::{fmt::Write, sync::atomic::Ordering};

use space_registry::{Health, RouteTable, LATENCY_BUCKETS_MS};

use crate::{reload::ReloadStats, service::ProxyState};

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value escaped for the text format; borrowed when nothing needs escaping (module
/// and instance names never do).
fn esc(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(v);
    }
    std::borrow::Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

/// Renders every metric.
pub fn render(
    state: &ProxyState,
    table: &RouteTable,
    reload: &ReloadStats,
    certs: Option<&space_certs::CertStats>,
) -> String {
    let mut out = String::with_capacity(8192);
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    family(
        &mut out,
        "space_route_table_info",
        "gauge",
        "Revision of the route table in use (file hash or etcd revision).",
    );
    let _ = writeln!(
        out,
        "space_route_table_info{{revision=\"{}\"}} 1",
        esc(table.revision())
    );
    family(
        &mut out,
        "space_route_table_modules",
        "gauge",
        "Modules in the route table.",
    );
    let _ = writeln!(out, "space_route_table_modules {}", table.modules().len());
    family(
        &mut out,
        "space_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
    );
    let _ = writeln!(
        out,
        "space_config_reloads_total{{result=\"applied\"}} {}",
        load(&reload.applied)
    );
    let _ = writeln!(
        out,
        "space_config_reloads_total{{result=\"refused\"}} {}",
        load(&reload.refused)
    );
    family(
        &mut out,
        "space_requests_in_flight",
        "gauge",
        "Requests being handled.",
    );
    let _ = writeln!(out, "space_requests_in_flight {}", load(&state.in_flight));
    family(
        &mut out,
        "space_refused_requests_total",
        "counter",
        "Requests SPACE answered itself, by reason.",
    );
    let g = &state.global;
    for (reason, v) in [
        ("bad_path", &g.bad_path),
        ("no_route", &g.no_route),
        ("header_too_large", &g.header_too_large),
        ("redirect_to_https", &g.redirects),
    ] {
        let _ = writeln!(
            out,
            "space_refused_requests_total{{module=\"\",reason=\"{reason}\"}} {}",
            load(v)
        );
    }
    for m in table.modules() {
        let name = esc(m.spec.name.as_str());
        let s = &m.stats;
        for (reason, v) in [
            ("denied", &s.denied),
            ("body_too_large", &s.body_too_large),
            ("no_instance", &s.no_instance),
        ] {
            let _ = writeln!(
                out,
                "space_refused_requests_total{{module=\"{name}\",reason=\"{reason}\"}} {}",
                load(v)
            );
        }
    }

    family(
        &mut out,
        "space_responses_total",
        "counter",
        "Responses by module and status class.",
    );
    for m in table.modules() {
        let name = esc(m.spec.name.as_str());
        for (i, class) in ["none", "1xx", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "space_responses_total{{module=\"{name}\",class=\"{class}\"}} {}",
                load(&m.stats.responses[i])
            );
        }
    }
    family(
        &mut out,
        "space_upstream_retries_total",
        "counter",
        "Requests retried on another instance after a connect failure.",
    );
    for m in table.modules() {
        let _ = writeln!(
            out,
            "space_upstream_retries_total{{module=\"{}\"}} {}",
            esc(m.spec.name.as_str()),
            load(&m.stats.retries)
        );
    }
    family(
        &mut out,
        "space_passive_ejections_total",
        "counter",
        "Instances taken down by failed requests.",
    );
    for m in table.modules() {
        let _ = writeln!(
            out,
            "space_passive_ejections_total{{module=\"{}\"}} {}",
            esc(m.spec.name.as_str()),
            load(&m.stats.passive_ejections)
        );
    }
    family(&mut out, "space_affinity_total", "counter", "Session-affinity outcomes by module: kept (followed a routing cookie), new (cookie issued), repinned (instance down, removed or drained: the session moved), invalid (forged, stale or malformed cookie ignored), hash_fallback (pinned by the backend's session cookie).");
    for m in table.modules().iter().filter(|m| m.affinity.is_some()) {
        let name = esc(m.spec.name.as_str());
        let s = &m.stats;
        for (outcome, v) in [
            ("kept", &s.affinity_kept),
            ("new", &s.affinity_new),
            ("repinned", &s.affinity_repinned),
            ("invalid", &s.affinity_invalid),
            ("hash_fallback", &s.affinity_hash_fallback),
        ] {
            let _ = writeln!(
                out,
                "space_affinity_total{{module=\"{name}\",outcome=\"{outcome}\"}} {}",
                load(v)
            );
        }
    }
    family(
        &mut out,
        "space_request_duration_seconds",
        "histogram",
        "Time from request head to end of response, by module.",
    );
    for m in table.modules() {
        let name = esc(m.spec.name.as_str());
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += load(&m.stats.latency_buckets[i]);
            let _ = writeln!(
                out,
                "space_request_duration_seconds_bucket{{module=\"{name}\",le=\"{}\"}} {cumulative}",
                *le as f64 / 1000.0
            );
        }
        cumulative += load(&m.stats.latency_buckets[LATENCY_BUCKETS_MS.len()]);
        let _ = writeln!(
            out,
            "space_request_duration_seconds_bucket{{module=\"{name}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "space_request_duration_seconds_sum{{module=\"{name}\"}} {}",
            load(&m.stats.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "space_request_duration_seconds_count{{module=\"{name}\"}} {cumulative}"
        );
    }

    family(
        &mut out,
        "space_instance_up",
        "gauge",
        "1 when the instance takes traffic (health up), 0 when pending or down.",
    );
    for m in table.modules() {
        for i in &m.instances {
            let up = u8::from(i.state.health() == Health::Up);
            let _ = writeln!(
                out,
                "space_instance_up{{module=\"{}\",instance=\"{}\",draining=\"{}\"}} {up}",
                esc(m.spec.name.as_str()),
                esc(i.spec.id.as_str()),
                i.spec.draining
            );
        }
    }
    family(
        &mut out,
        "space_instance_requests_in_flight",
        "gauge",
        "Requests in flight per instance.",
    );
    for m in table.modules() {
        for i in &m.instances {
            let _ = writeln!(
                out,
                "space_instance_requests_in_flight{{module=\"{}\",instance=\"{}\"}} {}",
                esc(m.spec.name.as_str()),
                esc(i.spec.id.as_str()),
                i.state.in_flight()
            );
        }
    }
    family(
        &mut out,
        "space_instance_requests_total",
        "counter",
        "Requests sent per instance.",
    );
    for m in table.modules() {
        for i in &m.instances {
            let _ = writeln!(
                out,
                "space_instance_requests_total{{module=\"{}\",instance=\"{}\"}} {}",
                esc(m.spec.name.as_str()),
                esc(i.spec.id.as_str()),
                i.state.requests()
            );
        }
    }
    family(&mut out, "space_discovery_refused", "gauge", "Pieces of desired state refused right now (bad etcd keys, overlapping modules, instances of unknown modules).");
    let refusals = state.desired.refusals();
    let _ = writeln!(out, "space_discovery_refused {}", refusals.len());
    family(
        &mut out,
        "space_discovery_refused_source",
        "gauge",
        "1 for each refused key or file, named by `source`.",
    );
    for r in refusals.iter() {
        let _ = writeln!(
            out,
            "space_discovery_refused_source{{source=\"{}\"}} 1",
            esc(&r.source)
        );
    }
    if let Some(e) = &state.etcd {
        use std::sync::atomic::Ordering::Relaxed;
        family(
            &mut out,
            "space_etcd_connected",
            "gauge",
            "1 while the etcd watch is established.",
        );
        let _ = writeln!(
            out,
            "space_etcd_connected {}",
            u8::from(e.connected.load(Relaxed))
        );
        family(
            &mut out,
            "space_etcd_revision",
            "gauge",
            "Last etcd revision applied.",
        );
        let _ = writeln!(out, "space_etcd_revision {}", e.revision.load(Relaxed));
        family(
            &mut out,
            "space_etcd_serving_snapshot",
            "gauge",
            "1 while serving the snapshot file because etcd has not answered since start.",
        );
        let _ = writeln!(
            out,
            "space_etcd_serving_snapshot {}",
            u8::from(e.serving_snapshot.load(Relaxed))
        );
        for (name, help, v) in [
            (
                "space_etcd_full_syncs_total",
                "Full reads of the etcd prefix.",
                &e.full_syncs,
            ),
            (
                "space_etcd_reconnects_total",
                "Lost etcd connections.",
                &e.reconnects,
            ),
            (
                "space_etcd_compactions_total",
                "Resyncs forced by compaction.",
                &e.compactions,
            ),
            (
                "space_etcd_events_total",
                "etcd watch events applied.",
                &e.events,
            ),
            (
                "space_etcd_batches_total",
                "Batches of etcd events applied as one table.",
                &e.batches,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
    }
    if let Some(dns) = state.dns.get() {
        let status = dns.status();
        family(
            &mut out,
            "space_dns_instances",
            "gauge",
            "Instances from the last good DNS answer, by module.",
        );
        for st in &status {
            let _ = writeln!(
                out,
                "space_dns_instances{{module=\"{}\"}} {}",
                esc(&st.module),
                st.instances
            );
        }
        family(
            &mut out,
            "space_dns_failures_total",
            "counter",
            "Failed or empty DNS answers (the last known instances were kept), by module.",
        );
        for st in &status {
            let _ = writeln!(
                out,
                "space_dns_failures_total{{module=\"{}\"}} {}",
                esc(&st.module),
                st.failures_total
            );
        }
    }
    if let Some(c) = certs {
        family(
            &mut out,
            "space_certificate_reloads_total",
            "counter",
            "Certificate directory reloads by result.",
        );
        let _ = writeln!(
            out,
            "space_certificate_reloads_total{{result=\"applied\"}} {}",
            c.reloads_ok
        );
        let _ = writeln!(
            out,
            "space_certificate_reloads_total{{result=\"refused\"}} {}",
            c.pairs_refused
        );
    }
    out
}
