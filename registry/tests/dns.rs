//! The DNS discovery provider against a real DNS server (dnsmasq from `test-support`): A/AAAA
//! and SRV answers become instances, changes follow, failures keep the last known set, and
//! `set_targets` starts, stops and restarts loops. No timing assertions: every wait polls up
//! to a generous deadline.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use space_modules::{DnsQuery, InstanceSpec, ModuleName};
use space_registry::{DnsDiscovery, DnsError, DnsSettings, DnsStatus, DnsUpdateFn};
use test_support::{assert_eventually_eq_async, eventually_async, Dnsmasq, EVENTUALLY_DEADLINE};

const PORTAL: &str = "portal.ehr.svc.cluster.local";
const CORE: &str = "core.ehr.svc.cluster.local";
const SRV: &str = "_http._tcp.portal.ehr.svc.cluster.local";

/// Longer than any resolver timeout plus retries, for waits that need a lookup to time out.
const OUTAGE_DEADLINE: Duration = Duration::from_secs(90);

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn module(name: &str) -> ModuleName {
    ModuleName(name.into())
}

fn address(name: &str, port: u16) -> DnsQuery {
    DnsQuery::Address {
        name: name.to_string(),
        port,
    }
}

fn settings(server: SocketAddr) -> DnsSettings {
    DnsSettings {
        resolver: Some(server),
        min_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(2),
    }
}

/// One `on_update` call: the module and the instances it got.
type Call = (String, Vec<InstanceSpec>);

/// Every `on_update` call, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Call>>>);

impl Recorder {
    fn callback(&self) -> DnsUpdateFn {
        let calls = self.0.clone();
        Arc::new(move |module: &ModuleName, instances: Vec<InstanceSpec>| {
            calls.lock().unwrap().push((module.to_string(), instances));
        })
    }

    /// The instance sets delivered for `module`, oldest first.
    fn updates(&self, module: &str) -> Vec<Vec<InstanceSpec>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == module)
            .map(|(_, instances)| instances.clone())
            .collect()
    }

    /// `(id, addr, weight)` of the last set delivered for `module`.
    fn last(&self, module: &str) -> Option<Vec<(String, SocketAddr, u32)>> {
        self.updates(module)
            .pop()
            .map(|instances| summary(&instances))
    }

    fn last_ids(&self, module: &str) -> Option<Vec<String>> {
        self.last(module)
            .map(|s| s.into_iter().map(|(id, _, _)| id).collect())
    }

    fn assert_never_empty(&self) {
        let calls = self.0.lock().unwrap();
        for (module, instances) in calls.iter() {
            assert!(
                !instances.is_empty(),
                "on_update({module}, []) was called: {calls:?}"
            );
        }
    }
}

fn summary(instances: &[InstanceSpec]) -> Vec<(String, SocketAddr, u32)> {
    instances
        .iter()
        .map(|i| {
            assert!(!i.draining, "DNS instances are never draining: {i:?}");
            (i.id.to_string(), i.addr, i.weight)
        })
        .collect()
}

