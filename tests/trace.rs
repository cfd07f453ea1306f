//! `vfud trace` between a protocol client and `vfud serve --device dma-engine`: every message
//! and fd is forwarded (DMA through fds both ways, MSI-X eventfds, server-to-client
//! DMA_READ/DMA_WRITE), each is printed decoded with reply latency and errno names, malformed
//! messages are shown as such and still forwarded, and a broken stream is passed on raw.

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use common::dma_engine::{r, run_op, w, VecMemory};
use common::tracer::{names, Tracer};
use common::{eventfd, memfd, wait_eventfd, Vfud};
use nix::errno::Errno;
use serde_json::Value;
use vfud_devices::dma_engine::{reg, Opcode, CONTROL_IRQ_ENABLE, STATUS_DONE};
use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::{Client, ProtocolError};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const RAM_IOVA: u64 = 0x1_0000_0000;
const SOCKET_RAM_IOVA: u64 = 0x4000_0000;

fn first<'a>(recs: &'a [Value], dir: &str, cmd: &str, kind: &str) -> &'a Value {
    recs.iter()
        .find(|r| r["dir"] == dir && r["cmd"] == cmd && r["type"] == kind)
        .unwrap_or_else(|| panic!("no {dir} {cmd} {kind} in the trace"))
}

#[test]
fn tracer_forwards_everything_and_prints_it_decoded() {
    let v = Vfud::start("dma-engine", &[]);
    let t = Tracer::start(&v.socket, &[]);
    let mut c = Client::connect_negotiated(&t.socket).expect("negotiate through the tracer");

    // Client → server fd: guest RAM as a memfd; the device computes a CRC over it.
    let ram = memfd(1 << 20);
    ram.write_at(b"through the tracer", 0).unwrap();
    c.dma_map(RW, 0, RAM_IOVA, 1 << 20, Some(ram.as_fd()))
        .unwrap();
    let s = run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 18, 0);
    assert_eq!(s & STATUS_DONE, STATUS_DONE);
    assert_eq!(
        r(&mut c, reg::RESULT),
        crc32fast::hash(b"through the tracer")
    );

    // Client → server eventfds, and the interrupt they carry.
    let fds: Vec<_> = (0..4).map(|_| eventfd()).collect();
    let b: Vec<_> = fds.iter().map(|e| e.as_fd()).collect();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &b).unwrap();
    w(&mut c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    w(&mut c, reg::IRQ_VECTOR, 1);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(
        wait_eventfd(&fds[1], 2000),
        1,
        "MSI-X vector 1 through the tracer"
    );

    // Server → client fd: BAR2's mmap fd reaches the client and aliases the region.
    let (bar2, fd) = c.region_info(2).unwrap();
    let bar2_fd = File::from(fd.expect("BAR2 comes with an fd"));
    bar2_fd.write_at(&[0xab, 0xcd], bar2.info.offset).unwrap();
    assert_eq!(c.region_read(2, 0, 2).unwrap(), vec![0xab, 0xcd]);

    // Server → client commands: memory without an fd, reached with DMA_READ/DMA_WRITE.
    let mem = Arc::new(Mutex::new(vec![0u8; 1 << 16]));
    c.set_dma_handler(Box::new(VecMemory(mem.clone(), SOCKET_RAM_IOVA)));
    c.dma_map(RW, 0, SOCKET_RAM_IOVA, 1 << 16, None).unwrap();
    run_op(&mut c, Opcode::Fill, 0, SOCKET_RAM_IOVA, 64, 0x5a);
    assert!(mem.lock().unwrap()[..64].iter().all(|b| *b == 0x5a));

    // Malformed payload: a 3-byte REGION_READ. vfud answers EINVAL through the tracer.
    match c.request_raw(Command::RegionRead as u16, &[1, 2, 3], &[]) {
        Err(ProtocolError::Remote(e)) => assert_eq!(e, Errno::EINVAL),
        other => panic!("expected EINVAL, got {other:?}"),
    }
    // Then a header that cannot be framed (msg_size 8): forwarded raw, vfud drops the client.
    let mut bad = [0u8; 16];
    bad[0] = 0x77;
    bad[2] = 9;
    bad[4] = 8;
    c.send_raw(&bad, &[]).unwrap();
    assert!(
        matches!(c.recv_frame(), Err(ProtocolError::Disconnected)),
        "vfud should drop a client whose stream cannot be framed"
    );

    let recs = t.wait_for("the connection closing", |r| r["event"] == "closed");
    let text = t.text();
    let c2s = names(&recs, "c2s", "command");
    assert_eq!(&c2s[..3], ["VERSION", "DMA_MAP", "REGION_WRITE"], "{text}");
    // Every command the client sent was answered, each reply with its latency.
    let replies: Vec<&Value> = recs
        .iter()
        .filter(|r| r["dir"] == "s2c" && (r["type"] == "reply" || r["type"] == "error"))
        .collect();
    assert_eq!(replies.len(), c2s.len(), "{text}");
    assert!(replies.iter().all(|r| r["latency_us"].is_u64()), "{text}");

    let version = first(&recs, "s2c", "VERSION", "reply");
    assert_eq!(version["fields"]["caps"]["max_msg_fds"], 16, "{text}");
    let map = first(&recs, "c2s", "DMA_MAP", "command");
    assert_eq!(map["fields"]["iova"], "0x100000000", "{text}");
    assert_eq!(map["fields"]["fd_backed"], true, "{text}");
    assert_eq!(map["fields"]["fds"], 1, "{text}");
    let irqs = first(&recs, "c2s", "DEVICE_SET_IRQS", "command");
    assert_eq!(irqs["fields"]["irq"], "MSI-X", "{text}");
    assert_eq!(irqs["fields"]["count"], 4, "{text}");
    assert_eq!(irqs["fields"]["fds"], 4, "{text}");
    let info2 = recs
        .iter()
        .find(|r| {
            r["cmd"] == "DEVICE_GET_REGION_INFO"
                && r["type"] == "reply"
                && r["fields"]["region"] == "BAR2"
                && r["fields"]["fds"] == 1
        })
        .unwrap_or_else(|| panic!("no BAR2 info reply with its fd: {text}"));
    assert_eq!(info2["fields"]["size"], "0x100000", "{text}");
    let read = first(&recs, "c2s", "REGION_READ", "command");
    assert!(
        read["fields"]["offset"].is_string() && read["fields"]["count"].is_u64(),
        "{text}"
    );
    // The server's own commands and the client's replies to them.
    let dma_write = first(&recs, "s2c", "DMA_WRITE", "command");
    assert_eq!(dma_write["fields"]["iova"], "0x40000000", "{text}");
    assert_eq!(dma_write["fields"]["count"], 64, "{text}");
    assert!(
        first(&recs, "c2s", "DMA_WRITE", "reply")["latency_us"].is_u64(),
        "{text}"
    );
    // The malformed REGION_READ, and vfud's answer with the errno's name.
    let bad_read = recs
        .iter()
        .find(|r| r["cmd"] == "REGION_READ" && r["size"] == 19)
        .unwrap_or_else(|| panic!("no 3-byte REGION_READ: {text}"));
    assert!(
        bad_read["malformed"]
            .as_str()
            .is_some_and(|m| m.contains("REGION_READ")),
        "{text}"
    );
    let err = first(&recs, "s2c", "REGION_READ", "error");
    assert_eq!(err["error"], "EINVAL (Invalid argument)", "{text}");
    assert_eq!(err["id"], bad_read["id"], "{text}");
    // The unframeable header, passed on byte for byte.
    let broken = recs
        .iter()
        .find(|r| r["event"] == "malformed-stream")
        .unwrap_or_else(|| panic!("no malformed-stream event: {text}"));
    assert_eq!(broken["dir"], "c2s");
    assert_eq!(broken["detail"]["bytes"], 16);
    assert_eq!(broken["detail"]["head"], "77000900080000000000000000000000");
}

