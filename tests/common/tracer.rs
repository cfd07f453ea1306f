//! A `vfud trace --json` process between a test's client and a server, and its output.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running tracer, killed on drop. Its stdout (one JSON object per line) goes to a file.
pub struct Tracer {
    child: Child,
    /// Where clients connect.
    pub socket: PathBuf,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tracer {
    /// `vfud trace --json --listen TMP/trace.sock --connect SERVER` plus `extra` arguments.
    pub fn start(server: &Path, extra: &[&str]) -> Tracer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("trace.sock");
        let out = dir.path().join("trace.jsonl");
        let child = super::vfud_command(&["trace"])
            .args(["--json", "--listen"])
            .arg(&socket)
            .arg("--connect")
            .arg(server)
            .args(extra)
            .stdout(std::fs::File::create(&out).expect("trace output file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vfud trace");
        assert!(
            super::wait_for_path(&socket, Duration::from_secs(10)),
            "vfud trace did not create {}",
            socket.display()
        );
        Tracer {
            child,
            socket,
            out,
            _dir: dir,
        }
    }

    /// Every line printed so far, parsed.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Wait until a record satisfies `pred` (the tracer prints asynchronously); returns all.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        for _ in 0..500 {
            let r = self.records();
            if r.iter().any(&pred) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("trace never showed {what}:\n{}", self.text());
    }

    /// The raw output, for failure messages.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command names of `records`' messages (not connection events) going `dir`
/// (`c2s`/`s2c`) with `type` `kind` (`command`, `reply`, `error`).
pub fn names(records: &[Value], dir: &str, kind: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["dir"] == dir && r["type"] == kind)
        .filter_map(|r| r["cmd"].as_str().map(str::to_string))
        .collect()
}
