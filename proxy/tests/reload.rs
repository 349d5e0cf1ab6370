//! Live reload of routes and certificates while requests flow.
mod common;

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

use common::*;
use test_support::{assert_eventually, assert_eventually_async, process::SIGHUP, EchoBackend};

/// Sends requests to `url` from 4 tasks until `stop`; counts successes and failures.
fn load(
    url: String,
    stop: Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..4)
        .map(|_| {
            let (url, stop, ok, failed) = (url.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::Relaxed) {
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_and_invalid_reloads_under_load_drop_nothing() {
    let core = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let base = module("core", &["/"], &[core.addr()], NO_HEALTH);
    let space = Space::start(&base);
    let first_revision = space.revision().await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = load(space.url("/interface/main.php"), stop.clone());

    // A valid change: a new module appears.
    let with_labs = format!(
        "{base}\n{}",
        module("labs", &["/modules/labs"], &[labs.addr()], NO_HEALTH)
    );
    space.rewrite_modules(&with_labs);
    assert_eventually_async!(
        get_instance(&client(), &space.url("/modules/labs/x")).await == (200, "labs".to_string())
    );
    let second_revision = space.revision().await;
    assert_ne!(first_revision, second_revision);

    // An invalid change: refused, the running table keeps serving.
    space.rewrite_modules(&format!(
        "{with_labs}\n{}",
        module(
            "clash",
            &["/modules/labs"],
            &[labs.addr()],
            "max_body_size = \"lots\""
        )
    ));
    assert_eventually_async!(
        async {
            let (_, v) = test_support::http::get_json(&space.admin_url("/api/routes")).await;
            v["last_reload_error"]
                .as_str()
                .is_some_and(|e| e.contains("max_body_size"))
        }
        .await
    );
    assert_eq!(space.revision().await, second_revision);
    assert_eq!(
        get_instance(&client(), &space.url("/modules/labs/x")).await,
        (200, "labs".to_string())
    );
    assert!(
        space.logs().contains("configuration change refused"),
        "{}",
        space.logs()
    );

    // And a syntax error too.
    space.write_raw_config("[listeners\nhttp = ");
    assert_eventually!(space.logs().matches("configuration change refused").count() >= 2);
    assert_eq!(space.revision().await, second_revision);

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "load ran: {}",
        ok.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_removed_instances_stop_receiving() {
    let a = EchoBackend::start("a");
    let b = EchoBackend::start("b");
    let mut space = Space::start(&module("core", &["/"], &[a.addr(), b.addr()], NO_HEALTH));
    // Change the file without the watcher necessarily noticing: write via a hard path and signal.
    space.rewrite_modules(&module("core", &["/"], &[b.addr()], NO_HEALTH));
    space.process.signal(SIGHUP);
    assert_eventually_async!(
        async {
            let c = client();
            let mut only_b = true;
            for _ in 0..6 {
                only_b &= get_instance(&c, &space.url("/")).await == (200, "b".to_string());
            }
            only_b
        }
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_file_swap_changes_the_served_certificate() {
    let core = EchoBackend::start("core");
    let space = Space::start(&module("core", &["/"], &[core.addr()], NO_HEALTH));
    assert_eq!(
        test_support::tls::fetch_peer_cert_names(space.https, "localhost"),
        vec!["localhost"]
    );
    // Replace the default pair with a certificate for other names.
    space.pki.write_pair(
        &space.cert_dir(),
        "default",
        &["localhost", "renewed.example.test"],
    );
    assert_eventually!(
        test_support::tls::fetch_peer_cert_names(space.https, "localhost")
            .contains(&"renewed.example.test".to_string())
    );

    // A corrupt replacement is refused: the previous certificate keeps serving.
    write_atomically(
        &space.cert_dir().join("default.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    assert_eventually!(space.logs().contains("refused"));
    assert!(
        test_support::tls::fetch_peer_cert_names(space.https, "localhost")
            .contains(&"renewed.example.test".to_string())
    );
    let r = test_support::tls::https_client(space.pki.ca_pem())
        .get(space.https_url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
