//! [`Dnsmasq`]: Debian's real dnsmasq (package `dnsmasq-base`) as a small authoritative-ish
//! DNS server on loopback, standing in for Kubernetes' cluster DNS; plus [`lookup_addrs`], a
//! tiny blocking UDP client (independent of the code under test) to check what it answers.
//!
//! - A/AAAA records live in one hosts file per name in a watched directory (`--hostsdir`):
//!   [`Dnsmasq::set_hosts`] replaces a name's addresses atomically (rename) and returns once
//!   dnsmasq answers the new set; an empty set removes the name.
//! - SRV records are fixed at start ([`DnsmasqBuilder::srv`]); the answer's additional section
//!   carries the targets' addresses dnsmasq knows.
//! - Names under `cluster.local` (and any [`DnsmasqBuilder::local_domain`]) that are not
//!   configured answer NXDOMAIN; other names are refused (there is no upstream).
//! - Every record has TTL [`DnsmasqBuilder::ttl`] (default 1 s), so a TTL-driven client
//!   re-asks quickly.
//! - [`Dnsmasq::stop`] kills it (queries time out or are refused by the kernel),
//!   [`Dnsmasq::restart`] brings it back on the same port with the same records.
//!
//! The flags (see `launch`): `--keep-in-foreground` (no fork, so the PID we hold is the
//! server), `--conf-file=/dev/null --no-resolv --no-hosts --no-poll` (read nothing of the
//! machine's), `--bind-interfaces --listen-address=127.0.0.1 --port=P`, `--pid-file=` (none),
//! `--log-facility=- --log-queries` (log to stderr, captured in a temp file), and `--user=root`
//! when run as root (else dnsmasq drops to `nobody`, which cannot read our 0700 temp dir).

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use crate::spawn::{self, OutputFiles};

const INSTALL_HINT: &str = "apt-get install dnsmasq-base";
const START_ATTEMPTS: usize = 5;
const START_DEADLINE: Duration = Duration::from_secs(20);
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// The `dnsmasq` binary (from `PATH`, `/usr/sbin`, or `SPACE_TEST_DNSMASQ`); panics with
/// "dnsmasq not found: apt-get install dnsmasq-base" if there is none.
#[track_caller]
pub fn dnsmasq_binary() -> PathBuf {
    if std::env::var_os("SPACE_TEST_DNSMASQ").is_none() {
        let sbin = Path::new("/usr/sbin/dnsmasq");
        if sbin.is_file() {
            return sbin.to_path_buf();
        }
    }
    spawn::require_program("dnsmasq", "SPACE_TEST_DNSMASQ", INSTALL_HINT)
}

/// One SRV record: `name` → `target:port` with `priority` and `weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    /// The service name, e.g. `_http._tcp.portal.ehr.svc.cluster.local`.
    pub name: String,
    /// The target host name.
    pub target: String,
    /// The target port.
    pub port: u16,
    /// Lower is preferred.
    pub priority: u16,
    /// Relative weight within a priority.
    pub weight: u16,
}

/// Records to start [`Dnsmasq`] with; see [`Dnsmasq::builder`].
#[derive(Debug, Clone)]
pub struct DnsmasqBuilder {
    srv: Vec<SrvRecord>,
    hosts: Vec<(String, Vec<IpAddr>)>,
    local_domains: Vec<String>,
    ttl: u32,
}

impl DnsmasqBuilder {
    /// Adds an SRV record (e.g. `.srv("_http._tcp.portal.ehr.svc.cluster.local",
    /// "portal-0.ehr.svc.cluster.local", 8080, 0, 5)`).
    pub fn srv(mut self, name: &str, target: &str, port: u16, priority: u16, weight: u16) -> Self {
        self.srv.push(SrvRecord {
            name: name.trim_end_matches('.').to_string(),
            target: target.trim_end_matches('.').to_string(),
            port,
            priority,
            weight,
        });
        self
    }

    /// Gives `name` these A/AAAA addresses from the start (changeable with
    /// [`Dnsmasq::set_hosts`]).
    pub fn host(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.hosts.push((name.to_string(), addrs.to_vec()));
        self
    }

    /// Another domain whose unknown names answer NXDOMAIN (`cluster.local` always does).
    pub fn local_domain(mut self, domain: &str) -> Self {
        self.local_domains
            .push(domain.trim_matches('.').to_string());
        self
    }

    /// TTL of every record, in seconds (default 1).
    pub fn ttl(mut self, secs: u32) -> Self {
        self.ttl = secs;
        self
    }

