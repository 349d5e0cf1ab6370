//! The `space` binary as a child process: spawn it with arguments, capture its output to
//! files, wait until its admin `/readyz` answers 200, signal it, and kill it on `Drop`.
//!
//! Integration tests in the proxy crate pass `env!("CARGO_BIN_EXE_space")` as the binary.
//! The child inherits the test's environment (so `RUST_LOG` passes through) plus
//! `NO_COLOR=1`, so captured logs carry no ANSI escapes. If the test panics while a
//! [`SpaceProcess`] is alive, its log tail is printed to stderr on drop, where the test
//! harness shows it with the failure.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::spawn::{self, OutputFiles};

pub use libc::{SIGHUP, SIGINT, SIGKILL, SIGTERM};

/// How long [`SpaceProcess::wait_ready`] waits for `/readyz` to answer 200.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);

/// How long [`run_to_completion`] lets a one-shot command run before killing it.
pub const COMPLETION_DEADLINE: Duration = Duration::from_secs(60);

/// Lines of each stream shown in panic messages.
const TAIL_LINES: usize = 80;

/// A running `space` (or any other) binary, killed with `SIGKILL` and reaped on drop.
#[derive(Debug)]
pub struct SpaceProcess {
    child: Child,
    exited: Option<ExitStatus>,
    output: OutputFiles,
    program: PathBuf,
    // Holds the log files; removed on drop.
    dir: tempfile::TempDir,
}

impl SpaceProcess {
    /// Spawns `bin args…` with stdout and stderr captured to files in a fresh temp dir.
    /// Panics if the binary cannot be started.
    pub fn spawn<I, S>(bin: impl AsRef<Path>, args: I) -> SpaceProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_env(bin, args, std::iter::empty::<(&str, &str)>())
    }

    /// Like [`SpaceProcess::spawn`], with extra environment variables for the child (they
    /// override inherited ones).
    pub fn spawn_with_env<I, S, E, K, V>(bin: impl AsRef<Path>, args: I, env: E) -> SpaceProcess
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let program = bin.as_ref().to_path_buf();
        let dir = crate::temp_dir();
        let output = OutputFiles::new(dir.path(), "space");
        let mut cmd = spawn::command(&program, args);
        cmd.env("NO_COLOR", "1").envs(env);
        output.attach(&mut cmd);
        let child =
            spawn::spawn(cmd).unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        SpaceProcess {
            child,
            exited: None,
            output,
            program,
            dir,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory holding the captured `space.stdout.log` and `space.stderr.log`.
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the process wrote so far, stdout then stderr, labelled.
    pub fn logs(&self) -> String {
        self.output.all()
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.output.stdout_text()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.output.stderr_text()
    }

    /// The last `lines` lines of stdout and of stderr, labelled.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.output.tail(lines)
    }

    /// The exit status if the process has exited (reaping it), without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Polls `GET http://{admin}/readyz` until it answers 200.
    ///
    /// Panics with the last observation and the log tail if the process exits first or
    /// [`READY_DEADLINE`] passes. Blocks the thread (see the crate docs).
    #[track_caller]
    pub fn wait_ready(&mut self, admin: SocketAddr) {
        let start = Instant::now();
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(status) = self.try_status() {
                self.fail_not_ready(admin, &format!("process exited with {status}"), &last);
            }
            match crate::http::get_blocking(admin, "/readyz") {
                Ok(response) if response.status == 200 => return,
                Ok(response) => last = format!("{} {}", response.status, response.text()),
                Err(e) => last = format!("error: {e}"),
            }
            if start.elapsed() >= READY_DEADLINE {
                self.fail_not_ready(
                    admin,
                    &format!("not ready within {READY_DEADLINE:?}"),
                    &last,
                );
            }
            std::thread::sleep(crate::POLL_INTERVAL);
        }
    }

    /// Async [`SpaceProcess::wait_ready`]: same checks, waiting with `tokio::time::sleep`.
    pub async fn wait_ready_async(&mut self, admin: SocketAddr) {
        let start = Instant::now();
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(status) = self.try_status() {
                self.fail_not_ready(admin, &format!("process exited with {status}"), &last);
            }
            let probe =
                tokio::task::spawn_blocking(move || crate::http::get_blocking(admin, "/readyz"))
                    .await
                    .expect("readiness probe task panicked");
            match probe {
                Ok(response) if response.status == 200 => return,
                Ok(response) => last = format!("{} {}", response.status, response.text()),
                Err(e) => last = format!("error: {e}"),
            }
            if start.elapsed() >= READY_DEADLINE {
                self.fail_not_ready(
                    admin,
                    &format!("not ready within {READY_DEADLINE:?}"),
                    &last,
                );
            }
            tokio::time::sleep(crate::POLL_INTERVAL).await;
        }
    }

    #[track_caller]
    fn fail_not_ready(&self, admin: SocketAddr, why: &str, last: &str) -> ! {
        panic!(
            "{} (pid {}): GET http://{admin}/readyz never answered 200: {why}; last observed: {last}\n{}",
            self.program.display(),
            self.pid(),
            self.output.tail(TAIL_LINES)
        )
    }

    /// Sends `sig` (e.g. [`SIGHUP`], [`SIGTERM`]) to the child with `kill(2)`.
    ///
    /// Panics, with the log tail, if the process has already exited.
    #[track_caller]
    pub fn signal(&mut self, sig: libc::c_int) {
        if let Some(status) = self.try_status() {
            panic!(
                "cannot send signal {sig} to {} (pid {}): it already exited with {status}\n{}",
                self.program.display(),
                self.pid(),
                self.output.tail(TAIL_LINES)
            );
        }
        spawn::send_signal(self.pid(), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) failed: {e}", self.pid()));
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with `SIGKILL` (if still running) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = spawn::kill_and_reap(&mut self.child);
        }
        self.exited
    }
}

impl Drop for SpaceProcess {
    fn drop(&mut self) {
        let was_running = self.try_status().is_none();
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "=== {} (pid {}, {}) output ===\n{}",
                self.program.display(),
                self.pid(),
                if was_running {
                    "killed by test-support on drop".to_string()
                } else {
                    format!("exited with {}", self.exited.expect("reaped"))
                },
                self.output.tail(TAIL_LINES)
            );
        }
    }
}

/// Runs `bin args…` to completion (stdin from /dev/null) and returns
/// `(status, stdout, stderr)`. For one-shot commands such as `space validate`.
///
/// Panics if the program cannot start, or kills it and panics with its output if it runs
/// longer than [`COMPLETION_DEADLINE`].
#[track_caller]
pub fn run_to_completion<I, S>(bin: impl AsRef<Path>, args: I) -> (ExitStatus, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut process = SpaceProcess::spawn(bin, args);
    match process.wait_exit(COMPLETION_DEADLINE) {
        Some(status) => (status, process.stdout(), process.stderr()),
        None => {
            process.kill();
            panic!(
                "{} did not finish within {COMPLETION_DEADLINE:?}; killed it\n{}",
                process.program.display(),
                process.logs()
            )
        }
    }
}
