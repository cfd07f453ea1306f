//! The fuzz entry points (`vfud_server::fuzzing`, also behind the cargo-fuzz targets in
//! `fuzz/`) as property tests, so `cargo test` runs every fuzzed boundary on random and
//! structured inputs without nightly; plus the seed corpora in `fuzz/seeds/`, generated here
//! (`VFUD_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_props seeds` rewrites them) and checked in.

use std::path::PathBuf;

use proptest::prelude::*;
use vfud_protocol::header::{Command, Header, FLAG_NO_REPLY, FLAG_TYPE_REPLY};
use vfud_protocol::messages::dma::DmaMap;
use vfud_protocol::messages::feature::{
    DeviceFeature, DmaLoggingControl, DmaLoggingRange, DmaLoggingReport, MigDeviceState,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_MIG_DEVICE_STATE,
};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::messages::version::PROTOCOL_MAJOR;
use vfud_protocol::messages::{
    DeviceInfo, IrqAction, IrqData, MigData, MigState, RegionAccess, RegionInfo, Request, SetIrqs,
};
use vfud_protocol::wire::put;
use vfud_server::fuzzing;
use vfud_server::handover::kind;
use vfud_server::testing::{RamMode, TestBench};

fn dev() -> Box<dyn vfud_server::Device> {
    vfud_devices::create("dma-engine").expect("dma-engine")
}

fn frame(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        msg_id: id,
        cmd,
        msg_size: (16 + payload.len()) as u32,
        flags,
        error_no: 0,
    };
    let mut out = h.as_wire_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn request(id: u16, r: &Request) -> Vec<u8> {
    let (p, _) = r.encode();
    frame(id, r.command() as u16, 0, &p)
}

/// The wire bytes of a fixed-layout struct.
macro_rules! bytes {
    ($v:expr) => {{
        let mut p = Vec::new();
        put(&mut p, $v);
        p
    }};
}

fn feature(feature: u16, get: bool, data: Vec<u8>) -> Request {
    Request::DeviceFeature(DeviceFeature {
        argsz: 4096,
        feature,
        get,
        set: !get,
        probe: false,
        data,
    })
}

/// A dma-engine's saved migration stream, made small for a seed: of its device memory only
/// the first 4 KiB section is kept (the rest of the BAR is simply not restored).
fn saved_stream() -> Vec<u8> {
    use vfud_server::migration::stream::{kind as section, put_section, SECTION_HEADER_LEN};
    let mut b = TestBench::with_ram(dev(), RamMode::Socket, 1 << 16);
    let full = b.save_stream().expect("save");
    let (mut out, mut rest, mut memory_kept) = (Vec::new(), &full[..], false);
    while rest.len() >= SECTION_HEADER_LEN {
        let k = u16::from_le_bytes([rest[0], rest[1]]);
        let len = u64::from_le_bytes(rest[8..16].try_into().unwrap()) as usize;
        let payload = &rest[SECTION_HEADER_LEN..SECTION_HEADER_LEN + len];
        match k {
            section::BAR_MEMORY if memory_kept => {}
            section::BAR_MEMORY => {
                memory_kept = true;
                put_section(&mut out, k, &payload[..payload.len().min(16 + 4096)]);
            }
            _ => put_section(&mut out, k, payload),
        }
        rest = &rest[SECTION_HEADER_LEN + len..];
    }
    assert!(memory_kept && out.len() < 16 * 1024, "{} bytes", out.len());
    out
}

/// The fuzz target reuses one destination for every input: refused streams must leave it
/// as fit as a fresh one, so the saved stream still loads after a run of broken ones.
#[test]
fn one_destination_loads_a_good_stream_after_many_broken_ones() {
    let good = [&[0x10][..], &saved_stream()].concat();
    let mut target = fuzzing::MigrationStreamTarget::new(dev()).expect("target");
    assert!(target.load(&good), "the saved stream loads");
    let mut refused = 0;
    for i in 0..64usize {
        let mut bad = good.clone();
        let at = 1 + (i * 7919) % (bad.len() - 1);
        bad[at] ^= 0x5a;
        bad.truncate(bad.len() - i % 5);
        refused += usize::from(!target.load(&bad));
    }
    assert!(
        refused > 32,
        "most damaged streams are refused ({refused} of 64)"
    );
    assert!(
        target.load(&good),
        "the saved stream still loads afterwards"
    );
}

/// A session that touches most commands: the seed of the `session` target.
fn session_seed() -> Vec<u8> {
    let reqs = vec![
        Request::DeviceGetInfo(DeviceInfo {
            argsz: 16,
            ..Default::default()
        }),
        Request::GetRegionInfo(RegionInfo {
            argsz: 32,
            index: 0,
            ..Default::default()
        }),
        Request::RegionRead(RegionAccess {
            offset: 0,
            region: 7,
            count: 64,
        }),
        Request::RegionWrite(
            RegionAccess {
                offset: 4,
                region: 7,
                count: 2,
            },
            vec![6, 0],
        ),
        Request::DmaMap(
            DmaMap {
                argsz: 32,
                flags: 3,
                offset: 0,
                addr: 0x10000,
                size: 0x10000,
            },
            None,
        ),
        Request::SetIrqs(SetIrqs {
            index: IRQ_INDEX_MSIX,
            start: 0,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::None,
        }),
        Request::RegionRead(RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        }),
        feature(
            FEATURE_DMA_LOGGING_START,
            false,
            DmaLoggingControl {
                page_size: 4096,
                ranges: vec![DmaLoggingRange {
                    iova: 0x10000,
                    length: 0x10000,
                }],
            }
            .encode(),
        ),
        feature(
            FEATURE_DMA_LOGGING_REPORT,
            true,
            bytes!(&DmaLoggingReport {
                iova: 0x10000,
                length: 0x10000,
                page_size: 4096,
            }),
        ),
        feature(
            FEATURE_MIG_DEVICE_STATE,
            false,
            bytes!(&MigDeviceState {
                device_state: MigState::StopCopy as u32,
                data_fd: 0,
            }),
        ),
        Request::MigDataRead(MigData {
            argsz: 4096,
            size: 4000,
        }),
        Request::DeviceReset,
    ];
    let mut out = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        out.extend(request(i as u16 + 1, r));
    }
    // A stray reply and a posted write.
    out.extend(frame(
        99,
        Command::DmaRead as u16,
        FLAG_TYPE_REPLY,
        &[0; 16],
    ));
    out.extend(frame(100, Command::DeviceReset as u16, FLAG_NO_REPLY, &[]));
    out
}

