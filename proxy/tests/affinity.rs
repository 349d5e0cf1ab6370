//! Session affinity with real PHP sessions: every instance keeps its own session files
//! (`session.save_path`) with `session.use_strict_mode=1`, so a request that lands on the
//! wrong instance restarts its counter at 1.
mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;
use test_support::{assert_eventually_async, PhpServer};

const AFFINITY: &str = "session_cookies = [\"PHPSESSID\"]\naffinity = { cookie = \"space-portal\", drain_timeout = \"2s\" }";

/// The portal module with every one of `php` serving (none draining).
fn serving(php: &[PhpServer]) -> String {
    php_module(&php.iter().map(|p| (p, false)).collect::<Vec<_>>(), "")
}

fn php_module(instances: &[(&PhpServer, bool)], extra: &str) -> String {
    let mut s = format!(
        "[[module]]\nname = \"portal\"\nprefixes = [\"/\"]\n{AFFINITY}\n{FAST_HEALTH}\n{extra}\n"
    );
    for (php, draining) in instances {
        s.push_str(&format!(
            "[[module.instances]]\nid = \"{}\"\naddr = \"{}\"\ndraining = {draining}\n",
            php.instance_id(),
            php.addr()
        ));
    }
    s
}

/// One browser: its own cookie jar.
struct Browser {
    client: reqwest::Client,
}

impl Browser {
    fn new() -> Self {
        Browser {
            client: test_support::http::cookie_client(),
        }
    }

    /// (instance, counter, session id) of one request to the counter page.
    async fn count(&self, base: &str) -> (String, i64, String) {
        let r = self
            .client
            .get(format!("{base}/counter.php"))
            .send()
            .await
            .expect("request succeeds");
        assert_eq!(r.status(), 200, "counter request failed");
        let v: Value = r.json().await.unwrap();
        (
            v["instance"].as_str().unwrap().to_string(),
            v["counter"].as_i64().unwrap(),
            v["session_id"].as_str().unwrap().to_string(),
        )
    }
}

