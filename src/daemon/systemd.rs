//! systemd's notification protocol: READY after the first pass, RELOADING
//! and STOPPING, WATCHDOG pings. Outside systemd (no NOTIFY_SOCKET) every
//! call does nothing. It never decides when: the loop calls it at its
//! moments.

use std::time::Duration;

use sd_notify::NotifyState;

pub(crate) fn ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

/// systemd 253+ also wants the monotonic time of the reload request.
pub(crate) fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => {
            let _ = sd_notify::notify(&[NotifyState::Reloading, now]);
        }
        Err(_) => {
            let _ = sd_notify::notify(&[NotifyState::Reloading]);
        }
    }
}

pub(crate) fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

pub(crate) fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// How often the loop proves it is alive: half the watchdog interval when
/// systemd set one, else every 10 s (for `/healthz`).
pub(crate) fn heartbeat_interval() -> Duration {
    sd_notify::watchdog_enabled().map_or(Duration::from_secs(10), |w| (w / 2).max(Duration::from_millis(500)))
}
