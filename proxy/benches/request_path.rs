//! The request path's own work, without the network: path normalization, request-id
//! checks and forwarding-header preparation.
//! Run: `cargo bench -p space-proxy --bench request_path`
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use pingora_http::RequestHeader;
use space_proxy::{
    headers::{is_well_formed_request_id, new_request_id, prepare_upstream_request, Forwarding},
    path::normalize_path,
};

fn bench(c: &mut Criterion) {
    c.bench_function("normalize clean path (borrowed)", |b| {
        b.iter(|| black_box(normalize_path(black_box("/interface/main/tabs/main.php")).is_ok()))
    });
    c.bench_function("normalize traversal path", |b| {
        b.iter(|| {
            black_box(
                normalize_path(black_box("/patient_portal/%2e%2e/sites//default/./x")).is_ok(),
            )
        })
    });
    c.bench_function("check client request id", |b| {
        b.iter(|| {
            black_box(is_well_formed_request_id(black_box(
                b"5f0c7e1a9b2d4c6e8f0a1b2c3d4e5f60",
            )))
        })
    });
    c.bench_function("new request id", |b| b.iter(|| black_box(new_request_id())));
    let id = HeaderValue::from_static("5f0c7e1a9b2d4c6e8f0a1b2c3d4e5f60");
    c.bench_function("prepare upstream headers (typical browser request)", |b| {
        b.iter_batched(
            || {
                let mut r =
                    RequestHeader::build("GET", b"/interface/main/tabs/main.php", None).unwrap();
                for (k, v) in [
                    ("host", "ehr.example.org"),
                    (
                        "user-agent",
                        "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
                    ),
                    ("accept", "text/html,application/xhtml+xml"),
                    ("accept-language", "en-US,en;q=0.5"),
                    (
                        "cookie",
                        "LibreHealthEHR=abc123; space-ehr=AAAAAAAAAAAAAAAAAAAAAA",
                    ),
                    ("connection", "keep-alive"),
                ] {
                    r.append_header(k, v).unwrap();
                }
                r
            },
            |mut r| {
                prepare_upstream_request(
                    &mut r,
                    &Forwarding {
                        client_ip: Some("192.0.2.10".parse().unwrap()),
                        trusted: false,
                        proto: "https",
                        request_id: &id,
                    },
                );
                black_box(r)
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
