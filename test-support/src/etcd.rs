//! [`Etcd`]: Debian's real etcd (3.4, package `etcd-server`) as a single-member cluster on
//! loopback with a temp data dir, plus a small blocking KV/lease client over etcd's JSON
//! gRPC gateway (`/v3/kv/*`, `/v3/lease/*`; keys and values travel base64-encoded).
//!
//! For failure tests: [`Etcd::stop`] kills it (connects refused), [`Etcd::restart`] brings it
//! back with the same data dir and ports (keys and revisions survive), [`Etcd::pause`] freezes
//! it with `SIGSTOP` (connects hang instead of failing) until [`Etcd::resume`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::spawn::{self, OutputFiles};

const INSTALL_HINT: &str = "apt-get install etcd-server";
const START_ATTEMPTS: usize = 5;
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The `etcd` binary (from `PATH`, or `SPACE_TEST_ETCD`); panics with
/// "etcd not found: apt-get install etcd-server" if there is none.
#[track_caller]
pub fn etcd_binary() -> PathBuf {
    spawn::require_program("etcd", "SPACE_TEST_ETCD", INSTALL_HINT)
}

/// A running single-member etcd; killed (by PID) on drop.
#[derive(Debug)]
pub struct Etcd {
    etcd: PathBuf,
    data_dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    output: OutputFiles,
    child: Option<Child>,
    paused: bool,
    // Holds the data dir and logs; removed on drop.
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until `GET /health` says `"true"`.
    ///
    /// Panics with "etcd not found: apt-get install etcd-server" if there is no etcd binary
    /// (or set `SPACE_TEST_ETCD` to its path).
    #[track_caller]
    pub fn start() -> Etcd {
        let etcd = etcd_binary();
        let dir = crate::temp_dir();
        let mut server = Etcd {
            etcd,
            data_dir: dir.path().join("data"),
            client: crate::free_addr(),
            peer: crate::free_addr(),
            output: OutputFiles::new(dir.path(), "etcd"),
            child: None,
            paused: false,
            _dir: dir,
        };
        server.launch(true);
        server
    }

    /// The client URL, `http://127.0.0.1:PORT`, for the registry's etcd client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }

    /// The data directory (kept across [`Etcd::restart`]).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The etcd process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True between [`Etcd::pause`] and [`Etcd::resume`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// etcd's log output so far.
    pub fn logs(&self) -> String {
        self.output.all()
    }

    /// True if `GET /health` answers `{"health":"true"}` right now.
    pub fn is_healthy(&self) -> bool {
        health(self.client).is_ok()
    }