fn php_servers(n: usize) -> Vec<PhpServer> {
    (0..n)
        .map(|i| PhpServer::start(&format!("php-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_sessions_count_to_twenty_without_reset() {
    let php = php_servers(3);
    let space = Space::start(&serving(&php[..3]));
    let base = space.url("");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move {
                let b = Browser::new();
                let mut seen = Vec::new();
                for _ in 0..20 {
                    let (instance, counter, _) = b.count(&base).await;
                    seen.push((instance, counter));
                }
                seen
            })
        })
        .collect();
    let mut per_instance: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let seen = t.await.unwrap();
        let counters: Vec<i64> = seen.iter().map(|(_, c)| *c).collect();
        assert_eq!(
            counters,
            (1..=20).collect::<Vec<_>>(),
            "a session was reset: {seen:?}"
        );
        assert!(
            seen.iter().all(|(i, _)| *i == seen[0].0),
            "a session moved: {seen:?}"
        );
        *per_instance.entry(seen[0].0.clone()).or_default() += 1;
    }
    assert_eq!(
        per_instance.len(),
        3,
        "new sessions spread over instances: {per_instance:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn adding_an_instance_moves_no_session_and_takes_new_ones() {
    let php = php_servers(4);
    let space = Space::start(&serving(&php[..3]));
    let base = space.url("");
    let browsers: Vec<Browser> = (0..20).map(|_| Browser::new()).collect();
    let mut home = Vec::new();
    for b in &browsers {
        b.count(&base).await;
        home.push(b.count(&base).await.0);
    }
    space.rewrite_modules(&serving(&php[..4]));
    // The new instance is in the table and has passed its first check.
    assert_eventually_async!(
        async {
            let (_, v) = test_support::http::get_json(&space.admin_url("/api/instances")).await;
            v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == "php-3" && i["health"] == "up")
        }
        .await
    );
    for (b, h) in browsers.iter().zip(&home) {
        let (instance, counter, _) = b.count(&base).await;
        assert_eq!(
            (&instance, counter),
            (h, 3),
            "an existing session moved or reset"
        );
    }
    assert_eventually_async!(
        async {
            let mut reached = false;
            for _ in 0..8 {
                reached |= Browser::new().count(&base).await.0 == "php-3";
            }
            reached
        }
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_keeps_pinned_sessions_until_the_deadline() {
    let php = php_servers(2);
    let space = Space::start(&serving(&php[..2]));
    let base = space.url("");
    // Sessions on both instances.
    let mut on_0 = Vec::new();
    while on_0.len() < 3 {
        let b = Browser::new();
        if b.count(&base).await.0 == "php-0" {
            on_0.push(b);
        }
    }
    space.rewrite_modules(&php_module(&[(&php[0], true), (&php[1], false)], ""));
    assert_eventually_async!(
        async {
            let (_, v) = test_support::http::get_json(&space.admin_url("/api/instances")).await;
            v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == "php-0" && i["draining"] == true)
        }
        .await
    );
    // Pinned sessions keep counting on the draining instance (within its 2 s deadline)...
    for b in &on_0 {
        let (instance, counter, _) = b.count(&base).await;
        if counter == 2 {
            assert_eq!(instance, "php-0");
        }
    }
    // ...new sessions avoid it...
    for _ in 0..10 {
        assert_eq!(Browser::new().count(&base).await.0, "php-1");
    }
    // ...and after the deadline its sessions are re-pinned (their counter restarts).
    let b = &on_0[0];
    assert_eventually_async!(b.count(&base).await.0 == "php-1");
    let (instance, counter, _) = b.count(&base).await;
    assert_eq!(instance, "php-1");
    assert!(
        counter >= 2,
        "the re-pinned session continues on its new instance"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_repins_only_its_sessions_and_no_request_fails() {
    let mut php = php_servers(3);
    let space = Space::start(&serving(&php[..3]));
    let base = space.url("");
    let browsers: Vec<Browser> = (0..15).map(|_| Browser::new()).collect();
    let mut before = Vec::new();
    let mut session_ids = Vec::new();
    for b in &browsers {
        b.count(&base).await;
        let (instance, _, sid) = b.count(&base).await;
        before.push(instance);
        session_ids.push(sid);
    }
    let victim = before[0].clone();
    php.iter_mut()
        .find(|p| p.instance_id() == victim)
        .unwrap()
        .stop();
    for (b, home) in browsers.iter().zip(&before) {
        let (instance, counter, sid) = b.count(&base).await; // must not fail
        session_ids.push(sid);
        if *home == victim {
            assert_ne!(instance, victim);
            assert_eq!(
                counter, 1,
                "a moved session starts again on its new instance"
            );
        } else {
            assert_eq!(
                (&instance, counter),
                (home, 3),
                "an unaffected session moved"
            );
        }
        // And it stays on its new home.
        let (again, next, _) = b.count(&base).await;
        assert_eq!(again, instance);
        assert_eq!(next, counter + 1);
    }
    let metrics = space.metrics().await;
    assert!(!metrics.contains("outcome=\"repinned\"} 0\n"), "{metrics}");
    // The logs say what happened, but never hold a raw session id.
    let logs = space.logs();
    assert!(logs.contains("session re-pinned"), "{logs}");
    for sid in session_ids {
        assert!(!logs.contains(&sid), "raw session id {sid} in the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_sharing_a_key_file_behave_as_one() {
    let php = php_servers(3);
    let modules = serving(&php[..3]);
    let key_dir = test_support::temp_dir();
    let key_file = key_dir.path().join("affinity.key");
    std::fs::write(&key_file, "replica-shared-key-0123456789abcdef\n").unwrap();
    let extra = format!("[affinity]\nkey_file = \"{}\"\n", key_file.display());
    let a = Space::start(&format!("{modules}\n{extra}"));
    let b = Space::start(&format!("{modules}\n{extra}"));
    for _ in 0..10 {
        let browser = Browser::new();
        for i in 1..=20 {
            let base = if i % 2 == 0 { a.url("") } else { b.url("") };
            let (_, counter, _) = browser.count(&base).await;
            assert_eq!(
                counter, i,
                "the session continued through the other replica"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_routing_cookie_is_ignored() {
    let php = php_servers(2);
    let space = Space::start(&serving(&php[..2]));
    let c = client();
    for forged in ["127.0.0.1:80", "AAAAAAAAAAAAAAAAAAAAAA", "php-0"] {
        let r = c
            .get(space.url("/counter.php"))
            .header("cookie", format!("space-portal={forged}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let set = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("space-portal="))
            .unwrap_or("")
            .to_string();
        assert!(
            set.starts_with("space-portal=") && !set.contains(forged),
            "a new pin replaces {forged}: {set}"
        );
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/"),
            "{set}"
        );
        assert!(
            !set.contains("127.0.0.1") && !set.contains("php-"),
            "the cookie must be opaque: {set}"
        );
    }
    let metrics = space.metrics().await;
    assert!(
        metrics.contains("space_affinity_total{module=\"portal\",outcome=\"invalid\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secure_flags_over_https_and_never_httponly_on_backend_cookies() {
    let php = PhpServer::builder("php-0")
        .session_name("LibreHealthEHR")
        .start();
    let modules = format!(
        "[[module]]\nname = \"core\"\nprefixes = [\"/\"]\nsession_cookies = [\"LibreHealthEHR\"]\n\
         affinity = {{ secure_session_cookies = true, session_cookie_samesite = \"Lax\" }}\n{NO_HEALTH}\n\
         [[module.instances]]\naddr = \"{}\"\n",
        php.addr()
    );
    let space = Space::start(&modules);
    let tls = test_support::tls::https_client(space.pki.ca_pem());
    let r = tls
        .get(space.https_url("/counter.php"))
        .send()
        .await
        .unwrap();
    let cookies: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let ehr = cookies
        .iter()
        .find(|c| c.starts_with("LibreHealthEHR="))
        .expect("backend cookie passes");
    assert!(
        ehr.contains("; Secure") && ehr.contains("SameSite=Lax"),
        "{ehr}"
    );
    assert!(!ehr.to_ascii_lowercase().contains("httponly"), "{ehr}");
    let ours = cookies
        .iter()
        .find(|c| c.starts_with("space-core="))
        .expect("routing cookie set");
    assert!(
        ours.contains("; Secure") && ours.contains("HttpOnly"),
        "{ours}"
    );

    // Over plain HTTP the backend's cookie is untouched.
    let r = client()
        .get(space.url("/counter.php"))
        .send()
        .await
        .unwrap();
    let ehr = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("LibreHealthEHR="))
        .unwrap();
    assert!(!ehr.contains("Secure"), "{ehr}");
}
