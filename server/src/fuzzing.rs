//! Entry points for fuzzing: each takes arbitrary bytes and drives one of vfud's trust
//! boundaries through the real code. The cargo-fuzz targets in `fuzz/` call them, and so do
//! the workspace's property tests (`tests/fuzz_props.rs`), so both exercise the same paths.
//! None may panic, whatever the input.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use mio::Token;
use vfud_protocol::codec::FrameReader;
use vfud_protocol::header::{Command, Header};
use vfud_protocol::messages::version::{negotiate, Capabilities, ServerOffer, VersionMessage};
use vfud_protocol::messages::MigState;

use crate::connection::Connection;
use crate::device::Device;
use crate::dispatch::{DeviceServer, ServerSettings};
use crate::event_loop::{Loop, CONTROL_BASE};

/// Most input bytes fed to a socket in one go (the socket buffer holds them all, so nothing
/// blocks on a single thread).
const MAX_INPUT: usize = 64 * 1024;

/// VERSION payloads: decode; whatever decodes is negotiated against the default offer, and
/// a successful reply must decode again and stay within the request's length.
pub fn version_json(data: &[u8]) {
    let Ok(v) = VersionMessage::decode(data) else {
        return;
    };
    if let Ok((reply, n)) = negotiate(&v, &ServerOffer::default(), data.len()) {
        let bytes = reply.encode();
        let back = VersionMessage::decode(&bytes).expect("a negotiated reply decodes");
        assert_eq!(back.major, reply.major);
        let offer = ServerOffer::default();
        assert!(n.max_data_xfer_size <= offer.max_data_xfer_size);
        assert!(n.max_dma_maps <= offer.max_dma_maps);
        assert!(n.max_msg_fds <= offer.max_msg_fds);
    }
}

/// The VERSION a fuzzed session starts with: small transfers, so replies stay small.
fn version_frame() -> Vec<u8> {
    let caps = Capabilities {
        max_msg_fds: Some(4),
        max_data_xfer_size: Some(4096),
        ..Capabilities::default()
    };
    let v = VersionMessage {
        major: vfud_protocol::messages::version::PROTOCOL_MAJOR,
        minor: 0,
        caps: Some(caps),
    };
    let payload = v.encode();
    let h = Header::command(0, Command::Version, payload.len(), false);
    let mut out = h.as_wire_bytes().to_vec();
    out.extend(payload);
    out
}

/// Write `data` into `theirs` (all of it fits in the socket buffer), half-close, and read
/// whatever comes back on another thread until the server side closes.
fn feed(theirs: &UnixStream, data: &[u8]) -> std::thread::JoinHandle<()> {
    let mut w = theirs;
    let _ = w.write_all(&data[..data.len().min(MAX_INPUT)]);
    let _ = theirs.shutdown(Shutdown::Write);
    let mut r = theirs.try_clone().expect("dup socket");
    std::thread::spawn(move || {
        let mut b = vec![0u8; 64 * 1024];
        while matches!(r.read(&mut b), Ok(n) if n > 0) {}
    })
}

/// A whole client session: a VERSION (prepended, so inputs need not discover the JSON)
/// then `data` as the client's byte stream, through a socketpair into the real event-loop
/// path (`FrameReader` → decode → `DeviceServer` → `device`), with device work run between
/// reads and the device's socket-DMA requests sent back.
pub fn session(device: Box<dyn Device>, data: &[u8]) {
    let Ok(server) = DeviceServer::new(device, ServerSettings::default()) else {
        return;
    };
    let mut lp = Loop::new(server).expect("poll");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut input = version_frame();
    input.extend_from_slice(&data[..data.len().min(MAX_INPUT - input.len())]);
    let drain = feed(&theirs, &input);
    lp.set_client(Connection::new(ours).expect("non-blocking"))
        .expect("register");
    for _ in 0..4 {
        lp.read_client();
        lp.server.run_deferred();
        lp.flush_requests();
    }
    if lp.client.is_some() {
        lp.disconnect("end of input");
    }
    drop(lp);
    drop(theirs);
    let _ = drain.join();
}

/// The migration stream as a destination device loads it (MIG_DATA_WRITE or a handover's
/// DATA): `device` goes to RESUMING, `data[0]` picks the chunk size the rest arrives in, then
/// the device is asked to run; whatever the stream, it must end RUNNING or refuse cleanly.
pub fn migration_stream(device: Box<dyn Device>, data: &[u8]) {
    if let Some(mut target) = MigrationStreamTarget::new(device) {
        target.load(data);
    }
}

/// One destination device that loads stream after stream, as [`migration_stream`] does for
/// one. The fuzz target keeps one for the whole run: a fresh device per input spends most
/// of its time faulting in the pages of its BAR memory, not in the loader. Reuse is also a
/// test of its own: every load must leave the device fit for the next.
pub struct MigrationStreamTarget {
    server: DeviceServer,
}

impl MigrationStreamTarget {
    /// A destination around `device`, or `None` if the device cannot be served at all.
    pub fn new(device: Box<dyn Device>) -> Option<Self> {
        let server = DeviceServer::new(device, ServerSettings::default()).ok()?;
        Some(Self { server })
    }

    /// Load `data` (first byte: chunk size / 16) and run; whether the stream was accepted.
    /// Panics if the device does not end RUNNING, since a refused stream must roll back, not
    /// strand the device.
    pub fn load(&mut self, data: &[u8]) -> bool {
        let Some((&chunk, rest)) = data.split_first() else {
            return false;
        };
        let server = &mut self.server;
        server
            .set_mig_state(MigState::Resuming)
            .expect("a running device accepts RESUMING");
        for c in rest.chunks(usize::from(chunk).max(1) * 16) {
            if server.handover_write(c).is_err() {
                break;
            }
        }
        let accepted = server.set_mig_state(MigState::Running).is_ok();
        if !accepted {
            server.abandon();
        }
        assert_eq!(
            server.mig_state(),
            MigState::Running,
            "a loaded or refused stream leaves the device running"
        );
        accepted
    }
}

/// The incoming side of the handover control protocol: `data` is the byte stream a peer
/// process sends on a control connection (HELLO, DATA, SESSION, commands), read by the real
/// event loop into `device`. Inputs naming the `handover` command are skipped: it would
/// connect to whatever path the input names.
pub fn handover_control(device: Box<dyn Device>, data: &[u8]) {
    if data.windows(8).any(|w| w == b"handover") {
        return;
    }
    let Ok(server) = DeviceServer::new(device, ServerSettings::default()) else {
        return;
    };
    let mut lp = Loop::new(server).expect("poll");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    ours.set_nonblocking(true).expect("non-blocking");
    let drain = feed(&theirs, data);
    let t = Token(CONTROL_BASE);
    lp.controls.insert(t, (ours, FrameReader::new()));
    lp.read_control(t);
    for _ in 0..4 {
        lp.read_client();
        lp.server.run_deferred();
        lp.flush_requests();
    }
    drop(lp);
    drop(theirs);
    let _ = drain.join();
}
