//! The forwarding half of `vfud trace`: one thread per direction per connection, each cutting
//! its byte stream into frames with the protocol crate's [`FrameReader`], printing every frame
//! and sending it on with its descriptors attached to its first byte, exactly as a
//! well-behaved sender does (so the receiver matches fds to messages as it would without us).
//!
//! A frame whose header cannot be framed (`msg_size` below 16 or absurdly large) ends framing
//! for that direction: what is buffered is passed on untouched and the rest is copied as raw
//! bytes and fds, still printed (as unframed chunks), so the tracer never changes what the
//! peer receives.

use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use vfud_protocol::codec::{recv_some, send_chunks, send_message, FrameReader};
use vfud_protocol::ProtocolError;

use super::decode::{decode, tracer_limits, Dir};
use super::output::{Event, Printer};

/// Serve one accepted client: connect to the server at `server_path` and forward both ways
/// until both directions have ended.
pub fn handle(client: UnixStream, server_path: &Path, printer: Arc<Printer>, conn: u64) {
    let server = match UnixStream::connect(server_path) {
        Ok(s) => s,
        Err(e) => {
            printer.note(
                conn,
                None,
                "connect-failed",
                json!(format!("{}: {e}", server_path.display())),
            );
            return;
        }
    };
    printer.note(
        conn,
        None,
        "open",
        json!(format!(
            "client connected, forwarding to {}",
            server_path.display()
        )),
    );
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        printer.note(conn, None, "closed", json!("cannot duplicate the sockets"));
        return;
    };
    let p2 = printer.clone();
    let upstream = std::thread::Builder::new()
        .name(format!("trace-{conn}-c2s"))
        .spawn(move || pump(&client2, &server2, Dir::ClientToServer, &p2, conn));
    let why_down = pump(&server, &client, Dir::ServerToClient, &printer, conn);
    let why_up = match upstream {
        Ok(t) => t.join().unwrap_or_else(|_| "thread panicked".into()),
        Err(e) => format!("cannot spawn: {e}"),
    };
    printer.note(
        conn,
        None,
        "closed",
        json!(format!("client side: {why_up}; server side: {why_down}")),
    );
    printer.forget(conn);
}

fn borrowed(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

/// Forward `src` → `dst` frame by frame; returns why it stopped. On the way out, shut both
/// sockets down: vfio-user has no half-closed state, so when one side goes the connection is
/// over, and the other direction's thread (blocked reading) must wake up too.
fn pump(src: &UnixStream, dst: &UnixStream, dir: Dir, printer: &Printer, conn: u64) -> String {
    let limits = tracer_limits();
    let mut reader = FrameReader::new();
    let why = loop {
        match reader.read_frame(src.as_fd(), &limits) {
            Ok(Some(frame)) => {
                let h = frame.header;
                let decoded = decode(dir, &h, &frame.payload, &frame.fds);
                printer.message(&Event {
                    conn,
                    dir,
                    id: h.msg_id,
                    cmd: h.cmd,
                    size: h.msg_size,
                    decoded: &decoded,
                });
                if let Err(e) =
                    send_message(dst.as_fd(), &h, &[&frame.payload], &borrowed(&frame.fds))
                {
                    break format!("forwarding failed: {e}");
                }
            }
            Ok(None) => {}
            Err(ProtocolError::Disconnected) => break "closed".to_string(),
            Err(ProtocolError::Io(e)) => break format!("socket error: {e}"),
            Err(e) => {
                let (bytes, fds) = reader.take_unparsed();
                printer.note(
                    conn,
                    Some(dir),
                    "malformed-stream",
                    json!({
                        "error": e.to_string(),
                        "bytes": bytes.len(),
                        "fds": fds.len(),
                        "head": hex_head(&bytes),
                        "note": "cannot cut frames any more; forwarding raw bytes",
                    }),
                );
                break raw_copy(src, dst, &bytes, fds, dir, printer, conn);
            }
        }
    };
    let _ = dst.shutdown(Shutdown::Both);
    let _ = src.shutdown(Shutdown::Both);
    why
}

fn hex_head(b: &[u8]) -> String {
    b.iter().take(32).map(|x| format!("{x:02x}")).collect()
}

/// Pass `first` on, then copy raw bytes and descriptors until the source ends.
fn raw_copy(
    src: &UnixStream,
    dst: &UnixStream,
    first: &[u8],
    first_fds: Vec<OwnedFd>,
    dir: Dir,
    printer: &Printer,
    conn: u64,
) -> String {
    if !first.is_empty() || !first_fds.is_empty() {
        if let Err(e) = send_chunks(dst.as_fd(), &[first], &borrowed(&first_fds)) {
            return format!("forwarding failed: {e}");
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = Vec::new();
    loop {
        let mut fds = Vec::new();
        match recv_some(src.as_fd(), &mut buf, &mut fds, &mut cmsg) {
            Ok(Some(n)) => {
                printer.note(
                    conn,
                    Some(dir),
                    "unframed",
                    json!({ "bytes": n, "fds": fds.len(), "head": hex_head(&buf[..n]) }),
                );
                if let Err(e) = send_chunks(dst.as_fd(), &[&buf[..n]], &borrowed(&fds)) {
                    return format!("forwarding failed: {e}");
                }
            }
            Ok(None) => {}
            Err(ProtocolError::Disconnected) => return "closed (after malformed data)".into(),
            Err(e) => return format!("socket error: {e}"),
        }
    }
}
