//! What the tracer prints: one line per message (text or JSON), reply latencies, the filter.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use serde_json::{json, Map, Value};
use vfud_protocol::Command;

use super::decode::{command_name, Decoded, Dir, Kind};

/// Parse `--filter` entries: spec names with or without the `VFIO_USER_` prefix, any case, or
/// command numbers. Unknown names are an error so a typo does not silently hide everything.
pub fn parse_filter(items: &[String]) -> Result<Option<HashSet<u16>>, String> {
    if items.is_empty() {
        return Ok(None);
    }
    let mut set = HashSet::new();
    for raw in items {
        let want = raw.trim().to_ascii_uppercase();
        let want = want.strip_prefix("VFIO_USER_").unwrap_or(&want);
        if let Ok(n) = want.parse::<u16>() {
            set.insert(n);
            continue;
        }
        let found = Command::ALL.iter().find(|c| {
            let name = command_name(**c as u16);
            name == want || name.strip_prefix("DEVICE_") == Some(want)
        });
        match found {
            Some(c) => set.insert(*c as u16),
            None => return Err(format!("unknown command {raw:?} in --filter")),
        };
    }
    Ok(Some(set))
}

/// Shared by a connection's two directions: requests awaiting replies (for latency) and the
/// output stream.
pub struct Printer {
    json: bool,
    filter: Option<HashSet<u16>>,
    out: Mutex<Box<dyn Write + Send>>,
    /// Outstanding commands by (direction they went, id), oldest first: ids may repeat.
    pending: Mutex<HashMap<(u64, Dir, u16), VecDeque<Instant>>>,
}

/// One observed message, ready to print.
pub struct Event<'a> {
    /// Connection number (1 for the first client).
    pub conn: u64,
    /// Direction.
    pub dir: Dir,
    /// Header id.
    pub id: u16,
    /// Header command number.
    pub cmd: u16,
    /// Whole message size.
    pub size: u32,
    /// What the decoder made of it.
    pub decoded: &'a Decoded,
}

