//! The command line: `space validate` errors, and SIGTERM's graceful exit.
mod common;

use std::time::Duration;

use common::*;
use test_support::{free_addr, process::SIGTERM, run_to_completion, EchoBackend, SpaceProcess};

fn validate(dir: &std::path::Path, text: &str) -> (bool, String) {
    let path = dir.join("space.toml");
    std::fs::write(&path, text).unwrap();
    let (status, out, err) =
        run_to_completion(SPACE, ["validate", "--config", path.to_str().unwrap()]);
    (status.success(), format!("{out}{err}"))
}

#[test]
fn validate_accepts_a_good_configuration() {
    let dir = test_support::temp_dir();
    let pki = test_support::TestPki::new();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    pki.write_pair(&dir.path().join("certs"), "default", &["localhost"]);
    let text = format!(
        "{}\n{}",
        head(free_addr(), free_addr(), free_addr(), ""),
        module("core", &["/"], &["127.0.0.1:9000".parse().unwrap()], "")
    );
    let (ok, out) = validate(dir.path(), &text);
    assert!(ok, "{out}");
    assert!(out.contains("OK (1 modules, 1 static instances"), "{out}");
}

#[test]
fn validate_names_file_field_and_fix_for_every_problem() {
    let dir = test_support::temp_dir();
    std::fs::create_dir(dir.path().join("modules.d")).unwrap();
    std::fs::write(
        dir.path().join("modules.d/labs.toml"),
        "name = \"labs\"\nprefixes = [\"/modules/labs\"]\ndeny = [\"/a/[\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("modules.d/labs2.toml"),
        "name = \"labs2\"\nprefixes = [\"/modules/labs\"]\n",
    )
    .unwrap();
    let text = r#"
[server]
grace_period = "half a minute"
[listeners]
http = "127.0.0.1:8080"
https = "127.0.0.1:8443"
[tls]
cert_dir = "no-such-certs"
[discovery]
manifests_dir = "modules.d"
[[module]]
name = "core"
prefixes = ["/"]
max_body_size = "huge"
[[module.instances]]
addr = "core:80"
"#;
    let (ok, out) = validate(dir.path(), text);
    assert!(!ok, "{out}");
    let file = dir.path().join("space.toml").display().to_string();
    for needle in [
        format!("{file}: server.grace_period"),
        format!("{file}: module[0].max_body_size"),
        format!("{file}: module[0].instances[0].addr"),
        "modules.d/labs.toml: deny[0]".to_string(),
    ] {
        assert!(out.contains(&needle), "missing {needle:?} in:\n{out}");
    }
    assert!(out.contains("fix:"), "{out}");

    // Once the field errors are fixed, overlaps and missing certificates are reported.
    std::fs::write(
        dir.path().join("modules.d/labs.toml"),
        "name = \"labs\"\nprefixes = [\"/modules/labs\"]\n",
    )
    .unwrap();
    let text = text
        .replace("half a minute", "30s")
        .replace("\"huge\"", "\"32MiB\"")
        .replace("core:80", "127.0.0.1:80");
    let (ok, out) = validate(dir.path(), &text);
    assert!(!ok);
    assert!(
        out.contains(
            "labs2.toml: prefixes: prefix `/modules/labs` of module `labs2` overlaps module `labs`"
        ),
        "{out}"
    );
    std::fs::remove_file(dir.path().join("modules.d/labs2.toml")).unwrap();
    let (ok, out) = validate(dir.path(), &text);
    assert!(!ok);
    assert!(
        out.contains("tls.cert_dir") && out.contains("no-such-certs"),
        "{out}"
    );

    // Unknown keys are refused with their line.
    let (ok, out) = validate(
        dir.path(),
        "[listeners]\nhttp = \"127.0.0.1:1\"\nhttps_port = 8443\n",
    );
    assert!(!ok);
    assert!(
        out.contains("line 3") && out.contains("https_port"),
        "{out}"
    );
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_zero() {
    let core = EchoBackend::start("core");
    let mut space = Space::start(&module("core", &["/"], &[core.addr()], NO_HEALTH));
    let url = space.url("/slow?ms=1500");
    let in_flight = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { client().get(url).send().await.map(|r| r.status().as_u16()) })
    });
    test_support::assert_eventually!(core.request_count() == 1);
    space.process.signal(SIGTERM);
    let status = space
        .process
        .wait_exit(Duration::from_secs(15))
        .expect("space exits after SIGTERM");
    assert!(status.success(), "exit status {status}: {}", space.logs());
    assert_eq!(
        in_flight.join().unwrap().unwrap(),
        200,
        "the request in flight completed"
    );
    assert!(
        std::net::TcpStream::connect(space.http).is_err(),
        "no longer accepting"
    );
}

#[test]
fn run_with_a_bad_configuration_exits_non_zero_with_the_reason() {
    let dir = test_support::temp_dir();
    let path = dir.path().join("space.toml");
    std::fs::write(&path, "[listeners]\nhttp = \"127.0.0.1:1:2\"\n").unwrap();
    let mut p = SpaceProcess::spawn(SPACE, ["run", "--config", path.to_str().unwrap()]);
    let status = p.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success());
    assert!(p.logs().contains("listeners.http"), "{}", p.logs());
}