    /// Kills etcd (SIGKILL by PID) and reaps it; the data dir stays. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            spawn::kill_and_reap(&mut child);
        }
        self.paused = false;
    }

    /// Stops (if running) and starts etcd again with the same data dir and ports.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.launch(false);
    }

    /// Freezes etcd with `SIGSTOP` and waits until all its threads are stopped: its ports
    /// still accept TCP connections, but nothing is answered, like a hung server.
    #[track_caller]
    pub fn pause(&mut self) {
        let pid = self.pid().expect("etcd is not running");
        spawn::send_signal(pid, libc::SIGSTOP).expect("SIGSTOP etcd");
        // The stop is delivered asynchronously: wait until every thread is stopped.
        crate::eventually(crate::EVENTUALLY_DEADLINE, || {
            let states = spawn::thread_states(pid);
            if !states.is_empty() && states.iter().all(|s| *s == 'T') {
                Ok(())
            } else {
                Err(format!("etcd thread states {states:?}"))
            }
        });
        self.paused = true;
    }

    /// Undoes [`Etcd::pause`] with `SIGCONT`.
    #[track_caller]
    pub fn resume(&mut self) {
        let pid = self.pid().expect("etcd is not running");
        spawn::send_signal(pid, libc::SIGCONT).expect("SIGCONT etcd");
        crate::eventually(crate::EVENTUALLY_DEADLINE, || {
            let states = spawn::thread_states(pid);
            if states.contains(&'T') {
                Err(format!("etcd thread states {states:?}"))
            } else {
                Ok(())
            }
        });
        self.paused = false;
    }

    /// Puts `key` = `value`; returns the revision of the write.
    #[track_caller]
    pub fn put(&self, key: &str, value: &str) -> i64 {
        let reply = self.call(
            "/v3/kv/put",
            json!({ "key": b64(key), "value": b64(value) }),
        );
        header_revision(&reply)
    }

    /// Puts `key` = `value` attached to `lease` (from [`Etcd::grant_lease`]); returns the
    /// revision of the write.
    #[track_caller]
    pub fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> i64 {
        let reply = self.call(
            "/v3/kv/put",
            json!({ "key": b64(key), "value": b64(value), "lease": lease.to_string() }),
        );
        header_revision(&reply)
    }

    /// The value of `key`, if present.
    #[track_caller]
    pub fn get(&self, key: &str) -> Option<String> {
        let reply = self.call("/v3/kv/range", json!({ "key": b64(key) }));
        kvs(&reply).into_iter().next().map(|(_, v)| v)
    }

    /// All `(key, value)` pairs whose key starts with `prefix`, sorted by key.
    #[track_caller]
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let reply = self.call(
            "/v3/kv/range",
            json!({ "key": b64(prefix), "range_end": BASE64.encode(prefix_end(prefix.as_bytes())) }),
        );
        kvs(&reply)
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    #[track_caller]
    pub fn delete(&self, key: &str) -> i64 {
        let reply = self.call("/v3/kv/deleterange", json!({ "key": b64(key) }));
        int_field(&reply, "deleted")
    }

    /// Deletes every key starting with `prefix`; returns how many were deleted.
    #[track_caller]
    pub fn delete_prefix(&self, prefix: &str) -> i64 {
        let reply = self.call(
            "/v3/kv/deleterange",
            json!({ "key": b64(prefix), "range_end": BASE64.encode(prefix_end(prefix.as_bytes())) }),
        );
        int_field(&reply, "deleted")
    }

    /// The current revision of the store.
    #[track_caller]
    pub fn revision(&self) -> i64 {
        let reply = self.call("/v3/kv/range", json!({ "key": b64("\0"), "limit": 1 }));
        header_revision(&reply)
    }

    /// Compacts history up to `revision` (watches from older revisions then fail with
    /// "compacted", forcing a resync).
    #[track_caller]
    pub fn compact(&self, revision: i64) {
        self.call(
            "/v3/kv/compaction",
            json!({ "revision": revision.to_string(), "physical": true }),
        );
    }

    /// Grants a lease of `ttl_secs`; returns its id.
    #[track_caller]
    pub fn grant_lease(&self, ttl_secs: i64) -> i64 {
        let reply = self.call("/v3/lease/grant", json!({ "TTL": ttl_secs.to_string() }));
        int_field(&reply, "ID")
    }

    /// Revokes `lease`, deleting every key attached to it (like a module that died).
    #[track_caller]
    pub fn revoke_lease(&self, lease: i64) {
        self.call("/v3/lease/revoke", json!({ "ID": lease.to_string() }));
    }

    /// POSTs `body` to the JSON gateway at `path` and returns the reply; panics with the
    /// reply on a non-200 answer or a transport error.
    #[track_caller]
    pub fn call(&self, path: &str, body: Value) -> Value {
        let response = crate::http::post_json_blocking(self.client, path, &body)
            .unwrap_or_else(|e| panic!("etcd {path} {body}: {e}"));
        if response.status != 200 {
            panic!(
                "etcd {path} {body} answered {}: {}",
                response.status,
                response.text()
            );
        }
        response.json()
    }

    #[track_caller]
    fn launch(&mut self, may_change_ports: bool) {
        let mut failures = Vec::new();
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 && may_change_ports {
                self.client = crate::free_addr();
                self.peer = crate::free_addr();
                // The failed member may have written its peer URL into the data dir.
                let _ = std::fs::remove_dir_all(&self.data_dir);
            }
            let client_url = format!("http://{}", self.client);
            let peer_url = format!("http://{}", self.peer);
            let args = [
                "--name".to_string(),
                "default".to_string(),
                "--data-dir".to_string(),
                self.data_dir.display().to_string(),
                "--listen-client-urls".to_string(),
                client_url.clone(),
                "--advertise-client-urls".to_string(),
                client_url,
                "--listen-peer-urls".to_string(),
                peer_url.clone(),
                "--initial-advertise-peer-urls".to_string(),
                peer_url.clone(),
                "--initial-cluster".to_string(),
                format!("default={peer_url}"),
                "--initial-cluster-state".to_string(),
                "new".to_string(),
                "--logger".to_string(),
                "zap".to_string(),
                "--log-outputs".to_string(),
                "stderr".to_string(),
            ];
            let mut cmd = spawn::command(&self.etcd, args);
            // ETCD_* variables conflict with the flags above and make etcd refuse to start.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(name);
                }
            }
            self.output.attach(&mut cmd);
            let mut child = spawn::spawn(cmd)
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.etcd.display()));
            match wait_healthy(&mut child, self.client) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => {
                    spawn::kill_and_reap(&mut child);
                    failures.push(format!("client {}: {why}", self.client));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "etcd did not start after {START_ATTEMPTS} attempts: {}\n{}",
            failures.join("; "),
            self.output.tail(40)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process.
        self.stop();
    }
}

fn wait_healthy(child: &mut Child, client: SocketAddr) -> Result<(), String> {
    spawn::wait_child_ready(
        child,
        "etcd",
        client.port(),
        "healthy",
        START_DEADLINE,
        || health(client),
    )
}

fn health(client: SocketAddr) -> Result<(), String> {
    let response = crate::http::get_blocking(client, "/health").map_err(|e| e.to_string())?;
    let body = response.text();
    let healthy = serde_json::from_str::<Value>(&body)
        .ok()
        .is_some_and(|v| v["health"] == "true");
    if response.status == 200 && healthy {
        Ok(())
    } else {
        Err(format!("{} {body}", response.status))
    }
}

fn b64(text: &str) -> String {
    BASE64.encode(text.as_bytes())
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from `prefix` on.
    vec![0]
}

/// The gateway encodes int64 as JSON strings; absent means 0.
fn int_field(value: &Value, field: &str) -> i64 {
    match &value[field] {
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("etcd {field}={s}")),
        Value::Number(n) => n.as_i64().unwrap_or_default(),
        _ => 0,
    }
}

fn header_revision(reply: &Value) -> i64 {
    int_field(&reply["header"], "revision")
}

fn kvs(reply: &Value) -> Vec<(String, String)> {
    let decode = |v: &Value| {
        let bytes = BASE64
            .decode(v.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("etcd sent bad base64 {v}: {e}"));
        String::from_utf8_lossy(&bytes).into_owned()
    };
    reply["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(super::prefix_end(b"/space/"), b"/space0".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(super::prefix_end(b""), vec![0]);
    }
}