fn ids(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

fn status_of(discovery: &DnsDiscovery, module: &str) -> Option<DnsStatus> {
    discovery.status().into_iter().find(|s| s.module == module)
}

/// Runs a blocking test-support call (they poll dnsmasq) without stalling the provider.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_become_instances_and_follow_changes() {
    let dns = Dnsmasq::builder().host(PORTAL, &[v4(10), v4(11)]).start();
    let recorder = Recorder::default();
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), recorder.callback()).unwrap();
    discovery.set_targets(vec![(module("portal"), address(PORTAL, 8080))]);

    assert_eventually_eq_async!(
        recorder.last("portal"),
        Some(vec![
            (
                "127.0.0.10:8080".to_string(),
                SocketAddr::new(v4(10), 8080),
                1
            ),
            (
                "127.0.0.11:8080".to_string(),
                SocketAddr::new(v4(11), 8080),
                1
            ),
        ])
    );
    let status = status_of(&discovery, "portal").unwrap();
    assert_eq!(status.query, format!("{PORTAL}:8080"));
    assert_eq!(status.instances, 2);
    assert!(status.last_success_unix.is_some(), "{status:?}");
    assert_eq!(status.last_error, None);
    assert!(status.next_refresh_in_ms <= 2000, "{status:?}");

    blocking(|| dns.set_hosts(PORTAL, &[v4(11), v4(12)]));
    assert_eventually_eq_async!(
        recorder.last_ids("portal"),
        ids(&["127.0.0.11:8080", "127.0.0.12:8080"])
    );
    recorder.assert_never_empty();
    // Unchanged answers in between did not call on_update again.
    let updates = recorder.updates("portal");
    assert_eq!(updates.len(), 2, "{updates:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_records_and_a_trailing_dot() {
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let dns = Dnsmasq::builder().host(PORTAL, &[v4(10), v6]).start();
    let recorder = Recorder::default();
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), recorder.callback()).unwrap();
    discovery.set_targets(vec![(module("portal"), address(&format!("{PORTAL}."), 80))]);

    assert_eventually_eq_async!(
        recorder.last("portal"),
        Some(vec![
            ("127.0.0.10:80".to_string(), SocketAddr::new(v4(10), 80), 1),
            ("[::1]:80".to_string(), SocketAddr::new(v6, 80), 1),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_become_weighted_instances() {
    let target = |n: &str| format!("{n}.ehr.svc.cluster.local");
    let dns = Dnsmasq::builder()
        .srv(SRV, &target("portal-0"), 8080, 0, 5)
        .srv(SRV, &target("portal-1"), 8081, 0, 0)
        .srv(SRV, &target("portal-2"), 8082, 0, 10)
        // A target without addresses (looked up, NXDOMAIN): skipped, the others stay.
        .srv(SRV, &target("portal-9"), 8089, 0, 5)
        // A backup (higher priority number): not an instance while the primaries exist.
        .srv(SRV, &target("backup"), 9000, 1, 5)
        .host(&target("portal-0"), &[v4(20)])
        .host(&target("portal-1"), &[v4(21)])
        .host(&target("portal-2"), &[v4(22), v4(23)])
        .host(&target("backup"), &[v4(30)])
        .start();
    let recorder = Recorder::default();
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), recorder.callback()).unwrap();
    discovery.set_targets(vec![(
        module("portal"),
        DnsQuery::Srv {
            name: SRV.to_string(),
        },
    )]);

    assert_eventually_eq_async!(
        recorder.last("portal"),
        Some(vec![
            (
                "portal-0.ehr.svc.cluster.local:8080".to_string(),
                SocketAddr::new(v4(20), 8080),
                5
            ),
            (
                "portal-1.ehr.svc.cluster.local:8081".to_string(),
                SocketAddr::new(v4(21), 8081),
                1 // SRV weight 0 counts as 1
            ),
            (
                "portal-2.ehr.svc.cluster.local:8082/127.0.0.22".to_string(),
                SocketAddr::new(v4(22), 8082),
                10
            ),
            (
                "portal-2.ehr.svc.cluster.local:8082/127.0.0.23".to_string(),
                SocketAddr::new(v4(23), 8082),
                10
            ),
        ])
    );
    assert_eq!(
        status_of(&discovery, "portal").unwrap().query,
        format!("SRV {SRV}")
    );

    // A target's addresses change: the instances follow.
    blocking(|| dns.set_hosts(&target("portal-2"), &[v4(24)]));
    assert_eventually_eq_async!(
        recorder.last_ids("portal"),
        ids(&[
            "portal-0.ehr.svc.cluster.local:8080",
            "portal-1.ehr.svc.cluster.local:8081",
            "portal-2.ehr.svc.cluster.local:8082",
        ])
    );
    recorder.assert_never_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_disappears_keeps_the_last_known_instances() {
    let dns = Dnsmasq::builder().host(PORTAL, &[v4(10), v4(11)]).start();
    let recorder = Recorder::default();
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), recorder.callback()).unwrap();
    discovery.set_targets(vec![(module("portal"), address(PORTAL, 8080))]);
    let known = ids(&["127.0.0.10:8080", "127.0.0.11:8080"]);
    assert_eventually_eq_async!(recorder.last_ids("portal"), known.clone());

    // NXDOMAIN / NODATA: an empty answer.
    blocking(|| dns.remove_hosts(PORTAL));
    let failed = eventually_async(EVENTUALLY_DEADLINE, || async {
        let status = status_of(&discovery, "portal").unwrap();
        if status.failures_total > 0 && status.last_error.is_some() {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .await;
    assert_eq!(failed.instances, 2, "{failed:?}");
    let error = failed.last_error.unwrap();
    assert!(error.contains(PORTAL), "the error names the query: {error}");
    // More failed refreshes pass; the last known set stays.
    assert_eventually_eq_async!(
        status_of(&discovery, "portal").unwrap().failures_total >= failed.failures_total + 2,
        true
    );
    recorder.assert_never_empty();
    assert_eq!(recorder.last_ids("portal"), known);
    assert_eq!(recorder.updates("portal").len(), 1);

    // The name comes back (other addresses): picked up, and the error clears.
    blocking(|| dns.set_hosts(PORTAL, &[v4(12)]));
    assert_eventually_eq_async!(recorder.last_ids("portal"), ids(&["127.0.0.12:8080"]));
    assert_eventually_eq_async!(status_of(&discovery, "portal").unwrap().last_error, None);
    recorder.assert_never_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_dns_server_keeps_the_last_known_instances() {
    let mut dns = Dnsmasq::builder().host(PORTAL, &[v4(10), v4(11)]).start();
    let recorder = Recorder::default();
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), recorder.callback()).unwrap();
    discovery.set_targets(vec![(module("portal"), address(PORTAL, 8080))]);
    let known = ids(&["127.0.0.10:8080", "127.0.0.11:8080"]);
    assert_eventually_eq_async!(recorder.last_ids("portal"), known.clone());

    dns.stop();
    let failed = eventually_async(OUTAGE_DEADLINE, || async {
        let status = status_of(&discovery, "portal").unwrap();
        if status.failures_total > 0 && status.last_error.is_some() {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .await;
    assert_eq!(failed.instances, 2, "{failed:?}");
    recorder.assert_never_empty();
    assert_eq!(recorder.last_ids("portal"), known);

    // The server returns with other records: the provider recovers by itself.
    blocking(|| {
        dns.set_hosts(PORTAL, &[v4(13)]);
        dns.restart();
    });
    eventually_async(OUTAGE_DEADLINE, || async {
        match recorder.last_ids("portal") {
            Some(ids) if ids == ["127.0.0.13:8080"] => Ok(()),
            other => Err(other),
        }
    })
    .await;
    recorder.assert_never_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_targets_starts_stops_and_restarts_loops() {
    let dns = Dnsmasq::builder()
        .host(PORTAL, &[v4(10)])
        .host(CORE, &[v4(20)])
        .start();
    let recorder = Recorder::default();
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), recorder.callback()).unwrap();
    let both = vec![
        (module("portal"), address(PORTAL, 8080)),
        (module("core"), address(CORE, 80)),
    ];
    discovery.set_targets(both.clone());
    assert_eventually_eq_async!(recorder.last_ids("portal"), ids(&["127.0.0.10:8080"]));
    assert_eventually_eq_async!(recorder.last_ids("core"), ids(&["127.0.0.20:80"]));

    // The same set again changes nothing (a restarted loop would re-deliver its first answer).
    for _ in 0..3 {
        discovery.set_targets(both.clone());
    }
    blocking(|| dns.set_hosts(CORE, &[v4(21)]));
    assert_eventually_eq_async!(recorder.last_ids("core"), ids(&["127.0.0.21:80"]));
    assert_eq!(recorder.updates("core").len(), 2);
    assert_eq!(recorder.updates("portal").len(), 1);

    // Remove portal: no more updates for it, while core's loop still runs.
    discovery.set_targets(vec![(module("core"), address(CORE, 80))]);
    let statuses: Vec<String> = discovery.status().into_iter().map(|s| s.module).collect();
    assert_eq!(statuses, ["core"]);
    blocking(|| {
        dns.set_hosts(PORTAL, &[v4(11)]);
        dns.set_hosts(CORE, &[v4(22)]);
    });
    assert_eventually_eq_async!(recorder.last_ids("core"), ids(&["127.0.0.22:80"]));
    // One more full change of core: portal's old loop had every chance to deliver by now.
    blocking(|| dns.set_hosts(CORE, &[v4(23)]));
    assert_eventually_eq_async!(recorder.last_ids("core"), ids(&["127.0.0.23:80"]));
    assert_eq!(
        recorder.updates("portal").len(),
        1,
        "a removed module got updates"
    );

    // A changed query restarts the module's loop.
    discovery.set_targets(vec![(module("core"), address(CORE, 9090))]);
    assert_eventually_eq_async!(recorder.last_ids("core"), ids(&["127.0.0.23:9090"]));
    assert_eq!(
        status_of(&discovery, "core").unwrap().query,
        format!("{CORE}:9090")
    );

    // Shutdown stops everything.
    discovery.shutdown();
    assert!(discovery.status().is_empty());
    discovery.set_targets(both);
    assert!(discovery.status().is_empty());
    recorder.assert_never_empty();
}

/// The registry's rebuild hook calls `set_targets` from inside `on_update` (a DNS answer
/// rebuilds the table, which hands the targets back): that must not deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_update_may_call_set_targets() {
    let dns = Dnsmasq::builder()
        .host(PORTAL, &[v4(10)])
        .host(CORE, &[v4(20)])
        .start();
    let recorder = Recorder::default();
    let handle: Arc<OnceLock<DnsDiscovery>> = Arc::new(OnceLock::new());
    let on_update: DnsUpdateFn = {
        let record = recorder.callback();
        let handle = handle.clone();
        Arc::new(move |module: &ModuleName, instances: Vec<InstanceSpec>| {
            record(module, instances);
            let discovery = handle.get().expect("set before any target");
            let _ = discovery.status();
            discovery.set_targets(vec![
                (ModuleName("portal".into()), address(PORTAL, 8080)),
                (ModuleName("core".into()), address(CORE, 80)),
            ]);
        })
    };
    let discovery = DnsDiscovery::spawn(settings(dns.addr()), on_update).unwrap();
    handle.set(discovery.clone()).unwrap();
    discovery.set_targets(vec![(module("portal"), address(PORTAL, 8080))]);

    assert_eventually_eq_async!(recorder.last_ids("portal"), ids(&["127.0.0.10:8080"]));
    // Core was added by the callback itself.
    assert_eventually_eq_async!(recorder.last_ids("core"), ids(&["127.0.0.20:80"]));
    // The handle inside the callback keeps the provider alive: stop it explicitly.
    discovery.shutdown();
}

#[test]
fn spawn_outside_a_runtime_is_an_error() {
    let error = DnsDiscovery::spawn(
        settings("127.0.0.1:53".parse().unwrap()),
        Recorder::default().callback(),
    )
    .unwrap_err();
    assert!(matches!(error, DnsError::NoRuntime { .. }), "{error:?}");
    assert!(error.to_string().contains("127.0.0.1:53"), "{error}");
}

#[tokio::test]
async fn intervals_must_make_sense() {
    let mut bad = settings("127.0.0.1:53".parse().unwrap());
    bad.min_interval = Duration::from_secs(10);
    bad.max_interval = Duration::from_secs(1);
    let error = DnsDiscovery::spawn(bad, Recorder::default().callback()).unwrap_err();
    assert!(
        matches!(error, DnsError::InvalidSettings { .. }),
        "{error:?}"
    );
}