    /// Starts dnsmasq on a free loopback port and waits until it answers.
    #[track_caller]
    pub fn start(self) -> Dnsmasq {
        let binary = dnsmasq_binary();
        let dir = crate::temp_dir();
        let hosts_dir = dir.path().join("hosts");
        let staging_dir = dir.path().join("staging");
        for d in [&hosts_dir, &staging_dir] {
            fs::create_dir(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let mut server = Dnsmasq {
            binary,
            addr: free_udp_and_tcp_addr(),
            hosts_dir,
            staging_dir,
            output: OutputFiles::new(dir.path(), "dnsmasq"),
            child: None,
            config: self.clone(),
            _dir: dir,
        };
        for (name, addrs) in &self.hosts {
            server.write_hosts_file(name, addrs);
        }
        server.launch(true);
        for (name, addrs) in &self.hosts {
            server.wait_for_addrs(name, addrs);
        }
        server
    }
}

/// A running dnsmasq; killed (by PID) on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    binary: PathBuf,
    addr: SocketAddr,
    hosts_dir: PathBuf,
    staging_dir: PathBuf,
    output: OutputFiles,
    child: Option<Child>,
    config: DnsmasqBuilder,
    // Holds the hosts dir and logs; removed on drop.
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Records to start with: `Dnsmasq::builder().srv(..).host(..).start()`.
    pub fn builder() -> DnsmasqBuilder {
        DnsmasqBuilder {
            srv: Vec::new(),
            hosts: Vec::new(),
            local_domains: vec!["cluster.local".to_string()],
            ttl: 1,
        }
    }

    /// Starts dnsmasq with no records (add some with [`Dnsmasq::set_hosts`]).
    ///
    /// Panics with "dnsmasq not found: apt-get install dnsmasq-base" if there is no dnsmasq
    /// (or set `SPACE_TEST_DNSMASQ` to its path).
    #[track_caller]
    pub fn start() -> Dnsmasq {
        Dnsmasq::builder().start()
    }

    /// `127.0.0.1:PORT`, where it answers over UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dnsmasq process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// dnsmasq's log (every query is logged) so far.
    pub fn logs(&self) -> String {
        self.output.all()
    }

    /// Replaces the A/AAAA addresses of `name` (an empty slice removes the name) and blocks
    /// until dnsmasq answers exactly `addrs`. The hosts file is replaced atomically, and
    /// dnsmasq rereads it on its inotify event. Works while stopped too (then it only writes).
    #[track_caller]
    pub fn set_hosts(&self, name: &str, addrs: &[IpAddr]) {
        self.write_hosts_file(name, addrs);
        if self.child.is_some() {
            self.wait_for_addrs(name, addrs);
        }
    }

    /// Same as `set_hosts(name, &[])`.
    #[track_caller]
    pub fn remove_hosts(&self, name: &str) {
        self.set_hosts(name, &[]);
    }

    /// What dnsmasq answers for `name` right now (A and AAAA); see [`lookup_addrs`].
    pub fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        lookup_addrs(self.addr, name)
    }

