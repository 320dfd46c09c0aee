//! Service manager notifications, the `sd_notify(3)` protocol: a service started with
//! `Type=notify` or `Type=notify-reload` finds a datagram socket's address in `NOTIFY_SOCKET` and
//! reports its state there as `KEY=VALUE` lines. tcptap sends:
//! - `READY=1` once every listener is bound (clients that connect from then on are served);
//! - `RELOADING=1` with `MONOTONIC_USEC` when a SIGHUP starts a reload, and `READY=1` when the
//!   reloads it started have been applied by every event loop, or rejected (with a `STATUS=`);
//! - `STOPPING=1` when a graceful shutdown starts;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC` (`WatchdogSec=` in the unit) while every event loop
//!   is turning, so that systemd restarts a proxy whose loop hangs (see [`watchdog`]).
//!
//! Without `NOTIFY_SOCKET` nothing is sent. A failed send is logged at debug level and otherwise
//! ignored: the service manager's view is never worth stopping or slowing the proxy for.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

use log::debug;

/// The socket from `NOTIFY_SOCKET`, read once.
#[derive(Debug)]
struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();

fn notifier() -> Option<&'static Notifier> {
    NOTIFIER
        .get_or_init(|| {
            let value = std::env::var_os("NOTIFY_SOCKET")?;
            match open(&value) {
                Ok(n) => Some(n),
                Err(e) => {
                    log::warn!(
                        "NOTIFY_SOCKET={}: cannot notify the service manager: {e}",
                        value.to_string_lossy()
                    );
                    None
                }
            }
        })
        .as_ref()
}

fn open(value: &std::ffi::OsStr) -> io::Result<Notifier> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    let addr = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(value)?,
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a socket path or an abstract socket name (`@name`)",
            ));
        }
    };
    Ok(Notifier {
        socket: UnixDatagram::unbound()?,
        addr,
    })
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) when started under a service manager that
/// asked for notifications.
pub fn send(state: &str) {
    if let Some(n) = notifier() {
        if let Err(e) = n.socket.send_to_addr(state.as_bytes(), &n.addr) {
            debug!("cannot notify the service manager ({state:?}): {e}");
        }
    }
}

/// The keep-alive period the service manager asked for (`WATCHDOG_USEC`, for this process if
/// `WATCHDOG_PID` names one), halved as `sd_watchdog_enabled(3)` advises; `None` without a
/// `NOTIFY_SOCKET` to send to, or a value that is not a positive number of microseconds.
pub fn watchdog() -> Option<std::time::Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
    .filter(|_| notifier().is_some())
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<std::time::Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(1)))
}

/// `RELOADING=1` with the time `Type=notify-reload` asks for.
pub fn reloading() {
    send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// `CLOCK_MONOTONIC` in microseconds, the clock of `MONOTONIC_USEC`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_watchdog_period_is_half_what_was_asked_for_this_process() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), half);
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), half);
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        for bad in ["", "0", "-5", "soon"] {
            assert_eq!(parse_watchdog(Some(bad), None, 7), None, "{bad:?}");
        }
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
        assert_eq!(
            parse_watchdog(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }
}
