//! Self-tests of the polling helpers, ports and temp dirs.

use std::cell::Cell;
use std::time::Duration;

use test_support::{
    assert_eventually, assert_eventually_async, assert_eventually_eq, assert_eventually_eq_async,
    eventually, eventually_async, free_addr, free_port, wait_port,
};

#[test]
fn eventually_returns_the_first_value() {
    let calls = Cell::new(0);
    let got = eventually(Duration::from_secs(20), || {
        calls.set(calls.get() + 1);
        (calls.get() == 3).then_some("done")
    });
    assert_eq!((got, calls.get()), ("done", 3));
    eventually(Duration::from_secs(20), || calls.get() == 3);
}

#[test]
#[should_panic(expected = "last observed: \"still 7\"")]
fn eventually_panics_with_the_last_observation() {
    eventually::<(), _>(Duration::from_millis(100), || Err::<(), _>("still 7"));
}

#[test]
fn assert_eventually_macros() {
    let calls = Cell::new(0);
    assert_eventually!({
        calls.set(calls.get() + 1);
        calls.get() >= 2
    });
    assert_eventually_eq!(
        {
            calls.set(calls.get() + 1);
            calls.get()
        },
        4,
    );
    assert_eventually!(calls.get() == 4, "calls was {}", calls.get());
}

#[tokio::test]
async fn async_variants_allow_await() {
    let start = std::time::Instant::now();
    let elapsed = eventually_async(Duration::from_secs(20), || async {
        tokio::task::yield_now().await;
        (start.elapsed() > Duration::from_millis(60)).then(|| start.elapsed())
    })
    .await;
    assert!(elapsed > Duration::from_millis(60));
    assert_eventually_async!({
        tokio::task::yield_now().await;
        true
    });
    assert_eventually_eq_async!(async { 2 }.await, 2);
}

#[test]
fn ports_are_free_and_waitable() {
    assert_ne!(free_port(), 0);
    let listener = std::net::TcpListener::bind(free_addr()).unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(addr.ip().is_loopback());
    wait_port(addr, Duration::from_secs(20));
    drop(listener);
    assert!(!test_support::ports::is_listening(addr));
}

#[test]
fn temp_dir_is_removed_on_drop() {
    let dir = test_support::temp_dir();
    let path = dir.path().to_path_buf();
    assert!(path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("space-test-"));
    drop(dir);
    assert!(!path.exists());
}
