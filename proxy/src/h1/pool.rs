//! Idle backend connections of the fast path, kept per worker thread.
//!
//! SPACE's workers each run their own single-threaded runtime, and a connection taken on a
//! thread is used and returned on that thread: a thread-local list per backend address needs
//! no lock, no task and no channel. A connection is checked before reuse without a system
//! call: if the runtime has seen it become readable while idle, the backend closed it (or
//! sent bytes nobody asked for) and it is dropped. Connections idle longer than the module's
//! idle timeout are dropped when met, and a sweep every few seconds drops those of
//! instances that are no longer asked for.
use std::{
    cell::RefCell,
    net::SocketAddr,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use tokio::net::TcpStream;

/// How often the whole pool is swept for connections idle past `SWEEP_IDLE`.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Idle time after which the sweep drops a connection whatever its module says.
const SWEEP_IDLE: Duration = Duration::from_secs(120);

struct Idle {
    stream: TcpStream,
    since: Instant,
}

struct Pool {
    by_addr: FxHashMap<SocketAddr, Vec<Idle>>,
    last_sweep: Instant,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        by_addr: FxHashMap::default(),
        last_sweep: Instant::now(),
    });
}

/// An idle connection to `addr` that is still open, idle for less than `max_idle` at `now`.
pub fn take(addr: SocketAddr, max_idle: Duration, now: Instant) -> Option<TcpStream> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.by_addr.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if now.saturating_duration_since(idle.since) < max_idle && still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    })
}

/// Keeps `stream` for reuse, idle since `now`; dropped when `addr` already has `max_idle`
/// idle connections on this thread (`[server] upstream_keepalive_pool`).
pub fn put(addr: SocketAddr, stream: TcpStream, max_idle: usize, now: Instant) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if now.duration_since(p.last_sweep) >= SWEEP_EVERY {
            p.last_sweep = now;
            p.by_addr.retain(|_, list| {
                list.retain(|i| now.duration_since(i.since) < SWEEP_IDLE);
                !list.is_empty()
            });
        }
        let list = p.by_addr.entry(addr).or_default();
        if list.len() < max_idle {
            list.push(Idle { stream, since: now });
        }
    })
}

/// Whether an idle connection is still usable: nothing has arrived on it (a close from the
/// backend arrives as readable). Checked against the runtime's readiness, then one
/// non-blocking read to be sure.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        put(addr, client, 8, Instant::now());
        let again = take(addr, Duration::from_secs(60), Instant::now())
            .expect("an open connection is reused");
        put(addr, again, 8, Instant::now());
        drop(server_side);
        // Let the runtime see the close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(addr, Duration::from_secs(60), Instant::now()).is_none());
    }

    #[tokio::test]
    async fn idle_past_the_timeout_is_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let _server_side = listener.accept().await.unwrap();
        put(addr, client, 8, Instant::now());
        assert!(take(addr, Duration::ZERO, Instant::now()).is_none());
    }

    #[tokio::test]
    async fn no_more_than_the_configured_number_are_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server_sides = Vec::new();
        for _ in 0..3 {
            let client = TcpStream::connect(addr).await.unwrap();
            server_sides.push(listener.accept().await.unwrap());
            put(addr, client, 2, Instant::now());
        }
        let long = Duration::from_secs(60);
        assert!(take(addr, long, Instant::now()).is_some());
        assert!(take(addr, long, Instant::now()).is_some());
        assert!(take(addr, long, Instant::now()).is_none());
    }
}