fn wall_clock() -> (f64, String) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let text = format!(
        "{:02}:{:02}:{:02}.{:06}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        d.subsec_micros()
    );
    (d.as_secs_f64(), text)
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Printer {
    /// A printer writing to `out`.
    pub fn new(json: bool, filter: Option<HashSet<u16>>, out: Box<dyn Write + Send>) -> Self {
        Self {
            json,
            filter,
            out: Mutex::new(out),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Note a message and print it (unless filtered out). Returns nothing: printing failures
    /// (a closed stdout) must not stop forwarding.
    pub fn message(&self, ev: &Event<'_>) {
        let latency = self.track(ev);
        if self.filter.as_ref().is_some_and(|f| !f.contains(&ev.cmd)) {
            return;
        }
        let d = ev.decoded;
        let (t, clock) = wall_clock();
        let (kind, errno) = match d.kind {
            Kind::Command { no_reply: false } => ("command", None),
            Kind::Command { no_reply: true } => ("command-noreply", None),
            Kind::Reply => ("reply", None),
            Kind::Error(e) => ("error", Some(e)),
            Kind::BadType => ("bad-type", None),
        };
        let line = if self.json {
            let mut o = Map::new();
            o.insert("t".into(), json!(t));
            o.insert("conn".into(), json!(ev.conn));
            o.insert(
                "dir".into(),
                json!(match ev.dir {
                    Dir::ClientToServer => "c2s",
                    Dir::ServerToClient => "s2c",
                }),
            );
            o.insert("id".into(), json!(ev.id));
            o.insert("cmd".into(), json!(d.name));
            o.insert("cmd_no".into(), json!(ev.cmd));
            o.insert("type".into(), json!(kind));
            o.insert("size".into(), json!(ev.size));
            if let Some(e) = errno {
                o.insert("errno".into(), json!(e));
                o.insert("error".into(), json!(errno_name(e)));
            }
            if let Some(us) = latency {
                o.insert("latency_us".into(), json!(us));
            }
            let fields: Map<String, Value> = d
                .fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            o.insert("fields".into(), Value::Object(fields));
            if let Some(p) = &d.problem {
                o.insert("malformed".into(), json!(p));
            }
            Value::Object(o).to_string()
        } else {
            let mut s = format!(
                "{clock} #{} {} id={} {}",
                ev.conn,
                ev.dir.arrow(),
                ev.id,
                d.name
            );
            match d.kind {
                Kind::Command { no_reply: true } => s.push_str(" (no reply)"),
                Kind::Command { .. } => {}
                Kind::Reply => s.push_str(" reply"),
                Kind::Error(e) => s.push_str(&format!(" ERROR {}", errno_name(e))),
                Kind::BadType => s.push_str(" (bad message type)"),
            }
            if let Some(us) = latency {
                s.push_str(&format!(" +{us}us"));
            }
            for (k, v) in &d.fields {
                s.push_str(&format!(" {k}={}", value_text(v)));
            }
            if let Some(p) = &d.problem {
                s.push_str(&format!(" MALFORMED: {p} ({} bytes, forwarded)", ev.size));
            }
            s
        };
        self.line(&line);
    }

    /// Print a connection-level event (open, close, unframed bytes); never filtered.
    pub fn note(&self, conn: u64, dir: Option<Dir>, what: &str, detail: Value) {
        let (t, clock) = wall_clock();
        let line = if self.json {
            let mut o = json!({ "t": t, "conn": conn, "event": what, "detail": detail });
            if let Some(d) = dir {
                o["dir"] = json!(match d {
                    Dir::ClientToServer => "c2s",
                    Dir::ServerToClient => "s2c",
                });
            }
            o.to_string()
        } else {
            let arrow = dir.map(|d| format!(" {}", d.arrow())).unwrap_or_default();
            format!("{clock} #{conn}{arrow} -- {what} {}", value_text(&detail))
        };
        self.line(&line);
    }

    fn line(&self, line: &str) {
        if let Ok(mut o) = self.out.lock() {
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
    }

    /// Record a command, or match a reply to its command: the reply's latency in µs.
    fn track(&self, ev: &Event<'_>) -> Option<u64> {
        let mut p = self.pending.lock().ok()?;
        match ev.decoded.kind {
            Kind::Command { no_reply: false } => {
                p.entry((ev.conn, ev.dir, ev.id))
                    .or_default()
                    .push_back(Instant::now());
                None
            }
            Kind::Reply | Kind::Error(_) => {
                let key = (ev.conn, ev.dir.reverse(), ev.id);
                let q = p.get_mut(&key)?;
                let sent = q.pop_front();
                if q.is_empty() {
                    p.remove(&key);
                }
                sent.map(|s| s.elapsed().as_micros() as u64)
            }
            _ => None,
        }
    }

    /// Forget a closed connection's outstanding commands.
    pub fn forget(&self, conn: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.retain(|(c, _, _), _| *c != conn);
        }
    }
}

/// `EINVAL (Invalid argument)` for an errno number.
pub fn errno_name(e: u32) -> String {
    let n = Errno::from_raw(e as i32);
    if n == Errno::UnknownErrno {
        format!("errno {e}")
    } else {
        format!("{n:?} ({})", n.desc())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_takes_names_in_any_spelling_and_numbers() {
        let f = parse_filter(&[
            "region_read".into(),
            "VFIO_USER_DMA_MAP".into(),
            "GET_REGION_INFO".into(),
            "17".into(),
        ])
        .expect("parse")
        .expect("some");
        let mut v: Vec<u16> = f.into_iter().collect();
        v.sort();
        assert_eq!(v, vec![2, 5, 9, 17]);
        assert!(parse_filter(&["REGION_REED".into()]).is_err());
    }

    #[test]
    fn errno_names_carry_the_symbol_and_text() {
        assert_eq!(errno_name(22), "EINVAL (Invalid argument)");
    }
}
