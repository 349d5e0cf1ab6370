//! Integration-test support for SPACE: real components on loopback, never mocks.
//!
//! This crate owns the moving parts that integration tests start and stop:
//! - [`process`]: the `space` binary as a child process ([`SpaceProcess`]);
//! - [`backend`]: an HTTP echo upstream that can be made unhealthy, stopped and restarted ([`EchoBackend`]);
//! - [`php`]: Debian's PHP built-in server with real PHP sessions ([`PhpServer`]);
//! - [`dns`]: Debian's dnsmasq as a cluster-DNS stand-in with changeable A/AAAA and SRV records ([`Dnsmasq`]);
//! - [`etcd`]: Debian's etcd in a temp data dir, plus a small KV client over its JSON gateway ([`Etcd`]);
//! - [`tls`]: a throw-away CA issuing leaf certificates, HTTPS clients and raw TLS probes ([`TestPki`]);
//! - [`http`]: reqwest clients and raw-bytes HTTP for paths reqwest would normalize;
//! - [`ports`]: free loopback ports and waiting for a port to accept.
//!
//! Rules every helper follows: servers bind `127.0.0.1` (port 0 where the program allows it);
//! a helper whose real program is missing panics naming the package to install; children are
//! killed by PID and reaped on `Drop` (and get `SIGKILL` if the test process dies first);
//! no helper asserts on timing: waits poll up to a generous deadline and then panic with the
//! last observed value.
//!
//! Blocking helpers (`wait_ready`, [`Etcd`]'s KV calls, [`tls::probe_tls`], `*_blocking`)
//! block the calling thread. The servers in this crate run on their own threads or processes,
//! so that is safe in `#[tokio::test]`; a server the *test itself* runs on a current-thread
//! runtime would starve, so use `flavor = "multi_thread"` or `spawn_blocking` there.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod dns;
pub mod etcd;
pub mod http;
pub mod php;
pub mod ports;
pub mod process;
mod spawn;
pub mod tls;

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

pub use backend::{EchoBackend, RecordedRequest};
pub use dns::{Dnsmasq, DnsmasqBuilder};
pub use etcd::Etcd;
pub use php::{PhpServer, PhpServerBuilder};
pub use ports::{free_addr, free_port, wait_port};
pub use process::{run_to_completion, SpaceProcess};
pub use tempfile::TempDir;
pub use tls::TestPki;

/// Default deadline of [`assert_eventually!`] and friends: generous, so a slow CI machine
/// never fails a correct test.
pub const EVENTUALLY_DEADLINE: Duration = Duration::from_secs(20);

/// Pause between two polls of an `eventually` condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What one poll of an `eventually` closure returns: a value (done) or what was observed instead.
///
/// Implemented for `Option<T>` (`None` = not yet), `Result<T, E: Debug>` (`Err(e)` = not yet,
/// and `e` is reported if the deadline passes) and `bool` (`false` = not yet).
pub trait Observation<T> {
    /// `Ok(value)` when the condition holds, else `Err(description of what was observed)`.
    fn into_observed(self) -> Result<T, String>;
}

impl<T> Observation<T> for Option<T> {
    fn into_observed(self) -> Result<T, String> {
        self.ok_or_else(|| "None".to_string())
    }
}

