//! Free loopback ports for programs that must be told their port up front (the `space`
//! config, php, etcd), and waiting until a port accepts connections.
//!
//! A port from [`free_port`] is free when returned, not reserved: another process may take it
//! before the program binds it. Helpers that start programs on such ports check that their own
//! child owns the listener and retry on a new port if it lost the race.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, close).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free port>`; see [`free_port`].
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
    listener
        .local_addr()
        .expect("a bound listener has a local address")
}

/// Blocks until a TCP connect to `addr` succeeds; panics with the last connect error after
/// `deadline`.
#[track_caller]
pub fn wait_port(addr: SocketAddr, deadline: Duration) {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(_) => return,
            Err(e) if start.elapsed() >= deadline => {
                panic!("{addr} did not accept a connection within {deadline:?}; last error: {e}")
            }
            Err(_) => std::thread::sleep(crate::POLL_INTERVAL),
        }
    }
}

/// True if a TCP connect to `addr` succeeds right now.
pub fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}
