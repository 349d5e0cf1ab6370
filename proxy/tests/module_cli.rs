//! `space module register|list|drain|deregister` against a real etcd (Debian's etcd 3.4),
//! running the real `space` binary.
use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde_json::{json, Value};
use test_support::{
    eventually, free_addr, process::SIGTERM, run_to_completion, Etcd, SpaceProcess,
    EVENTUALLY_DEADLINE,
};

const SPACE: &str = env!("CARGO_BIN_EXE_space");

fn write_manifest(dir: &Path, file: &str, text: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

fn labs_manifest(dir: &Path) -> PathBuf {
    write_manifest(
        dir,
        "labs.toml",
        "name = \"labs\"\nprefixes = [\"/modules/labs\"]\nsession_cookies = [\"LibreHealthEHR\"]\n",
    )
}

/// `space module <args> --etcd <etcd>`.
fn module_args(etcd: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec!["module".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend(["--etcd".to_string(), etcd.to_string()]);
    all
}

/// `register --manifest <manifest> --addr <addr>` and `extra`.
fn register<'a>(manifest: &'a str, addr: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["register", "--manifest", manifest, "--addr", addr];
    args.extend_from_slice(extra);
    args
}

/// Runs a one-shot `space module ...`: (exit code, stdout, stderr).
fn run_module(etcd: &str, args: &[&str]) -> (i32, String, String) {
    let (status, out, err) = run_to_completion(SPACE, module_args(etcd, args));
    (status.code().unwrap_or(-1), out, err)
}

/// A key's value and lease (0 = none), read over etcd's JSON gateway.
fn key_with_lease(etcd: &Etcd, key: &str) -> Option<(String, i64)> {
    let reply = etcd.call("/v3/kv/range", json!({ "key": B64.encode(key) }));
    let kv = reply["kvs"].as_array()?.first()?.clone();
    let value = B64
        .decode(kv["value"].as_str().unwrap_or_default())
        .unwrap();
    let lease = kv["lease"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Some((String::from_utf8(value).unwrap(), lease))
}

/// Remaining TTL of a lease in seconds (-1 once it is gone).
fn lease_ttl(etcd: &Etcd, lease: i64) -> i64 {
    let reply = etcd.call("/v3/lease/timetolive", json!({ "ID": lease.to_string() }));
    match &reply["TTL"] {
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_i64().unwrap(),
        _ => 0,
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits until the registrar printed its line, and returns it.
fn wait_registered(process: &mut SpaceProcess) -> String {
    eventually(EVENTUALLY_DEADLINE, || {
        if let Some(status) = process.try_status() {
            panic!("registrar exited with {status}:\n{}", process.logs());
        }
        let out = process.stdout();
        if out.contains("registered instance") {
            Ok(out)
        } else {
            Err(process.logs())
        }
    })
}

#[test]
fn register_writes_keys_keeps_the_lease_alive_and_drains_on_sigterm() {
    let etcd = Etcd::start();
    let dir = test_support::temp_dir();
    let manifest = labs_manifest(dir.path());
    let mut registrar = SpaceProcess::spawn(
        SPACE,
        module_args(
            &etcd.endpoint(),
            &register(
                manifest.to_str().unwrap(),
                "127.0.0.1:9000",
                &[
                    "--id",
                    "labs-1",
                    "--weight",
                    "3",
                    "--ttl",
                    "2s",
                    "--drain-period",
                    "1s",
                ],
            ),
        ),
    );
    let line = wait_registered(&mut registrar);
    assert_eq!(line.lines().count(), 1, "one line on stdout: {line}");
    for needle in [
        "labs-1",
        "labs",
        "127.0.0.1:9000",
        "/space/instances/labs/labs-1",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }

    // The module key holds the manifest as JSON, without a lease.
    let (module, module_lease) = key_with_lease(&etcd, "/space/modules/labs").expect("module key");
    let module = json_of(&module);
    assert_eq!(module["name"], "labs");
    assert_eq!(module["prefixes"], json!(["/modules/labs"]));
    assert_eq!(module["session_cookies"], json!(["LibreHealthEHR"]));
    assert_eq!(module_lease, 0, "the module key must not be under a lease");

    // The instance key is under a lease.
    let (instance, lease) =
        key_with_lease(&etcd, "/space/instances/labs/labs-1").expect("instance key");
    assert_eq!(
        json_of(&instance),
        json!({ "addr": "127.0.0.1:9000", "weight": 3, "draining": false })
    );
    assert_ne!(lease, 0, "the instance key must be under a lease");
    assert!(lease_ttl(&etcd, lease) > 0);

    // Kept alive well past its 2 s TTL, on the same lease.
    std::thread::sleep(Duration::from_secs(5));
    let (_, still) = key_with_lease(&etcd, "/space/instances/labs/labs-1")
        .unwrap_or_else(|| panic!("instance expired:\n{}", registrar.logs()));
    assert_eq!(
        still, lease,
        "the lease should have been renewed, not replaced"
    );

    // SIGTERM: draining (same lease), then deleted, lease revoked, exit 0.
    registrar.signal(SIGTERM);
    eventually(EVENTUALLY_DEADLINE, || {
        match key_with_lease(&etcd, "/space/instances/labs/labs-1") {
            Some((v, l)) if json_of(&v)["draining"] == true => {
                assert_eq!(l, lease);
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });
    let status = registrar
        .wait_exit(EVENTUALLY_DEADLINE)
        .unwrap_or_else(|| panic!("registrar still running:\n{}", registrar.logs()));
    assert!(status.success(), "{status}:\n{}", registrar.logs());
    assert_eq!(key_with_lease(&etcd, "/space/instances/labs/labs-1"), None);
    assert!(
        etcd.get("/space/modules/labs").is_some(),
        "the module outlives its instances"
    );
    assert_eq!(lease_ttl(&etcd, lease), -1, "the lease is revoked");
}

#[test]
fn register_refuses_an_overlapping_prefix_unless_forced() {
    let etcd = Etcd::start();
    let dir = test_support::temp_dir();
    let manifest = labs_manifest(dir.path());
    etcd.put(
        "/space/modules/other",
        r#"{"name":"other","prefixes":["/modules/labs"]}"#,
    );
    let manifest = manifest.to_str().unwrap();
    let registrar_args = |extra: &[&str]| {
        let mut more = vec!["--drain-period", "0s"];
        more.extend_from_slice(extra);
        module_args(
            &etcd.endpoint(),
            &register(manifest, "127.0.0.1:9002", &more),
        )
    };

    let (status, out, err) = run_to_completion(SPACE, registrar_args(&[]));
    assert_eq!(status.code(), Some(1), "{out}{err}");
    for needle in ["`labs`", "`other`", "/modules/labs", "--force"] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    assert!(etcd.get_prefix("/space/instances/").is_empty());
    assert_eq!(etcd.get("/space/modules/labs"), None);

    let mut forced = SpaceProcess::spawn(SPACE, registrar_args(&["--force"]));
    wait_registered(&mut forced);
    assert!(etcd.get("/space/modules/labs").is_some());
    // Default id: <hostname>-<port>.
    let instances = etcd.get_prefix("/space/instances/labs/");
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert!(instances[0].0.ends_with("-9002"), "{instances:?}");
    forced.signal(SIGTERM);
    let status = forced.wait_exit(EVENTUALLY_DEADLINE).expect("exits");
    assert!(status.success(), "{status}:\n{}", forced.logs());
    assert!(etcd.get_prefix("/space/instances/").is_empty());
}

#[test]
fn register_rejects_bad_input_and_an_unreachable_etcd() {
    let dir = test_support::temp_dir();
    let nothing = format!("http://{}", free_addr());

    let bad = write_manifest(
        dir.path(),
        "bad.toml",
        "name = \"labs\"\nprefixes = [\"modules/labs\"]\n",
    );
    let (code, out, err) = run_module(
        &nothing,
        &register(bad.to_str().unwrap(), "127.0.0.1:9000", &[]),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("bad.toml: prefixes[0]"), "{err}");
    assert!(err.contains("fix:"), "{err}");

    let good = labs_manifest(dir.path());
    let (code, out, err) = run_module(
        &nothing,
        &register(good.to_str().unwrap(), "labs:80", &["--weight", "0"]),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--addr") && err.contains("--weight"), "{err}");

    let (code, out, err) = run_module(
        &nothing,
        &register(good.to_str().unwrap(), "127.0.0.1:9000", &[]),
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&nothing),
        "the message names the endpoint:\n{err}"
    );
    assert!(err.contains("check"), "{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn a_killed_registrar_s_instance_expires_with_its_lease() {
    let etcd = Etcd::start();
    let dir = test_support::temp_dir();
    let manifest = labs_manifest(dir.path());
    let mut registrar = SpaceProcess::spawn(
        SPACE,
        module_args(
            &etcd.endpoint(),
            &register(
                manifest.to_str().unwrap(),
                "127.0.0.1:9000",
                &["--id", "doomed", "--ttl", "2s"],
            ),
        ),
    );
    wait_registered(&mut registrar);
    assert!(etcd.get("/space/instances/labs/doomed").is_some());
    registrar.kill();
    eventually(EVENTUALLY_DEADLINE, || {
        etcd.get("/space/instances/labs/doomed").map_or(Ok(()), Err)
    });
    assert!(
        etcd.get("/space/modules/labs").is_some(),
        "the module key has no lease and stays"
    );
}

/// A stand-in for a proxy's admin endpoint answering `GET /api/instances` with `body`.
fn fake_admin(body: String) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&seen);
            let (status, reply) = if request.starts_with("GET /api/instances ") {
                ("200 OK", body.clone())
            } else {
                ("404 Not Found", "no".to_string())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    addr
}

#[test]
fn list_drain_and_deregister() {
    let etcd = Etcd::start();
    let e = etcd.endpoint();
    etcd.put(
        "/space/modules/labs",
        r#"{"name":"labs","prefixes":["/modules/labs"]}"#,
    );
    etcd.put(
        "/space/modules/empty",
        r#"{"name":"empty","prefixes":["/empty"]}"#,
    );
    let lease = etcd.grant_lease(60);
    etcd.put_with_lease(
        "/space/instances/labs/a",
        r#"{"addr":"127.0.0.1:9001","weight":2,"draining":false}"#,
        lease,
    );
    etcd.put(
        "/space/instances/labs/b",
        r#"{"addr":"127.0.0.1:9002","weight":1,"draining":false}"#,
    );
    let lease_hex = format!("{lease:x}");

    // list: text.
    let (code, out, err) = run_module(&e, &["list"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("MODULE"), "{out}");
    let row_a = lines
        .iter()
        .find(|l| l.contains("127.0.0.1:9001"))
        .expect(&out);
    for needle in [
        "labs",
        "/modules/labs",
        " a ",
        "2",
        "no",
        lease_hex.as_str(),
    ] {
        assert!(row_a.contains(needle), "{needle:?} missing from {row_a:?}");
    }
    let row_b = lines
        .iter()
        .find(|l| l.contains("127.0.0.1:9002"))
        .expect(&out);
    assert!(row_b.contains("none"), "b has no lease: {row_b:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("empty") && l.contains("/empty")),
        "{out}"
    );

    // list: JSON.
    let (code, out, err) = run_module(&e, &["list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v = json_of(&out);
    let labs = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "labs")
        .expect(&out)
        .clone();
    assert_eq!(labs["prefixes"], json!(["/modules/labs"]));
    let inst = |id: &str| {
        labs["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap_or_else(|| panic!("no instance {id} in {labs}"))
            .clone()
    };
    assert_eq!(inst("a")["addr"], "127.0.0.1:9001");
    assert_eq!(inst("a")["weight"], 2);
    assert_eq!(inst("a")["draining"], false);
    assert_eq!(inst("a")["has_lease"], true);
    assert_eq!(inst("a")["lease"], lease_hex.as_str());
    assert_eq!(inst("b")["has_lease"], false);
    assert!(v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "empty"));

    // list --admin joins a running proxy's view by module + id.
    let admin = fake_admin(
        json!({ "revision": "r", "instances": [
            { "module": "labs", "id": "a", "addr": "127.0.0.1:9001", "weight": 2, "draining": false,
              "health": "up", "in_flight": 1, "requests": 42 },
            { "module": "core", "id": "c1", "addr": "127.0.0.1:9009", "weight": 1, "draining": false,
              "health": "down", "in_flight": 0, "requests": 0 }
        ]})
        .to_string(),
    );
    let admin_url = format!("http://{admin}");
    let (code, out, err) = run_module(&e, &["list", "--json", "--admin", &admin_url]);
    assert_eq!(code, 0, "{out}{err}");
    let v = json_of(&out);
    let labs = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "labs")
        .unwrap()
        .clone();
    let a = labs["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "a")
        .unwrap()
        .clone();
    assert_eq!(a["health"], "up");
    assert_eq!(a["requests"], 42);
    let b = labs["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "b")
        .unwrap()
        .clone();
    assert_eq!(b["health"], Value::Null, "the proxy does not know b");
    // (Compare names, not substrings: lease ids are random hex and may contain "c1".)
    let names: Vec<&str> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(
        !names.contains(&"core"),
        "modules not in etcd are left out: {out}"
    );
    let (code, out, err) = run_module(&e, &["list", "--admin", &admin_url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.lines().next().unwrap().contains("HEALTH"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("127.0.0.1:9001") && l.contains("up") && l.contains("42")),
        "{out}"
    );
    let (code, _, err) = run_module(&e, &["list", "--admin", &format!("http://{}", free_addr())]);
    assert_eq!(code, 2, "{err}");

    // drain: draining true, lease kept.
    let (code, out, err) = run_module(&e, &["drain", "labs", "a"]);
    assert_eq!(code, 0, "{out}{err}");
    let (value, kept) = key_with_lease(&etcd, "/space/instances/labs/a").unwrap();
    assert_eq!(
        json_of(&value),
        json!({ "addr": "127.0.0.1:9001", "weight": 2, "draining": true })
    );
    assert_eq!(kept, lease, "drain keeps the key's lease");
    let (code, out, err) = run_module(&e, &["drain", "labs", "nope"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("nope") && err.contains("labs"), "{err}");

    // deregister one instance.
    let (code, out, err) = run_module(&e, &["deregister", "labs", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(etcd.get("/space/instances/labs/b"), None);
    assert!(etcd.get("/space/instances/labs/a").is_some());
    let (code, out, err) = run_module(&e, &["deregister", "labs", "b"]);
    assert_eq!(code, 1, "{out}{err}");

    // deregister the module: its key and every instance, in one transaction.
    etcd.put(
        "/space/instances/labs2/x",
        r#"{"addr":"127.0.0.1:9003","weight":1,"draining":false}"#,
    );
    let (code, out, err) = run_module(&e, &["deregister", "labs"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(etcd.get("/space/modules/labs"), None);
    assert!(etcd.get_prefix("/space/instances/labs/").is_empty());
    assert!(
        etcd.get("/space/instances/labs2/x").is_some(),
        "another module sharing the name's start is untouched"
    );
    assert!(etcd.get("/space/modules/empty").is_some());
    let (code, out, err) = run_module(&e, &["deregister", "labs"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("labs"), "{err}");
}

#[test]
fn a_custom_prefix_is_honoured() {
    let etcd = Etcd::start();
    let dir = test_support::temp_dir();
    let manifest = labs_manifest(dir.path());
    let mut registrar = SpaceProcess::spawn(
        SPACE,
        module_args(
            &etcd.endpoint(),
            &register(
                manifest.to_str().unwrap(),
                "127.0.0.1:9000",
                &[
                    "--prefix",
                    "/clinic-a",
                    "--id",
                    "one",
                    "--drain-period",
                    "0s",
                ],
            ),
        ),
    );
    wait_registered(&mut registrar);
    assert!(etcd.get("/clinic-a/modules/labs").is_some());
    assert!(etcd.get("/clinic-a/instances/labs/one").is_some());
    assert!(etcd.get_prefix("/space/").is_empty());
    let (code, out, err) = run_module(&etcd.endpoint(), &["list", "--prefix", "/clinic-a/"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("one"), "{out}");
    registrar.signal(test_support::process::SIGINT);
    let status = registrar.wait_exit(EVENTUALLY_DEADLINE).expect("exits");
    assert!(status.success(), "{status}:\n{}", registrar.logs());
    assert!(etcd.get_prefix("/clinic-a/instances/").is_empty());
}

#[test]
fn the_registrar_outlives_etcd_outages_and_lost_leases() {
    let mut etcd = Etcd::start();
    let dir = test_support::temp_dir();
    let manifest = labs_manifest(dir.path());
    let key = "/space/instances/labs/steady";
    let mut registrar = SpaceProcess::spawn(
        SPACE,
        module_args(
            &etcd.endpoint(),
            &register(
                manifest.to_str().unwrap(),
                "127.0.0.1:9000",
                &["--id", "steady", "--ttl", "2s", "--drain-period", "0s"],
            ),
        ),
    );
    wait_registered(&mut registrar);
    let (_, first) = key_with_lease(&etcd, key).expect("instance key");

    // The lease is lost (revoked, as if it had expired): a new lease, the instance again.
    etcd.revoke_lease(first);
    let second = eventually(EVENTUALLY_DEADLINE, || match key_with_lease(&etcd, key) {
        Some((_, lease)) if lease != first && lease_ttl(&etcd, lease) > 0 => Ok(lease),
        other => Err(format!("{other:?}")),
    });
    assert_ne!(second, first);

    // etcd down for longer than the TTL: the registrar logs and keeps trying.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        registrar.try_status().is_none(),
        "the registrar must not exit while etcd is down:\n{}",
        registrar.logs()
    );
    assert!(
        registrar.stderr().contains("cannot renew"),
        "{}",
        registrar.logs()
    );
    etcd.restart();
    eventually(EVENTUALLY_DEADLINE, || match key_with_lease(&etcd, key) {
        Some((_, lease)) if lease_ttl(&etcd, lease) > 0 => Ok(()),
        other => Err(format!("{other:?}")),
    });

    // etcd hung for longer than the TTL: the lease expires, and the instance comes back.
    etcd.pause();
    std::thread::sleep(Duration::from_secs(4));
    etcd.resume();
    eventually(EVENTUALLY_DEADLINE, || match key_with_lease(&etcd, key) {
        Some((_, lease)) if lease_ttl(&etcd, lease) > 0 => Ok(()),
        other => Err(format!("{other:?}")),
    });
    // ...and stays: it is renewed, not just written once.
    std::thread::sleep(Duration::from_secs(3));
    let (_, lease) = key_with_lease(&etcd, key).expect("instance still registered");
    assert!(lease_ttl(&etcd, lease) > 0);

    registrar.signal(SIGTERM);
    let status = registrar.wait_exit(EVENTUALLY_DEADLINE).expect("exits");
    assert!(status.success(), "{status}:\n{}", registrar.logs());
    assert_eq!(key_with_lease(&etcd, key), None);
}