impl<T, E: Debug> Observation<T> for Result<T, E> {
    fn into_observed(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

impl Observation<()> for bool {
    fn into_observed(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("false".to_string())
        }
    }
}

/// Polls `probe` every [`POLL_INTERVAL`] until it yields a value, and returns that value.
///
/// Panics after `deadline` with the last observed value (the `Err` of a `Result` probe).
///
/// ```
/// # use std::time::Duration;
/// let mut n = 0;
/// let v = test_support::eventually(Duration::from_secs(5), || {
///     n += 1;
///     if n >= 3 { Ok(n) } else { Err(format!("n={n}")) }
/// });
/// assert_eq!(v, 3);
/// ```
#[track_caller]
pub fn eventually<T, O: Observation<T>>(deadline: Duration, mut probe: impl FnMut() -> O) -> T {
    let start = Instant::now();
    loop {
        match probe().into_observed() {
            Ok(value) => return value,
            Err(last) if start.elapsed() >= deadline => {
                panic!("condition not met within {deadline:?}; last observed: {last}")
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Async [`eventually`]: awaits `probe()` every [`POLL_INTERVAL`] (with `tokio::time::sleep`)
/// until it yields a value; panics after `deadline` with the last observed value.
pub async fn eventually_async<T, O, F, Fut>(deadline: Duration, mut probe: F) -> T
where
    O: Observation<T>,
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
{
    let start = Instant::now();
    loop {
        match probe().await.into_observed() {
            Ok(value) => return value,
            Err(last) if start.elapsed() >= deadline => {
                panic!("condition not met within {deadline:?}; last observed: {last}")
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// A fresh temporary directory (`space-test-*`), removed when the returned guard drops.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("space-test-")
        .tempdir()
        .expect("cannot create a temporary directory (is TMPDIR writable?)")
}

#[doc(hidden)]
pub mod __private {
    pub use tokio;
}

/// Re-evaluates a boolean expression every [`POLL_INTERVAL`] (blocking the thread) until it is
/// true; panics after [`EVENTUALLY_DEADLINE`] with the expression or the given message.
///
/// ```
/// let start = std::time::Instant::now();
/// test_support::assert_eventually!(start.elapsed().as_millis() > 60);
/// test_support::assert_eventually!(1 + 1 == 2, "arithmetic broke: {}", 1 + 1);
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!($cond, "{}", stringify!($cond))
    };
    ($cond:expr, $($arg:tt)+) => {{
        let __start = ::std::time::Instant::now();
        loop {
            if $cond {
                break;
            }
            if __start.elapsed() >= $crate::EVENTUALLY_DEADLINE {
                panic!(
                    "not true within {:?}: {}",
                    $crate::EVENTUALLY_DEADLINE,
                    format_args!($($arg)+)
                );
            }
            ::std::thread::sleep($crate::POLL_INTERVAL);
        }
    }};
}

/// Re-evaluates `left` and `right` every [`POLL_INTERVAL`] until they are equal; panics after
/// [`EVENTUALLY_DEADLINE`] showing the last observed values.
///
/// ```
/// let start = std::time::Instant::now();
/// test_support::assert_eventually_eq!(start.elapsed().as_millis() > 60, true);
/// ```
#[macro_export]
macro_rules! assert_eventually_eq {
    ($left:expr, $right:expr $(,)?) => {{
        let __start = ::std::time::Instant::now();
        loop {
            let __left = $left;
            let __right = $right;
            if __left == __right {
                break;
            }
            if __start.elapsed() >= $crate::EVENTUALLY_DEADLINE {
                panic!(
                    "`{}` did not become `{}` within {:?}\n last observed: {:?}\n      expected: {:?}",
                    stringify!($left),
                    stringify!($right),
                    $crate::EVENTUALLY_DEADLINE,
                    __left,
                    __right
                );
            }
            ::std::thread::sleep($crate::POLL_INTERVAL);
        }
    }};
}

/// Async [`assert_eventually!`]: the expression may contain `.await`; waits with
/// `tokio::time::sleep`, so it must be used inside a tokio runtime.
#[macro_export]
macro_rules! assert_eventually_async {
    ($cond:expr $(,)?) => {
        $crate::assert_eventually_async!($cond, "{}", stringify!($cond))
    };
    ($cond:expr, $($arg:tt)+) => {{
        let __start = ::std::time::Instant::now();
        loop {
            if $cond {
                break;
            }
            if __start.elapsed() >= $crate::EVENTUALLY_DEADLINE {
                panic!(
                    "not true within {:?}: {}",
                    $crate::EVENTUALLY_DEADLINE,
                    format_args!($($arg)+)
                );
            }
            $crate::__private::tokio::time::sleep($crate::POLL_INTERVAL).await;
        }
    }};
}

/// Async [`assert_eventually_eq!`]: the expressions may contain `.await`.
#[macro_export]
macro_rules! assert_eventually_eq_async {
    ($left:expr, $right:expr $(,)?) => {{
        let __start = ::std::time::Instant::now();
        loop {
            let __left = $left;
            let __right = $right;
            if __left == __right {
                break;
            }
            if __start.elapsed() >= $crate::EVENTUALLY_DEADLINE {
                panic!(
                    "`{}` did not become `{}` within {:?}\n last observed: {:?}\n      expected: {:?}",
                    stringify!($left),
                    stringify!($right),
                    $crate::EVENTUALLY_DEADLINE,
                    __left,
                    __right
                );
            }
            $crate::__private::tokio::time::sleep($crate::POLL_INTERVAL).await;
        }
    }};
}
