//! Child-process plumbing shared by the helpers: finding a required program, spawning it so
//! that it dies with the test process, capturing its output to files, and checking which
//! process owns a listening port.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;

/// Finds `name` on `PATH` (or in `/usr/bin`, `/usr/local/bin`), or at the path in the
/// environment variable `override_var`; panics with `install_hint` if it is nowhere.
pub(crate) fn require_program(name: &str, override_var: &str, install_hint: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_var) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{override_var}={} is not a file; unset it or point it at `{name}` ({install_hint})",
            path.display()
        );
        return path;
    }
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = dirs
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new("/usr/bin"), Path::new("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate));
    found.unwrap_or_else(|| panic!("{name} not found: {install_hint}"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the kernel sends it `SIGKILL` when the test process exits, even if
/// the test binary is killed before any `Drop` runs.
///
/// Linux delivers the parent-death signal when the *thread* that forked exits, and the test
/// harness ends a thread per test; so every child is forked by one long-lived spawner thread.
pub(crate) fn spawn(mut cmd: Command) -> io::Result<Child> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("test-support-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .expect("spawner thread is gone");
    reply_rx.recv().expect("spawner thread is gone")
}

/// Sends `SIGKILL` to `child` (by its PID, via `Child::kill`) unless it already exited, then
/// reaps it so no zombie is left.
pub(crate) fn kill_and_reap(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Sends `sig` to the process `pid` with `libc::kill`.
pub(crate) fn send_signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child we spawned and
    // have not reaped, so it cannot have been reused by another process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Files that receive a child's stdout and stderr; appended to across restarts.
#[derive(Debug, Clone)]
pub(crate) struct OutputFiles {
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
}

impl OutputFiles {
    pub(crate) fn new(dir: &Path, stem: &str) -> Self {
        OutputFiles {
            stdout: dir.join(format!("{stem}.stdout.log")),
            stderr: dir.join(format!("{stem}.stderr.log")),
        }
    }

    /// Points `cmd`'s stdout and stderr at the files (append mode) and its stdin at /dev/null.
    pub(crate) fn attach(&self, cmd: &mut Command) {
        cmd.stdin(Stdio::null())
            .stdout(open_append(&self.stdout))
            .stderr(open_append(&self.stderr));
    }

    pub(crate) fn stdout_text(&self) -> String {
        read_lossy(&self.stdout)
    }

    pub(crate) fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// Both streams, labelled.
    pub(crate) fn all(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// The last `lines` lines of each stream, labelled.
    pub(crate) fn tail(&self, lines: usize) -> String {
        format!(
            "--- stdout (last {lines} lines) ---\n{}\n--- stderr (last {lines} lines) ---\n{}",
            last_lines(&self.stdout_text(), lines),
            last_lines(&self.stderr_text(), lines)
        )
    }
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", path.display()))
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command for `program` with `args`, its environment inherited.
pub(crate) fn command<I, S>(program: &Path, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// True if the process `pid` holds a TCP socket listening on `port` (IPv4 or IPv6).
///
/// Used after a "pick a free port, start the program" race: a server that lost the race
/// exits, but meanwhile another process may answer on the port; this tells them apart.
/// Waits until `child` itself listens on `port` and `probe` passes, within `deadline`.
/// `name` ("etcd") and `goal` ("healthy") word the errors: the child exited, is not
/// listening yet, or did not reach the goal in time, each with the last thing observed.
pub(crate) fn wait_child_ready(
    child: &mut Child,
    name: &str,
    port: u16,
    goal: &str,
    deadline: std::time::Duration,
    mut probe: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    let mut last = "no attempt yet".to_string();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{name} exited with {status}; last observed: {last}"
            ));
        }
        if pid_listens_on(child.id(), port) {
            match probe() {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        } else {
            last = format!("{name} not listening yet");
        }
        if start.elapsed() >= deadline {
            return Err(format!(
                "not {goal} within {deadline:?}; last observed: {last}"
            ));
        }
        std::thread::sleep(crate::POLL_INTERVAL);
    }
}

pub(crate) fn pid_listens_on(pid: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|target| {
                let target = target.to_string_lossy().into_owned();
                target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
            })
            .is_some_and(|inode| inodes.contains(&inode))
    })
}

/// Inodes of the sockets in state LISTEN on local `port`, from /proc/net/tcp{,6}.
fn listening_inodes(port: u16) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) && fields[3] == TCP_LISTEN {
                if let Ok(inode) = fields[9].parse() {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// The scheduler state letter (`R`, `S`, `T` = stopped, `Z`, …) of every thread of `pid`,
/// from /proc/<pid>/task/*/stat; empty if the process is gone.
pub(crate) fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        // The command name may contain spaces and parentheses: the state follows the last ')'.
        .filter_map(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .collect()
}
