//! Self-tests of `SpaceProcess` and `run_to_completion`. The `space` binary lives in another
//! crate, so a real stand-in plays it: PHP's built-in server with a router answering
//! `/readyz`, plus `sh` for one-shot commands.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use test_support::process::{SIGHUP, SIGTERM};
use test_support::{free_addr, run_to_completion, SpaceProcess};

const ROUTER: &str = r#"<?php
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
error_log("stand-in saw $path");
if ($path === '/readyz') { echo "ready"; } else { http_response_code(404); echo "no"; }
"#;

fn php() -> std::path::PathBuf {
    // Panics with the install hint when php is missing.
    test_support::php::php_binary()
}

#[test]
fn wait_ready_signal_and_exit() {
    let dir = test_support::temp_dir();
    let router = dir.path().join("router.php");
    std::fs::write(&router, ROUTER).unwrap();
    let admin = free_addr();
    let mut process = SpaceProcess::spawn(
        php(),
        [
            "-S".to_string(),
            admin.to_string(),
            router.display().to_string(),
        ],
    );
    assert!(process.pid() > 0);
    process.wait_ready(admin);
    assert!(
        process.stderr().contains("stand-in saw /readyz"),
        "{}",
        process.logs()
    );
    assert_eq!(process.wait_exit(Duration::from_millis(1)), None);

    process.signal(SIGTERM);
    let status = process.wait_exit(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.signal(), Some(SIGTERM));
}

#[tokio::test]
async fn wait_ready_async_works_inside_a_runtime() {
    let dir = test_support::temp_dir();
    let router = dir.path().join("router.php");
    std::fs::write(&router, ROUTER).unwrap();
    let admin = free_addr();
    let mut process = SpaceProcess::spawn(
        php(),
        [
            "-S".to_string(),
            admin.to_string(),
            router.display().to_string(),
        ],
    );
    process.wait_ready_async(admin).await;
    let response = test_support::http::client()
        .get(format!("http://{admin}/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[test]
#[should_panic(expected = "boom-on-stderr")]
fn wait_ready_panics_with_the_log_tail_when_the_process_exits() {
    let mut process = SpaceProcess::spawn("sh", ["-c", "echo boom-on-stderr >&2; exit 3"]);
    process.wait_ready(free_addr());
}

#[test]
fn signal_after_exit_panics_with_status() {
    let mut process = SpaceProcess::spawn("sh", ["-c", "exit 0"]);
    assert!(process
        .wait_exit(Duration::from_secs(20))
        .unwrap()
        .success());
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| process.signal(SIGHUP)))
        .expect_err("signal to an exited process must panic");
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("already exited"), "{message}");
}

#[test]
fn run_to_completion_captures_status_and_streams() {
    let (status, stdout, stderr) =
        run_to_completion("sh", ["-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(status.code(), Some(3));
    assert_eq!(stdout, "out\n");
    assert_eq!(stderr, "err\n");
}

#[test]
fn env_is_passed_and_drop_kills_and_reaps() {
    let process = SpaceProcess::spawn_with_env(
        "sh",
        [
            "-c",
            "echo \"RUST_LOG=$RUST_LOG NO_COLOR=$NO_COLOR\"; exec sleep 600",
        ],
        [("RUST_LOG", "space=debug")],
    );
    test_support::assert_eventually!(process.stdout().contains("RUST_LOG=space=debug NO_COLOR=1"));
    let pid = process.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(process);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after drop"
    );
}
