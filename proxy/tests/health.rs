//! Active and passive health: ejection, recovery, first-pass admission, retries, 503.
mod common;

use std::collections::HashSet;

use common::*;
use test_support::{assert_eventually_async, EchoBackend};

async fn instances_seen(space: &Space, n: usize) -> HashSet<String> {
    let c = client();
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (status, instance) = get_instance(&c, &space.url("/x")).await;
        assert_eq!(
            status, 200,
            "every request must succeed, got {status} {instance}"
        );
        seen.insert(instance);
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_health_checks_eject_and_recovery_readmits() {
    let a = EchoBackend::start("a");
    let b = EchoBackend::start("b");
    let space = Space::start(&module("core", &["/"], &[a.addr(), b.addr()], FAST_HEALTH));
    assert_eventually_async!(instances_seen(&space, 10).await.len() == 2);

    b.set_healthy(false);
    // Once the check has seen it, b gets no more traffic (its 503s never reach clients).
    assert_eventually_async!(
        async {
            let c = client();
            let mut ok = true;
            for _ in 0..10 {
                let (status, instance) = get_instance(&c, &space.url("/x")).await;
                ok &= status == 200 && instance == "a";
            }
            ok
        }
        .await
    );
    assert_eq!(
        space.instance(&b.addr().to_string()).await["health"],
        "down"
    );

    b.set_healthy(true);
    assert_eventually_async!(instances_seen(&space, 10).await.contains("b"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_instance_waits_for_its_first_passing_check() {
    let a = EchoBackend::start("a");
    let b = EchoBackend::start("b");
    b.set_healthy(false);
    let space = Space::start(&module("core", &["/"], &[a.addr(), b.addr()], FAST_HEALTH));
    // b has never passed a check: it must never have served a client request.
    let seen = instances_seen(&space, 30).await;
    assert_eq!(seen, HashSet::from(["a".to_string()]));
    b.set_healthy(true);
    assert_eventually_async!(instances_seen(&space, 10).await.contains("b"));
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failure_is_retried_on_another_instance() {
    let a = EchoBackend::start("a");
    let mut b = EchoBackend::start("b");
    b.stop();
    let space = Space::start(&module(
        "core",
        &["/"],
        &[a.addr(), b.addr()],
        "health_check = { enabled = false, max_fails = 1000 }",
    ));
    // Round robin sends every other request to the dead instance; each is retried on a.
    let seen = instances_seen(&space, 20).await;
    assert_eq!(seen, HashSet::from(["a".to_string()]));
    let metrics = space.metrics().await;
    assert!(
        metrics.contains("space_upstream_retries_total{module=\"core\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("space_upstream_retries_total{module=\"core\"} 0\n"),
        "retries must be counted:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_connect_failures_mark_the_instance_down() {
    let a = EchoBackend::start("a");
    let mut b = EchoBackend::start("b");
    b.stop();
    let space = Space::start(&module(
        "core",
        &["/"],
        &[a.addr(), b.addr()],
        "health_check = { enabled = false, max_fails = 2, fail_timeout = \"1h\" }",
    ));
    instances_seen(&space, 10).await;
    let b_state = space.instance(&b.addr().to_string()).await;
    assert_eq!(b_state["health"], "down", "{b_state}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_healthy_instance_is_a_quick_503() {
    let mut a = EchoBackend::start("a");
    a.stop();
    let space = Space::start(&module("core", &["/"], &[a.addr()], FAST_HEALTH));
    let r = client().get(space.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    assert!(r.headers().contains_key("x-request-id"));
    let body = r.text().await.unwrap();
    assert!(body.contains("no healthy instance"), "{body}");

    // Without active checks the connect fails and, with nothing else to try, the
    // client gets 502 rather than a hang.
    let mut b = EchoBackend::start("b");
    b.stop();
    let space2 = Space::start(&module("core", &["/"], &[b.addr()], NO_HEALTH));
    let r = client()
        .get(space2.url("/chart.php?patient=Jane+Doe"))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 502 || r.status() == 503, "{}", r.status());
    // Error lines name the request without its query string (it can hold patient data).
    test_support::assert_eventually!(space2.logs().contains("/chart.php"));
    assert!(!space2.logs().contains("Jane"), "{}", space2.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_backend_beyond_read_timeout_is_504() {
    let a = EchoBackend::start("a");
    let space = Space::start(&module(
        "core",
        &["/"],
        &[a.addr()],
        &format!("{NO_HEALTH}\ntimeouts = {{ read = \"300ms\" }}"),
    ));
    let r = client()
        .get(space.url("/slow?ms=3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
}
