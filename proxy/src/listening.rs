//! Whether this process's proxy listeners are bound, for `/readyz`.
//!
//! Pingora binds each service's listeners on that service's own thread, so the admin
//! listener can answer before the proxy's are bound. `/readyz` must not say ready then: a
//! Kubernetes readiness probe or a test would send traffic to a port that refuses it.
//! Connecting to our own ports would tell, but a bare connect to the TLS listener is logged
//! as a failed handshake; instead we look the sockets up in the kernel's tables
//! (`/proc/net/tcp{,6}`, state LISTEN) and check that this process holds them
//! (`/proc/self/fd`). Once every listener has been seen, the answer is cached.
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
};

/// The proxy's listen addresses and whether all of them have been seen bound.
#[derive(Debug, Default)]
pub struct ProxyListeners {
    addrs: Vec<SocketAddr>,
    bound: AtomicBool,
}

/// TCP state LISTEN in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

impl ProxyListeners {
    /// Port 0 (any port) cannot be looked up and is left out.
    pub fn new(mut addrs: Vec<SocketAddr>) -> Self {
        addrs.retain(|a| a.port() != 0);
        let bound = AtomicBool::new(addrs.is_empty());
        ProxyListeners { addrs, bound }
    }

    /// True once every proxy listener is bound by this process. On a system without
    /// `/proc` the check cannot be made and this says true.
    pub fn all_bound(&self) -> bool {
        if self.bound.load(Ordering::Relaxed) {
            return true;
        }
        let Some(owned) = socket_inodes_of_this_process() else {
            return true;
        };
        let mut listening = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(table) {
                listening.extend(listening_ports(&text, &owned));
            }
        }
        let all = self.addrs.iter().all(|a| listening.contains(&a.port()));
        if all {
            self.bound.store(true, Ordering::Relaxed);
        }
        all
    }
}

/// Inodes of the sockets this process has open (`socket:[N]` links in `/proc/self/fd`).
fn socket_inodes_of_this_process() -> Option<HashSet<u64>> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|target| {
                let t = target.to_str()?;
                t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect(),
    )
}

/// Local ports of LISTEN sockets in a `/proc/net/tcp` table whose inode is in `owned`.
fn listening_ports<'a>(table: &'a str, owned: &'a HashSet<u64>) -> impl Iterator<Item = u16> + 'a {
    table.lines().skip(1).filter_map(move |line| {
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != TCP_LISTEN || !owned.contains(&inode.parse().ok()?) {
            return None;
        }
        u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F92 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn only_listening_sockets_of_this_process_count() {
        let owned: HashSet<u64> = [4242, 4243].into();
        let ports: Vec<u16> = listening_ports(TABLE, &owned).collect();
        // 8081 is another process's listener, 8082 an established connection.
        assert_eq!(ports, vec![8080]);
    }

    #[test]
    fn a_bound_listener_of_this_process_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(ProxyListeners::new(vec![addr]).all_bound());
        drop(listener);
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!ProxyListeners::new(vec![free]).all_bound());
    }
}
