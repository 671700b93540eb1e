//! OS processes the platform owns: started in a process group of their own (so a Ctrl-C in the
//! controller's terminal does not reach them), recorded in pid files with their start time (so
//! a restarted controller adopts exactly its own processes and never a recycled pid), and
//! stopped with SIGTERM, then SIGKILL after a grace.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde::{Deserialize, Serialize};

/// What a pid file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidRecord {
    /// The process id.
    pub pid: u32,
    /// The port it serves on.
    pub port: u16,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid,
    /// it names one process for good.
    pub start_ticks: u64,
}

/// A process's state letter and start time, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name is in parentheses and may hold anything; fields follow the last ')'
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // field 3 was the state; field 22 is the start time
    let ticks = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, ticks))
}

/// The start time of a live (not zombie) process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    match stat(pid)? {
        ('Z' | 'X', _) => None,
        (_, ticks) => Some(ticks),
    }
}

/// Whether the process `rec` names still runs.
pub fn alive(rec: &PidRecord) -> bool {
    start_ticks(rec.pid) == Some(rec.start_ticks)
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_owned(),
    )
}

/// Sends `sig` to `pid`; false if there is no such process.
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and has no memory effects on this process.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Sends `sig` to the process group `pid` leads (an instance and anything it started).
pub fn signal_group(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and has no memory effects on this process.
    unsafe { libc::kill(-pid, sig) == 0 }
}

/// Starts `argv` with `env` added, in `cwd`, its output appended to `log`, in a process group
/// of its own.
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    log: &Path,
) -> std::io::Result<Child> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command",
        ));
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader (or a crash)
/// never sees half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Holds an exclusive lock on a file for as long as it lives (released by the kernel when the
/// process dies, however it dies).
#[derive(Debug)]
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Takes the lock on `path` without waiting; `Ok(None)` if another process holds it.
    pub fn try_take(path: &Path) -> std::io::Result<Option<Self>> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            Ok(Some(Self { _file: file }))
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_named_by_its_pid_and_start_time() {
        let dir = std::env::temp_dir().join(format!("tai-proc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut child = spawn(
            &["sleep".into(), "30".into()],
            &[],
            &dir,
            &dir.join("sleep.log"),
        )
        .expect("sleep runs");
        let pid = child.id();
        let ticks = start_ticks(pid).expect("running");
        let rec = PidRecord {
            pid,
            port: 1,
            start_ticks: ticks,
        };
        assert!(alive(&rec));
        // the start time is the fork's; the command line is the exec's, a moment later
        let mut seen = String::new();
        for _ in 0..200 {
            seen = cmdline(pid).unwrap_or_default();
            if seen.starts_with("sleep 30") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(seen.starts_with("sleep 30"), "{seen}");
        assert_eq!(start_ticks(pid), Some(ticks));
        // the same pid with another start time is another process
        assert!(!alive(&PidRecord {
            start_ticks: ticks + 1,
            ..rec
        }));
        assert!(signal(pid, libc::SIGKILL));
        let _ = child.wait();
        assert!(!alive(&rec));
        let lock = dir.join("lock");
        let held = FileLock::try_take(&lock).expect("io").expect("free");
        let again = std::fs::OpenOptions::new()
            .write(true)
            .open(&lock)
            .expect("open");
        // a second description of the same file cannot take it while the first holds it
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this test owns
        let rc = unsafe { libc::flock(again.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(rc, 0);
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
