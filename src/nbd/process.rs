//! The NBD server process: found by its pidfile, started in the background
//! when volumed manages it, stopped on request, and inspected through /proc
//! (its connection children, the files it holds open).
//!
//! Both servers daemonise and write their pidfile, so the same code handles
//! both. A server that volumed started survives a crash of volumed and is
//! adopted at the next start instead of being restarted, which keeps client
//! connections alive across a daemon crash.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct ServerProcess {
    pub pidfile: PathBuf,
    /// The executable name, to tell our server from a recycled pid.
    pub program: &'static str,
}

impl ServerProcess {
    /// The pid of the running server, if the pidfile names a live process
    /// running `program`.
    pub fn pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(&self.pidfile).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        if pid <= 1 {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The state follows the parenthesised command name; a zombie is dead.
        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv0 = cmdline.split(|b| *b == 0).next()?;
        let name = Path::new(std::str::from_utf8(argv0).ok()?).file_name()?;
        (name == self.program).then(|| Pid::from_raw(pid))
    }

    /// Starts the server with `cmd` (which must daemonise and write the
    /// pidfile) and waits until the pidfile names a live process.
    pub async fn start(&self, mut cmd: Command, timeout: Duration) -> Result<Pid> {
        let _ = std::fs::remove_file(&self.pidfile);
        let output = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .output();
        // The launcher returns once the server has daemonised.
        let out = tokio::time::timeout(timeout, output)
            .await
            .with_context(|| format!("{} did not daemonise within {timeout:?}", self.program))?
            .with_context(|| format!("cannot run {}", self.program))?;
        if !out.status.success() {
            bail!(
                "{} failed to start ({}): {}",
                self.program,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = self.pid() {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} started but {} names no live process: {}",
                    self.program,
                    self.pidfile.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) {
        let Some(pid) = self.pid() else { return };
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.pid().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.pid().is_some() {
            let _ = kill(pid, Signal::SIGKILL);
            for child in children(pid) {
                let _ = kill(child, Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// Direct children of `pid` (nbd-server forks one per client connection).
pub fn children(pid: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| parent_of(*p) == Some(pid.as_raw()))
        .map(Pid::from_raw)
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid`, or with `children` one of its child processes, holds
/// `target` open (a client is connected to an export of that device).
pub fn holds_open(pid: Pid, target: &Path, children_too: bool) -> bool {
    process_holds(pid, target)
        || (children_too && children(pid).into_iter().any(|p| process_holds(p, target)))
}

fn process_holds(pid: Pid, target: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|p| p == target)
}