#[test]
fn filter_limits_the_output_not_the_forwarding() {
    let v = Vfud::start("dma-engine", &[]);
    let t = Tracer::start(&v.socket, &["--filter", "region_read,GET_IRQ_INFO"]);
    let mut c = Client::connect_negotiated(&t.socket).expect("negotiate through the tracer");
    assert_eq!(r(&mut c, reg::ID), vfud_devices::dma_engine::ID);
    c.irq_info(IRQ_INDEX_MSIX).unwrap();
    drop(c);
    let recs = t.wait_for("the connection closing", |r| r["event"] == "closed");
    let shown: Vec<&str> = recs.iter().filter_map(|r| r["cmd"].as_str()).collect();
    assert_eq!(
        shown,
        [
            "REGION_READ",
            "REGION_READ",
            "DEVICE_GET_IRQ_INFO",
            "DEVICE_GET_IRQ_INFO"
        ],
        "{}",
        t.text()
    );
}

/// The DEVICE_FEATURE MIG_DEVICE_STATE SETs a trace shows, in order.
fn states_set(recs: &[Value]) -> Vec<String> {
    recs.iter()
        .filter(|r| {
            r["dir"] == "c2s"
                && r["cmd"] == "DEVICE_FEATURE"
                && r["fields"]["feature"] == "MIG_DEVICE_STATE"
                && r["fields"]["op"] == "SET"
        })
        .filter_map(|r| r["fields"]["state"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_migration_through_two_tracers_shows_features_and_migration_data() {
    let a = Vfud::start("dma-engine", &[]);
    let b = Vfud::start("dma-engine", &[]);
    let ta = Tracer::start(&a.socket, &[]);
    let tb = Tracer::start(&b.socket, &[]);
    let out = std::process::Command::new(common::vfud_bin())
        .args(["migrate", "--json", "--ram-mib", "1", "--from"])
        .arg(&ta.socket)
        .arg("--to")
        .arg(&tb.socket)
        .output()
        .expect("run vfud migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = ta.wait_for("the source closing", |r| r["event"] == "closed");
    let dst = tb.wait_for("the destination closing", |r| r["event"] == "closed");
    let (st, dt) = (ta.text(), tb.text());

    let flags = src
        .iter()
        .find(|r| r["type"] == "reply" && r["fields"]["feature"] == "MIGRATION")
        .unwrap_or_else(|| panic!("no MIGRATION feature reply: {st}"));
    assert!(
        flags["fields"]["migration_flags"]
            .as_str()
            .is_some_and(|f| f.contains("STOP_COPY")),
        "{st}"
    );
    let s = states_set(&src);
    assert!(s.contains(&"STOP_COPY".to_string()), "source states {s:?}");
    let d = states_set(&dst);
    assert_eq!(d.first().map(String::as_str), Some("RESUMING"), "{dt}");
    assert_eq!(d.last().map(String::as_str), Some("RUNNING"), "{dt}");
    let read_bytes: u64 = src
        .iter()
        .filter(|r| r["cmd"] == "MIG_DATA_READ" && r["type"] == "reply")
        .filter_map(|r| r["fields"]["size"].as_u64())
        .sum();
    let written: u64 = dst
        .iter()
        .filter(|r| r["cmd"] == "MIG_DATA_WRITE" && r["type"] == "command")
        .filter_map(|r| r["fields"]["size"].as_u64())
        .sum();
    assert!(read_bytes > 0, "{st}");
    assert_eq!(
        read_bytes, written,
        "what the source gave is what the destination got"
    );
}
