//! `vfud bench --only nvme-doorbell` runs and yields sane rows: a host-side NVMe driver over
//! the vfud client completes Reads with the doorbell page mmap'd and trapped. Figures are not
//! judged (no timing thresholds in tests); they must only be real latencies.

mod common;

use std::time::Duration;

#[test]
fn nvme_doorbell_scenario_yields_rows_for_both_doorbell_kinds() {
    let out = common::run_vfud(
        &["bench", "--only", "nvme-doorbell", "--json", "--no-pin"],
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "vfud bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    let rows = v["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r["scenario"].as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with("nvme-doorbell ")),
        "{names:?}"
    );
    for r in rows {
        let (m, t) = (r["vfud"].as_f64().unwrap(), r["baseline"].as_f64().unwrap());
        // Microseconds (from doorbell to interrupt, or of server CPU per read): positive, and
        // below a second.
        assert!(m > 0.0 && m < 1e6 && t > 0.0 && t < 1e6, "{r}");
        assert_eq!(r["unit"], "us");
        assert!(r["ratio"].as_f64().unwrap().is_finite());
    }
}
