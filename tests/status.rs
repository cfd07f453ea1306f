//! `vfud status --control CTL`: the report of a serving device over its control socket —
//! model, client, negotiated limits, migration state, DMA, interrupt mode, messages and
//! errors by command, uptime — as JSON and as text.

mod common;

use std::os::fd::AsFd;

use common::dma_engine::r;
use common::{eventfd, memfd, Vfud};
use nix::errno::Errno;
use vfud_devices::dma_engine::reg;
use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::ProtocolError;

fn status(ctl: &std::path::Path, json: bool) -> std::process::Output {
    let mut c = common::vfud_command(&["status"]);
    c.arg("--control").arg(ctl);
    if json {
        c.arg("--json");
    }
    c.output().expect("run vfud status")
}

#[test]
fn status_reports_the_session_and_counts_messages_by_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = dir.path().join("dev.ctl");
    let v = Vfud::start("dma-engine", &["--control", ctl.to_str().unwrap()]);

    let idle = status(&ctl, true);
    assert!(
        idle.status.success(),
        "{}",
        String::from_utf8_lossy(&idle.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&idle.stdout).expect("JSON");
    assert_eq!(s["client_connected"], false, "{s}");
    assert!(s["negotiated"].is_null(), "{s}");

    let mut c = v.client();
    let ram = memfd(2 << 20);
    c.dma_map(
        DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        0,
        0x1_0000_0000,
        2 << 20,
        Some(ram.as_fd()),
    )
    .unwrap();
    let fds: Vec<_> = (0..4).map(|_| eventfd()).collect();
    let b: Vec<_> = fds.iter().map(|e| e.as_fd()).collect();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &b).unwrap();
    for _ in 0..3 {
        r(&mut c, reg::STATUS);
    }
    match c.request_raw(Command::RegionRead as u16, &[0; 3], &[]) {
        Err(ProtocolError::Remote(e)) => assert_eq!(e, Errno::EINVAL),
        other => panic!("expected EINVAL, got {other:?}"),
    }

    let out = status(&ctl, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(s["model"], "dma-engine", "{s}");
    assert_eq!(s["client_connected"], true, "{s}");
    assert_eq!(s["clients_accepted"], 1, "{s}");
    assert_eq!(s["negotiated"]["max_msg_fds"], 16, "{s}");
    assert_eq!(s["negotiated"]["max_data_xfer_size"], 1 << 20, "{s}");
    assert_eq!(s["migration_state"], "Running", "{s}");
    assert_eq!(s["dma_maps"], 1, "{s}");
    assert_eq!(s["dma_bytes_mapped"], 2 << 20, "{s}");
    assert_eq!(s["dma_maps_fd_backed"], 1, "{s}");
    assert_eq!(s["irq_mode"], "MSI-X", "{s}");
    assert_eq!(s["messages"]["VERSION"]["served"], 1, "{s}");
    assert_eq!(s["messages"]["REGION_READ"]["served"], 4, "{s}");
    assert_eq!(s["messages"]["REGION_READ"]["errors"], 1, "{s}");
    assert_eq!(s["messages"]["DEVICE_SET_IRQS"]["errors"], 0, "{s}");
    assert_eq!(s["messages_total"], 7, "{s}");
    assert_eq!(s["errors_total"], 1, "{s}");
    assert!(s["uptime_s"].as_f64().is_some_and(|u| u > 0.0), "{s}");

    let text = status(&ctl, false);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("device      dma-engine"), "{text}");
    assert!(text.contains("client      connected"), "{text}");
    assert!(text.contains("interrupts  MSI-X"), "{text}");
    assert!(text.contains("messages    7 served, 1 errors"), "{text}");
}
