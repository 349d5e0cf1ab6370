//! Discovery from a real etcd (Debian's etcd-server, started by the test): registration,
//! lease expiry, draining, outages, compaction, the snapshot, and bad keys refused alone.
mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use serde_json::json;
use test_support::{assert_eventually, assert_eventually_async, EchoBackend, Etcd, SpaceProcess};

/// A TCP relay between SPACE and etcd that the test can cut, like a network partition.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    _thread: std::thread::JoinHandle<()>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let flag = open.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !flag.load(Ordering::SeqCst) {
                        continue; // dropped: connection closed at once
                    }
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                        let cut = async {
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        };
                        tokio::select! { _ = copy => {}, _ = cut => {} }
                    });
                }
            });
        });
        Relay {
            addr,
            open,
            _thread: thread,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn etcd_section(endpoint: &str, extra: &str) -> String {
    format!("[discovery.etcd]\nendpoints = [\"{endpoint}\"]\nprefix = \"/space/\"\n{extra}\n")
}

fn core(backend: &EchoBackend) -> String {
    module("core", &["/"], &[backend.addr()], NO_HEALTH)
}

fn put_module(etcd: &Etcd, name: &str, prefix: &str) {
    let manifest = json!({"name": name, "prefixes": [prefix], "health_check": {"enabled": false}});
    etcd.put(&format!("/space/modules/{name}"), &manifest.to_string());
}

fn put_instance(etcd: &Etcd, module: &str, id: &str, addr: SocketAddr, lease: Option<i64>) {
    let value = json!({"addr": addr.to_string(), "weight": 1, "draining": false}).to_string();
    let key = format!("/space/instances/{module}/{id}");
    match lease {
        Some(l) => etcd.put_with_lease(&key, &value, l),
        None => etcd.put(&key, &value),
    };
}

/// SPACE with a file-configured core module (served by `base`) and etcd discovery.
fn with_etcd(base: &EchoBackend, endpoint: &str, etcd_extra: &str) -> Space {
    Space::start(&format!(
        "{}\n{}",
        core(base),
        etcd_section(endpoint, etcd_extra)
    ))
}

/// Whether SPACE's etcd watch is established, from the admin API.
async fn etcd_connected(space: &Space) -> bool {
    let (_, v) = test_support::http::get_json(&space.admin_url("/api/discovery")).await;
    v["etcd"]["connected"] == true
}

async fn instance_at(space: &Space, path: &str) -> (u16, String) {
    get_instance(&client(), &space.url(path)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_module_is_routed_and_lease_expiry_removes_it() {
    let etcd = Etcd::start();
    let base = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let space = with_etcd(&base, &etcd.endpoint(), "");
    assert_eq!(instance_at(&space, "/modules/labs/x").await.1, "core");

    put_module(&etcd, "labs", "/modules/labs");
    let lease = etcd.grant_lease(2);
    put_instance(&etcd, "labs", "labs-1", labs.addr(), Some(lease));
    assert_eventually_async!(
        instance_at(&space, "/modules/labs/x").await == (200, "labs".to_string())
    );
    let (_, v) = test_support::http::get_json(&space.admin_url("/api/routes")).await;
    assert!(v["revision"].as_str().unwrap().contains("etcd:"), "{v}");

    // Nobody keeps the lease alive: the instance expires and the module has none left.
    assert_eventually_async!(instance_at(&space, "/modules/labs/x").await.0 == 503);
    assert_eq!(instance_at(&space, "/").await, (200, "core".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_from_etcd_keeps_pinned_sessions_and_avoids_new_ones() {
    let etcd = Etcd::start();
    let base = EchoBackend::start("core");
    let a = EchoBackend::start("a");
    let b = EchoBackend::start("b");
    let space = with_etcd(&base, &etcd.endpoint(), "");
    let manifest = json!({"name": "labs", "prefixes": ["/labs"], "health_check": {"enabled": false},
        "affinity": {"cookie": "space-labs", "drain_timeout": "1h"}});
    etcd.put("/space/modules/labs", &manifest.to_string());
    put_instance(&etcd, "labs", "a", a.addr(), None);
    put_instance(&etcd, "labs", "b", b.addr(), None);
    assert_eventually_async!(instance_at(&space, "/labs/").await.0 == 200);

    // A browser pinned to a.
    let browser = loop {
        let c = test_support::http::cookie_client();
        if get_instance(&c, &space.url("/labs/")).await.1 == "a" {
            break c;
        }
    };
    etcd.put(
        "/space/instances/labs/a",
        &json!({"addr": a.addr().to_string(), "draining": true}).to_string(),
    );
    assert_eventually_async!(
        async {
            let (_, v) = test_support::http::get_json(&space.admin_url("/api/instances")).await;
            v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == "a" && i["draining"] == true)
        }
        .await
    );
    for _ in 0..5 {
        assert_eq!(
            get_instance(&browser, &space.url("/labs/")).await.1,
            "a",
            "pinned session stays"
        );
        assert_eq!(
            instance_at(&space, "/labs/").await.1,
            "b",
            "new sessions avoid the draining instance"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_outage_keeps_serving_and_later_changes_apply() {
    let mut etcd = Etcd::start();
    let base = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let portal = EchoBackend::start("portal");
    let space = with_etcd(&base, &etcd.endpoint(), "");
    put_module(&etcd, "labs", "/labs");
    put_instance(&etcd, "labs", "labs-1", labs.addr(), None);
    assert_eventually_async!(instance_at(&space, "/labs/x").await == (200, "labs".to_string()));

    etcd.stop();
    for _ in 0..20 {
        assert_eq!(
            instance_at(&space, "/labs/x").await,
            (200, "labs".to_string())
        );
    }
    assert_eventually_async!(!etcd_connected(&space).await);

    etcd.restart();
    put_module(&etcd, "portal", "/patient_portal");
    put_instance(&etcd, "portal", "p-1", portal.addr(), None);
    assert_eventually_async!(
        instance_at(&space, "/patient_portal/").await == (200, "portal".to_string())
    );
    assert_eq!(
        instance_at(&space, "/labs/x").await,
        (200, "labs".to_string())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_during_a_partition_forces_a_full_resync() {
    let etcd = Etcd::start();
    let relay = Relay::start(etcd.client_addr());
    let base = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let portal = EchoBackend::start("portal");
    let space = with_etcd(
        &base,
        &format!("http://{}", relay.addr),
        "connect_timeout = \"500ms\"",
    );
    put_module(&etcd, "labs", "/labs");
    put_instance(&etcd, "labs", "labs-1", labs.addr(), None);
    assert_eventually_async!(instance_at(&space, "/labs/x").await == (200, "labs".to_string()));

    relay.cut();
    assert_eventually_async!(!etcd_connected(&space).await);
    // While SPACE cannot see etcd: a module goes, another comes, and history is compacted.
    etcd.delete_prefix("/space/instances/labs/");
    etcd.delete("/space/modules/labs");
    put_module(&etcd, "portal", "/patient_portal");
    put_instance(&etcd, "portal", "p-1", portal.addr(), None);
    etcd.compact(etcd.revision());
    assert_eq!(
        instance_at(&space, "/labs/x").await,
        (200, "labs".to_string()),
        "still the last known table"
    );

    relay.restore();
    assert_eventually_async!(
        instance_at(&space, "/patient_portal/").await == (200, "portal".to_string())
    );
    assert_eq!(
        instance_at(&space, "/labs/x").await.1,
        "core",
        "the deleted module is gone after the resync"
    );
    let (_, v) = test_support::http::get_json(&space.admin_url("/api/discovery")).await;
    assert!(v["etcd"]["compactions"].as_u64().unwrap() >= 1, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_while_etcd_is_down_serves_from_the_snapshot() {
    let mut etcd = Etcd::start();
    let base = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let dir = test_support::temp_dir();
    let snapshot = dir.path().join("etcd-snapshot.json");
    let section = etcd_section(
        &etcd.endpoint(),
        &format!("snapshot_file = \"{}\"", snapshot.display()),
    );
    let mut space = Space::start(&format!("{}\n{section}", core(&base)));
    put_module(&etcd, "labs", "/labs");
    put_instance(&etcd, "labs", "labs-1", labs.addr(), None);
    assert_eventually_async!(instance_at(&space, "/labs/x").await == (200, "labs".to_string()));
    assert_eventually!(std::fs::read_to_string(&snapshot).is_ok_and(|s| s.contains("labs-1")));

    space.process.signal(test_support::process::SIGTERM);
    space
        .process
        .wait_exit(Duration::from_secs(20))
        .expect("space exits");
    etcd.stop();

    let mut again = SpaceProcess::spawn(
        SPACE,
        ["run", "--config", space.config_path.to_str().unwrap()],
    );
    again.wait_ready(space.admin);
    assert_eq!(
        instance_at(&space, "/labs/x").await,
        (200, "labs".to_string())
    );
    assert!(again.logs().contains("snapshot"), "{}", again.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_key_is_refused_alone() {
    let etcd = Etcd::start();
    let base = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let space = with_etcd(&base, &etcd.endpoint(), "");
    etcd.put("/space/modules/broken", "{not json");
    put_module(&etcd, "labs", "/labs");
    etcd.put(
        "/space/modules/clash",
        &json!({"name": "clash", "prefixes": ["/labs"]}).to_string(),
    );
    put_instance(&etcd, "labs", "labs-1", labs.addr(), None);
    etcd.put(
        "/space/instances/labs/heavy",
        &json!({"addr": "127.0.0.1:9", "weight": 0}).to_string(),
    );
    etcd.put(
        "/space/instances/ghost/g-1",
        &json!({"addr": "127.0.0.1:9"}).to_string(),
    );
    assert_eventually_async!(instance_at(&space, "/labs/x").await == (200, "labs".to_string()));
    // All keys written so far have been applied once the last one is refused.
    assert_eventually_async!(
        async {
            let (_, v) = test_support::http::get_json(&space.admin_url("/api/routes")).await;
            v["refused"].to_string().contains("instances/ghost/g-1")
        }
        .await
    );
    let (_, v) = test_support::http::get_json(&space.admin_url("/api/routes")).await;
    let refused: Vec<String> = v["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap().to_string())
        .collect();
    for key in [
        "modules/broken",
        "instances/labs/heavy",
        "instances/ghost/g-1",
    ] {
        assert!(
            refused.contains(&format!("etcd:/space/{key}")),
            "{key} not refused: {v}"
        );
    }
    // The older of two modules claiming /labs keeps it.
    assert!(
        refused.contains(&"etcd:/space/modules/clash".to_string()),
        "{v}"
    );
    let metrics = space.metrics().await;
    assert!(
        metrics.contains("space_discovery_refused_source{source=\"etcd:/space/modules/broken\"} 1"),
        "{metrics}"
    );
    assert!(
        space.logs().contains("/space/modules/broken"),
        "the log names the key"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dns_answers_become_instances_and_follow_changes() {
    let port = test_support::free_port();
    let a = EchoBackend::start_on("pod-a", SocketAddr::from(([127, 0, 0, 2], port)));
    let b = EchoBackend::start_on("pod-b", SocketAddr::from(([127, 0, 0, 3], port)));
    let dns = test_support::Dnsmasq::start();
    let name = "portal.ehr.svc.cluster.local";
    dns.set_hosts(name, &[a.addr().ip()]);
    let base = EchoBackend::start("core");
    let portal = format!(
        "[[module]]\nname = \"portal\"\nprefixes = [\"/patient_portal\"]\ndns = \"{name}:{port}\"\n{NO_HEALTH}\n"
    );
    let discovery = format!(
        "[discovery.dns]\nresolver = \"{}\"\nmin_interval = \"200ms\"\nmax_interval = \"1s\"\n",
        dns.addr()
    );
    let space = Space::start(&format!("{}\n{portal}\n{discovery}", core(&base)));
    assert_eventually_async!(
        instance_at(&space, "/patient_portal/").await == (200, "pod-a".to_string())
    );

    // The answer changes: a scale-out adds pod-b, then pod-a goes away.
    dns.set_hosts(name, &[a.addr().ip(), b.addr().ip()]);
    assert_eventually_async!(instance_at(&space, "/patient_portal/").await.1 == "pod-b");
    dns.set_hosts(name, &[b.addr().ip()]);
    assert_eventually_async!(
        async {
            let mut only_b = true;
            for _ in 0..4 {
                only_b &= instance_at(&space, "/patient_portal/").await.1 == "pod-b";
            }
            only_b
        }
        .await
    );

    // An empty answer keeps the last known instances (and is counted).
    dns.set_hosts(name, &[]);
    assert_eventually_async!(
        async {
            let (_, v) = test_support::http::get_json(&space.admin_url("/api/discovery")).await;
            v["dns"]["modules"][0]["failures_total"]
                .as_u64()
                .unwrap_or(0)
                > 0
        }
        .await
    );
    assert_eq!(
        instance_at(&space, "/patient_portal/").await,
        (200, "pod-b".to_string())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn space_module_register_routes_the_module_and_sigterm_drains_it_away() {
    let etcd = Etcd::start();
    let base = EchoBackend::start("core");
    let labs = EchoBackend::start("labs");
    let space = with_etcd(&base, &etcd.endpoint(), "");
    let dir = test_support::temp_dir();
    let manifest = dir.path().join("labs.toml");
    std::fs::write(
        &manifest,
        "name = \"labs\"\nprefixes = [\"/modules/labs\"]\nhealth_check = { enabled = false }\n",
    )
    .unwrap();
    let addr = labs.addr().to_string();
    let mut registrar = SpaceProcess::spawn(
        SPACE,
        [
            "module",
            "register",
            "--manifest",
            manifest.to_str().unwrap(),
            "--addr",
            &addr,
            "--id",
            "labs-1",
            "--ttl",
            "3s",
            "--drain-period",
            "1s",
            "--etcd",
            &etcd.endpoint(),
        ],
    );
    assert_eventually_async!(
        instance_at(&space, "/modules/labs/x").await == (200, "labs".to_string())
    );
    assert_eq!(space.instance("labs-1").await["draining"], false);

    registrar.signal(test_support::process::SIGTERM);
    // Draining first (no new sessions), then removed: the module has no instance left.
    let status = registrar
        .wait_exit(Duration::from_secs(20))
        .expect("the registrar exits");
    assert!(status.success(), "{}", registrar.logs());
    assert_eventually_async!(instance_at(&space, "/modules/labs/x").await.0 == 503);
}
