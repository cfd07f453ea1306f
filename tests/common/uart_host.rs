//! The host end of a UART's backend socket for tests that stream counted lines through a
//! guest's tty: the guest writes `out 1`…`out K`, the host writes `in 1`…`in M` and then
//! `end M`, and each side checks that the other's lines arrive complete and in order.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the host side saw.
pub struct HostResult {
    /// Every byte read from the UART's backend socket.
    pub received: Vec<u8>,
    /// `in N` lines sent (1..=sent), followed by `end sent`.
    pub sent: u32,
    /// When the host had the guest's last line.
    pub all_out_at: Option<Instant>,
}

/// The host side of the UART: reads the guest's lines; once started ([`Host::start_sending`]),
/// writes `in N` every `in_period` until the guest's last line (`out {out_lines}`) arrived,
/// then `end M`, and reads on a little so surplus bytes would show.
pub struct Host {
    go: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Complete `out` lines received so far.
    lines: Arc<AtomicU32>,
    thread: JoinHandle<HostResult>,
}

impl Host {
    /// Serve the UART's backend socket `s` on a thread.
    pub fn spawn(mut s: UnixStream, out_lines: u32, in_period: Duration) -> Host {
        let go = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU32::new(0));
        let (go2, stop2, lines2) = (go.clone(), stop.clone(), lines.clone());
        let last_line = format!("out {out_lines}\n");
        let thread = std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_millis(5)))
                .expect("read timeout");
            s.set_write_timeout(Some(Duration::from_secs(5)))
                .expect("write timeout");
            let mut r = HostResult {
                received: Vec::new(),
                sent: 0,
                all_out_at: None,
            };
            let mut next_send = Instant::now();
            let mut buf = [0u8; 4096];
            loop {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(t) = r.all_out_at {
                    if t.elapsed() > Duration::from_millis(500) {
                        break;
                    }
                }
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = &buf[..n];
                        r.received.extend_from_slice(chunk);
                        let nl = chunk.iter().filter(|&&b| b == b'\n').count() as u32;
                        lines2.fetch_add(nl, Ordering::Relaxed);
                        if r.all_out_at.is_none() && r.received.ends_with(last_line.as_bytes()) {
                            r.all_out_at = Some(Instant::now());
                            s.write_all(format!("end {}\n", r.sent).as_bytes())
                                .expect("host: write end line");
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) => panic!("host: reading the UART backend socket: {e}"),
                }
                if go2.load(Ordering::Relaxed)
                    && r.all_out_at.is_none()
                    && Instant::now() >= next_send
                {
                    r.sent += 1;
                    s.write_all(format!("in {}\n", r.sent).as_bytes())
                        .expect("host: write an in line");
                    next_send += in_period;
                    if next_send < Instant::now() {
                        next_send = Instant::now() + in_period;
                    }
                }
            }
            r
        });
        Host {
            go,
            stop,
            lines,
            thread,
        }
    }

    /// Start the `in N` stream.
    pub fn start_sending(&self) {
        self.go.store(true, Ordering::Relaxed);
    }

    /// Complete lines received so far.
    pub fn lines(&self) -> u32 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Whether the thread is done (the exchange ended, or the socket closed).
    pub fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stop the thread and take what it saw.
    pub fn join(self) -> HostResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("host thread")
    }
}

/// The expected guest output: `out 1\n` … `out {out_lines}\n`.
pub fn expected_out(out_lines: u32) -> Vec<u8> {
    (1..=out_lines)
        .flat_map(|n| format!("out {n}\n").into_bytes())
        .collect()
}

/// Where `got` first departs from `out 1`…: the index and the line (a readable failure).
pub fn first_bad_line(got: &[u8], out_lines: u32) -> Option<(usize, String)> {
    let text = String::from_utf8_lossy(got);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let complete = text.ends_with('\n');
    if complete {
        lines.pop();
    }
    for (i, l) in lines.iter().enumerate() {
        if *l != format!("out {}", i + 1) {
            return Some((i, l.to_string()));
        }
    }
    if lines.len() != out_lines as usize || !complete {
        return Some((lines.len(), "<end of stream>".into()));
    }
    None
}
