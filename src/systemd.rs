//! The systemd notification protocol (`sd_notify`), for `Type=notify`
//! units: one datagram per state change to the socket named by
//! `$NOTIFY_SOCKET`. Without that variable (not started by systemd) every
//! call does nothing.
//!
//! The protocol is a few `KEY=value` lines in one datagram, so it is
//! written here on a plain [`UnixDatagram`] rather than with a crate.

use std::os::unix::net::UnixDatagram;

/// The service is ready: sent once the request consumer first consumes,
/// and after each reload.
pub const READY: &str = "READY=1";
/// The service is stopping: sent when the shutdown begins.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` to the service manager. Returns whether it was sent; a
/// failure is logged and otherwise ignored, since a missed notification
/// must not stop the daemon (systemd then times the unit out and says so).
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return false;
    };
    match send(&socket, state) {
        Ok(()) => {
            tracing::debug!(state, "notified the service manager");
            true
        }
        Err(e) => {
            tracing::warn!(cause = %e, state, "cannot notify the service manager");
            false
        }
    }
}

/// The reload has begun. `MONOTONIC_USEC` is what systemd 253 and later
/// require with `RELOADING=1` (`Type=notify-reload`); older versions
/// ignore it.
pub fn reloading() -> bool {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"))
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    // A leading '@' names a socket in the abstract namespace (Linux).
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(socket))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), READY).expect("sent");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("volumed-test-{}", uuid::Uuid::new_v4().simple());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(std::ffi::OsStr::new(&format!("@{name}")), STOPPING).expect("sent");
        let n = rx.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