/// HELLO, the stream, and a session without fds: the seed of `handover_control`.
fn handover_seed() -> Vec<u8> {
    let mut out = frame(0, kind::HELLO, 0, br#"{"model":"dma-engine"}"#);
    out.extend(frame(0, kind::DATA, 0, &saved_stream()));
    let session = serde_json::json!({
        "model": "dma-engine",
        "negotiated": null,
        "maps": [{"iova": 65536, "size": 65536, "offset": 0, "flags": 3, "fd": null}],
        "irqs": [{"index": 2, "vector": 0, "action": "mask", "fd": null}],
        "client": null,
        "listener": null,
        "backend": null,
        "stopped_at_unix_ns": 0
    });
    out.extend(frame(0, kind::SESSION, 0, session.to_string().as_bytes()));
    out
}

fn version_seed(json: &str) -> Vec<u8> {
    let mut p = vec![];
    p.extend(PROTOCOL_MAJOR.to_le_bytes());
    p.extend(0u16.to_le_bytes());
    p.extend(json.as_bytes());
    p.push(0);
    p
}

/// Every seed, by target.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let stream = saved_stream();
    let mut chunked = vec![7u8];
    chunked.extend(&stream);
    let qemu = r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096,"max_bitmap_size":268435456},"write_multiple":true}}"#;
    let decode_seed = {
        let mut v = (Command::Version as u16).to_le_bytes().to_vec();
        v.extend(version_seed("{}"));
        v
    };
    vec![
        ("decode_request", "version", decode_seed),
        ("decode_request", "session", session_seed()),
        ("version_json", "qemu", version_seed(qemu)),
        ("version_json", "empty", version_seed("{}")),
        (
            "version_json",
            "unknown-key",
            version_seed(r#"{"capabilities":{"x":[1,{"y":null}],"max_msg_fds":0}}"#),
        ),
        ("session", "commands", session_seed()),
        ("migration_stream", "saved", chunked),
        ("handover_control", "handover", handover_seed()),
    ]
}

fn seed_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn run(target: &str, data: &[u8]) {
    match target {
        "decode_request" => {
            if let [a, b, p @ ..] = data {
                let _ = Request::decode(
                    u16::from_le_bytes([*a, *b]),
                    p,
                    Vec::new(),
                    &Default::default(),
                );
            }
        }
        "version_json" => fuzzing::version_json(data),
        "session" => fuzzing::session(dev(), data),
        "migration_stream" => fuzzing::migration_stream(dev(), data),
        "handover_control" => fuzzing::handover_control(dev(), data),
        other => panic!("no target {other}"),
    }
}

#[test]
fn seeds_are_checked_in_and_run_clean() {
    let write = std::env::var_os("VFUD_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, data) in seeds() {
        let path = seed_dir(target).join(name);
        if write {
            std::fs::create_dir_all(seed_dir(target)).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (VFUD_WRITE_FUZZ_SEEDS=1 regenerates)",
                path.display()
            )
        });
        assert_eq!(stored.len(), data.len(), "{} is stale", path.display());
        run(target, &stored);
    }
}

/// A frame with a plausible header (any command, any flags) and arbitrary payload.
fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        0u16..24,
        prop_oneof![Just(0u32), Just(1), Just(0x10), Just(0x21), any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..96),
    )
        .prop_map(|(cmd, flags, payload)| frame(7, cmd, flags, &payload))
}

/// The seed session with some bytes overwritten.
fn mutated_seed() -> impl Strategy<Value = Vec<u8>> {
    let seed = session_seed();
    let n = seed.len();
    prop::collection::vec((0..n, any::<u8>()), 1..8).prop_map(move |edits| {
        let mut s = session_seed();
        for (i, b) in edits {
            s[i] = b;
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn version_json_never_panics(json in "\\PC{0,200}", raw in prop::collection::vec(any::<u8>(), 0..64)) {
        fuzzing::version_json(&version_seed(&json));
        fuzzing::version_json(&raw);
    }

    #[test]
    fn session_of_random_frames_never_panics(frames in prop::collection::vec(arb_frame(), 0..24)) {
        fuzzing::session(dev(), &frames.concat());
    }

    #[test]
    fn mutated_sessions_never_panic(s in mutated_seed()) {
        fuzzing::session(dev(), &s);
    }

    #[test]
    fn random_bytes_as_a_session_never_panic(raw in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::session(dev(), &raw);
    }

    #[test]
    fn mutated_migration_streams_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), chunk in any::<u8>()) {
        let mut s = vec![chunk];
        s.extend(saved_stream());
        for (i, b) in edits {
            let n = s.len();
            s[i.index(n)] = b;
        }
        fuzzing::migration_stream(dev(), &s);
    }

    #[test]
    fn mutated_handovers_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut s = handover_seed();
        for (i, b) in edits {
            let n = s.len();
            s[i.index(n)] = b;
        }
        fuzzing::handover_control(dev(), &s);
    }
}