    /// Kills dnsmasq (SIGKILL by PID) and reaps it; the port and records stay reserved for
    /// [`Dnsmasq::restart`]. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            spawn::kill_and_reap(&mut child);
        }
    }

    /// Stops (if running) and starts dnsmasq again on the same port with the same records
    /// (SRV from the builder, hosts as last set).
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.launch(false);
    }

    fn hosts_file(&self, name: &str) -> String {
        // One file per name; DNS names hold no `/`, but keep the file name tame anyway.
        name.trim_end_matches('.')
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    fn write_hosts_file(&self, name: &str, addrs: &[IpAddr]) {
        let file = self.hosts_file(name);
        let target = self.hosts_dir.join(&file);
        if addrs.is_empty() {
            match fs::remove_file(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("cannot remove {}: {e}", target.display()),
            }
            return;
        }
        let host = name.trim_end_matches('.');
        let text: String = addrs.iter().map(|ip| format!("{ip} {host}\n")).collect();
        // Written outside the watched dir, then renamed in: dnsmasq never sees half a file.
        let staged = self.staging_dir.join(&file);
        fs::write(&staged, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", staged.display()));
        fs::rename(&staged, &target).unwrap_or_else(|e| {
            panic!(
                "cannot move {} to {}: {e}",
                staged.display(),
                target.display()
            )
        });
    }

    #[track_caller]
    fn wait_for_addrs(&self, name: &str, addrs: &[IpAddr]) {
        let mut want = addrs.to_vec();
        want.sort();
        want.dedup();
        let start = Instant::now();
        loop {
            let last = self.lookup(name);
            if last.as_ref() == Ok(&want) {
                return;
            }
            if start.elapsed() >= crate::EVENTUALLY_DEADLINE {
                panic!(
                    "dnsmasq did not answer {want:?} for {name} within {:?}; last answer: {last:?}\n{}",
                    crate::EVENTUALLY_DEADLINE,
                    self.output.tail(30)
                );
            }
            std::thread::sleep(crate::POLL_INTERVAL);
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".to_string(),
            format!("--port={}", self.addr.port()),
            format!("--listen-address={}", self.addr.ip()),
            "--bind-interfaces".to_string(),
            "--no-resolv".to_string(),
            "--no-hosts".to_string(),
            "--no-poll".to_string(),
            format!("--hostsdir={}", self.hosts_dir.display()),
            format!("--local-ttl={}", self.config.ttl),
            "--pid-file=".to_string(),
            "--log-facility=-".to_string(),
            "--log-queries".to_string(),
        ];
        if running_as_root() {
            args.push("--user=root".to_string());
        }
        for domain in &self.config.local_domains {
            args.push(format!("--local=/{domain}/"));
        }
        for r in &self.config.srv {
            args.push(format!(
                "--srv-host={},{},{},{},{}",
                r.name, r.target, r.port, r.priority, r.weight
            ));
        }
        args
    }

    #[track_caller]
    fn launch(&mut self, may_change_port: bool) {
        let mut failures = Vec::new();
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 && may_change_port {
                self.addr = free_udp_and_tcp_addr();
            }
            let mut cmd = spawn::command(&self.binary, self.args());
            self.output.attach(&mut cmd);
            let mut child = spawn::spawn(cmd)
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
            match wait_answering(&mut child, self.addr) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => {
                    spawn::kill_and_reap(&mut child);
                    failures.push(format!("{}: {why}", self.addr));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "dnsmasq did not start after {START_ATTEMPTS} attempts: {}\n{}",
            failures.join("; "),
            self.output.tail(40)
        );
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `127.0.0.1:PORT` free for both UDP and TCP a moment ago.
fn free_udp_and_tcp_addr() -> SocketAddr {
    loop {
        let udp = UdpSocket::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("cannot bind UDP 127.0.0.1:0: {e}"));
        let addr = udp.local_addr().expect("a bound socket has an address");
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// Waits until our child listens on the port (TCP, so not some other process) and answers a
/// UDP query.
fn wait_answering(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    spawn::wait_child_ready(
        child,
        "dnsmasq",
        addr.port(),
        "answering",
        START_DEADLINE,
        || {
            // Any answer will do (a refusal included): it proves the server is up.
            query(addr, "space-test-readiness.invalid", RecordType::A).map(|_| ())
        },
    )
}

/// Asks `server` (one UDP query each for A and AAAA) for the addresses of `name`: sorted and
/// deduplicated; `Ok(empty)` for NXDOMAIN or no records; `Err` for no answer or another
/// response code.
pub fn lookup_addrs(server: SocketAddr, name: &str) -> Result<Vec<IpAddr>, String> {
    let mut addrs = Vec::new();
    for record_type in [RecordType::A, RecordType::AAAA] {
        let answer = query(server, name, record_type)?;
        match answer.rcode {
            RCODE_NOERROR | RCODE_NXDOMAIN => addrs.extend(answer.addrs),
            other => return Err(format!("{record_type:?} {name}: response code {other}")),
        }
    }
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

const RCODE_NOERROR: u8 = 0;
const RCODE_NXDOMAIN: u8 = 3;

#[derive(Debug, Clone, Copy)]
#[allow(clippy::upper_case_acronyms)] // the DNS names of the types
enum RecordType {
    A = 1,
    AAAA = 28,
}

#[derive(Debug)]
struct RawAnswer {
    rcode: u8,
    addrs: Vec<IpAddr>,
}

/// One blocking UDP query; parses the A/AAAA records of the answer section.
fn query(server: SocketAddr, name: &str, record_type: RecordType) -> Result<RawAnswer, String> {
    static NEXT_ID: AtomicU16 = AtomicU16::new(0x5ace);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00]); // standard query, recursion desired
    packet.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len()).map_err(|_| format!("label too long in {name}"))?;
        packet.push(len);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&(record_type as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 1]); // class IN

    let socket = UdpSocket::bind(("127.0.0.1", 0)).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(QUERY_TIMEOUT))
        .map_err(|e| format!("set timeout: {e}"))?;
    socket
        .send_to(&packet, server)
        .map_err(|e| format!("send to {server}: {e}"))?;
    let mut buf = [0u8; 4096];
    loop {
        let (len, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer from {server} for {record_type:?} {name}: {e}"))?;
        if from != server || len < 12 || buf[..2] != id.to_be_bytes() {
            continue;
        }
        return parse_answer(&buf[..len]).map_err(|e| format!("bad answer from {server}: {e}"));
    }
}

fn parse_answer(msg: &[u8]) -> Result<RawAnswer, &'static str> {
    let u16_at = |at: usize| -> Result<u16, &'static str> {
        msg.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or("truncated")
    };
    let rcode = msg[3] & 0x0f;
    let questions = u16_at(4)?;
    let answers = u16_at(6)?;
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(msg, at)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at)?;
        let rtype = u16_at(at)?;
        let rdlen = usize::from(u16_at(at + 8)?);
        let rdata = msg.get(at + 10..at + 10 + rdlen).ok_or("truncated rdata")?;
        match (rtype, rdata.len()) {
            (1, 4) => addrs.push(IpAddr::V4(Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            (28, 16) => {
                let octets: [u8; 16] = rdata.try_into().map_err(|_| "bad AAAA")?;
                addrs.push(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            _ => {}
        }
        at += 10 + rdlen;
    }
    Ok(RawAnswer { rcode, addrs })
}

/// The offset just past the (possibly compressed) name starting at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize, &'static str> {
    loop {
        let len = *msg.get(at).ok_or("truncated name")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}
