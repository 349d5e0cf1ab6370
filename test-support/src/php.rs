//! [`PhpServer`]: Debian's PHP built-in web server (`php -S`) serving a tiny app with real PHP
//! file sessions, standing in for one LibreEHR/OpenEMR container in affinity tests.
//!
//! The docroot is a temp dir holding copies of `test-support/php/`:
//! - `counter.php`: `session_start()`, increments `$_SESSION['n']`, answers
//!   `{"instance", "counter", "session_id", "session_name"}`;
//! - `login.php`: like `counter.php` but calls `session_regenerate_id(true)` first, as
//!   LibreEHR does at login (also answers `old_session_id`);
//! - `index.php`: `200 ok` for health checks.
//!
//! Sessions live in the server's own temp dir with `session.use_strict_mode=1`, so an id
//! issued by another instance is refused and the counter restarts at 1: that is how a test
//! sees broken affinity. Sessions survive [`PhpServer::restart`] (same dir) unless
//! [`PhpServer::clear_sessions`] is called. `php -S` handles one request at a time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use crate::spawn::{self, OutputFiles};

const INSTALL_HINT: &str = "apt-get install php8.2-cli";
const START_ATTEMPTS: usize = 5;
const START_DEADLINE: Duration = Duration::from_secs(20);

/// The PHP sources copied into every docroot: (file name, contents).
const DOCROOT_FILES: [(&str, &str); 3] = [
    ("counter.php", include_str!("../php/counter.php")),
    ("login.php", include_str!("../php/login.php")),
    ("index.php", include_str!("../php/index.php")),
];

/// The `php` CLI binary (from `PATH`, or `SPACE_TEST_PHP`); panics with
/// "php not found: apt-get install php8.2-cli" if there is none.
#[track_caller]
pub fn php_binary() -> PathBuf {
    spawn::require_program("php", "SPACE_TEST_PHP", INSTALL_HINT)
}

/// Options for [`PhpServer`]; from [`PhpServer::builder`].
#[derive(Clone, Debug)]
pub struct PhpServerBuilder {
    instance_id: String,
    session_name: String,
    ini: Vec<(String, String)>,
}

impl PhpServerBuilder {
    /// The session cookie name (`session.name`), e.g. `LibreHealthEHR`; default `PHPSESSID`.
    pub fn session_name(mut self, name: &str) -> Self {
        self.session_name = name.to_string();
        self
    }

    /// An extra `-d key=value` php.ini setting (applied after the defaults).
    pub fn ini(mut self, key: &str, value: &str) -> Self {
        self.ini.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the server and waits until it serves `/index.php`.
    #[track_caller]
    pub fn start(self) -> PhpServer {
        let php = php_binary();
        let dir = crate::temp_dir();
        let docroot = dir.path().join("docroot");
        let session_dir = dir.path().join("sessions");
        for d in [&docroot, &session_dir] {
            std::fs::create_dir_all(d)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        for (name, contents) in DOCROOT_FILES {
            let path = docroot.join(name);
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        let output = OutputFiles::new(dir.path(), "php");
        let mut server = PhpServer {
            php,
            options: self,
            addr: crate::free_addr(),
            docroot,
            session_dir,
            output,
            child: None,
            _dir: dir,
        };
        server.launch(true);
        server
    }
}

/// A running `php -S 127.0.0.1:PORT`; killed (by PID) on drop.
#[derive(Debug)]
pub struct PhpServer {
    php: PathBuf,
    options: PhpServerBuilder,
    addr: SocketAddr,
    docroot: PathBuf,
    session_dir: PathBuf,
    output: OutputFiles,
    child: Option<Child>,
    // Holds docroot, sessions and logs; removed on drop.
    _dir: tempfile::TempDir,
}

impl PhpServer {
    /// Starts a server whose pages report `instance_id`, with the default session name.
    #[track_caller]
    pub fn start(instance_id: &str) -> PhpServer {
        Self::builder(instance_id).start()
    }

    /// Options for a server whose pages report `instance_id` (env `INSTANCE_ID`).
    pub fn builder(instance_id: &str) -> PhpServerBuilder {
        PhpServerBuilder {
            instance_id: instance_id.to_string(),
            session_name: "PHPSESSID".to_string(),
            ini: Vec::new(),
        }
    }

    /// `127.0.0.1:port`; the same across [`PhpServer::restart`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The instance id the pages report.
    pub fn instance_id(&self) -> &str {
        &self.options.instance_id
    }

    /// The session cookie name.
    pub fn session_name(&self) -> &str {
        &self.options.session_name
    }

    /// The docroot; tests may add their own PHP files here.
    pub fn docroot(&self) -> &Path {
        &self.docroot
    }

    /// Where PHP stores session files (`sess_<id>`).
    pub fn session_dir(&self) -> &Path {
        &self.session_dir
    }

    /// The server's process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the php process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// php's output so far (the built-in server logs each request to stderr).
    pub fn logs(&self) -> String {
        self.output.all()
    }

    /// Kills the php process (SIGKILL by PID) and reaps it: connects are refused afterwards.
    /// Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            spawn::kill_and_reap(&mut child);
        }
    }

    /// Stops (if running) and starts again on the same port, docroot and session dir.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.launch(false);
    }

    /// Deletes all stored sessions (e.g. to simulate a container replaced by a fresh one).
    pub fn clear_sessions(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.session_dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Spawns php and waits until it serves; on a lost port race, retries on a new port if
    /// `may_change_port`, else on the same port.
    #[track_caller]
    fn launch(&mut self, may_change_port: bool) {
        let mut failures = Vec::new();
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 && may_change_port {
                self.addr = crate::free_addr();
            }
            let mut cmd = spawn::command(&self.php, self.args());
            cmd.env("INSTANCE_ID", &self.options.instance_id);
            self.output.attach(&mut cmd);
            let mut child = spawn::spawn(cmd)
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.php.display()));
            match wait_serving(&mut child, self.addr) {
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
            "php -S for instance {} did not start after {START_ATTEMPTS} attempts: {}\n{}",
            self.options.instance_id,
            failures.join("; "),
            self.output.tail(40)
        );
    }

    fn args(&self) -> Vec<String> {
        let mut ini = vec![
            ("session.save_path", self.session_dir.display().to_string()),
            ("session.use_strict_mode", "1".to_string()),
            ("session.gc_probability", "0".to_string()),
            ("session.name", self.options.session_name.clone()),
            ("display_errors", "stderr".to_string()),
        ];
        ini.extend(
            self.options
                .ini
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone())),
        );
        let mut args = Vec::new();
        for (key, value) in ini {
            args.push("-d".to_string());
            args.push(format!("{key}={value}"));
        }
        args.extend([
            "-S".to_string(),
            self.addr.to_string(),
            "-t".to_string(),
            self.docroot.display().to_string(),
        ]);
        args
    }
}

impl Drop for PhpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `child` itself listens on `addr` and `/index.php` answers 200.
fn wait_serving(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    spawn::wait_child_ready(child, "php", addr.port(), "serving", START_DEADLINE, || {
        match crate::http::get_blocking(addr, "/index.php") {
            Ok(response) if response.status == 200 => Ok(()),
            Ok(response) => Err(format!("{} {}", response.status, response.text())),
            Err(e) => Err(format!("error: {e}")),
        }
    })
}
