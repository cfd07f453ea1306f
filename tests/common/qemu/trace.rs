//! QEMU's vfio-user trace events: request/reply round trips as QEMU saw them.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// QEMU arguments that make the trace log (see [`QemuOpts::trace`]) timestamp every line
/// (`2026-01-02T03:04:05.123456Z event …`, wall-clock UTC), for [`vfio_user_round_trips`].
pub const TRACE_TIMESTAMPS: [&str; 2] = ["-msg", "timestamp=on"];

/// Trace events (for [`QemuOpts::trace`]) that [`vfio_user_round_trips`] needs: QEMU's send of
/// each vfio-user message and the header of each message it receives.
pub const VFIO_USER_ROUND_TRIP_EVENTS: [&str; 2] = ["vfio_user_send_write", "vfio_user_recv_hdr"];

/// One request QEMU sent to a vfio-user server and the reply it got, as QEMU saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioUserRoundTrip {
    /// Message id.
    pub id: u32,
    /// When QEMU sent the request (Unix time, ns).
    pub sent_ns: u64,
    /// When QEMU received the reply's header (Unix time, ns).
    pub replied_ns: u64,
}

impl VfioUserRoundTrip {
    /// How long QEMU waited for the reply.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.replied_ns.saturating_sub(self.sent_ns))
    }

    /// Whether QEMU was waiting for this reply at some moment in `[from_ns, to_ns]`.
    pub fn overlaps(&self, from_ns: u64, to_ns: u64) -> bool {
        self.sent_ns <= to_ns && self.replied_ns >= from_ns
    }
}

/// Requests and their replies, in order, from a trace log recorded with
/// [`VFIO_USER_ROUND_TRIP_EVENTS`] and [`TRACE_TIMESTAMPS`] (QEMU 11.1's
/// `vfio_user_send_write  id 0x1d1 wrote 0x24` and
/// `vfio_user_recv_hdr  (unix:PATH) id 0x1d1 cmd 0x8 size 0x10 flags 0x1`; flag bit 0 marks a
/// reply). Requests without a reply in the log are left out.
pub fn vfio_user_round_trips(trace: &str) -> Vec<VfioUserRoundTrip> {
    let mut sent: HashMap<u32, u64> = HashMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        let mut words = line.split_whitespace();
        let (Some(ts), Some(event)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(t) = parse_utc_ns(ts) else {
            continue;
        };
        let rest: Vec<&str> = words.collect();
        let field = |name: &str| -> Option<u32> {
            let i = rest.iter().position(|w| *w == name)?;
            u32::from_str_radix(rest.get(i + 1)?.trim_start_matches("0x"), 16).ok()
        };
        match (event, field("id")) {
            ("vfio_user_send_write", Some(id)) => {
                sent.insert(id, t);
            }
            ("vfio_user_recv_hdr", Some(id)) if field("flags").is_some_and(|f| f & 1 != 0) => {
                if let Some(s) = sent.remove(&id) {
                    out.push(VfioUserRoundTrip {
                        id,
                        sent_ns: s,
                        replied_ns: t,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (QEMU's `-msg timestamp=on`) as Unix time in ns.
pub fn parse_utc_ns(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac_ns: i64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000_000 + frac_ns).ok()
}

/// Now, as Unix time in ns: the clock of the trace's timestamps, so a test can tell which
/// round trips overlapped something it did ([`VfioUserRoundTrip::overlaps`]).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
