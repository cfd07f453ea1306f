//! Unit tests of VERSION decoding and negotiation.

use super::*;

const QEMU_JSON: &str = r#"{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": true}}"#;

fn qemu_payload() -> Vec<u8> {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(QEMU_JSON.as_bytes());
    p.push(0);
    p
}

#[test]
fn parses_qemu_proposal() {
    let v = VersionMessage::decode(&qemu_payload()).unwrap();
    assert_eq!(v, VersionMessage::qemu_proposal());
}

#[test]
fn reply_to_qemu_fits_in_its_request() {
    let p = qemu_payload();
    let v = VersionMessage::decode(&p).unwrap();
    let (reply, n) = negotiate(&v, &ServerOffer::default(), p.len()).unwrap();
    assert!(reply.encode().len() <= p.len());
    assert_eq!(n.max_msg_fds, 16);
    assert!(n.write_multiple);
    assert_eq!(accept_reply(&v, &reply).unwrap(), n);
}

#[test]
fn reply_is_trimmed_to_a_short_request() {
    let v = VersionMessage::qemu_proposal();
    let (reply, n) = negotiate(&v, &ServerOffer::default(), 60).unwrap();
    assert!(reply.encode().len() <= 60, "{}", reply.encode().len());
    assert_eq!(accept_reply(&v, &reply).unwrap(), n);
}

#[test]
fn different_major_is_rejected() {
    let v = VersionMessage {
        major: 1,
        ..VersionMessage::qemu_proposal()
    };
    assert!(matches!(
        negotiate(&v, &ServerOffer::default(), 4096),
        Err(ProtocolError::UnsupportedVersion { major: 1, .. })
    ));
}

#[test]
fn higher_minor_is_answered_with_ours() {
    let v = VersionMessage {
        minor: 9,
        ..VersionMessage::qemu_proposal()
    };
    let (reply, _) = negotiate(&v, &ServerOffer::default(), 4096).unwrap();
    assert_eq!(reply.minor, PROTOCOL_MINOR);
}

#[test]
fn each_side_states_its_own_receive_limits() {
    // libvfio-user's sample client proposes 1 KiB; a server accepting 4 KiB says 4 KiB.
    let mut v = VersionMessage::qemu_proposal();
    let c = v.caps.as_mut().unwrap();
    c.max_msg_fds = Some(4);
    c.max_data_xfer_size = Some(1024);
    let offer = ServerOffer {
        max_data_xfer_size: 4096,
        ..ServerOffer::default()
    };
    let (reply, n) = negotiate(&v, &offer, 4096).unwrap();
    let rc = reply.caps.as_ref().unwrap();
    assert_eq!(
        (rc.max_msg_fds, rc.max_data_xfer_size),
        (Some(16), Some(4096))
    );
    assert_eq!((n.max_msg_fds, n.max_data_xfer_size), (16, 4096));
    assert_eq!(
        (n.client_max_msg_fds, n.client_max_data_xfer_size),
        (4, 1024)
    );
    // The client derives the same parameters from the reply.
    assert_eq!(accept_reply(&v, &reply).unwrap(), n);
    // The server accepts 4 KiB transfers and sends at most 1 KiB; the client the reverse.
    let server = crate::codec::Limits::from_negotiated(&n);
    assert_eq!(
        (server.max_recv_xfer_size, server.max_data_xfer_size),
        (4096, 1024)
    );
    assert_eq!(server.max_msg_fds, 16);
    let client = crate::codec::Limits::client(&n);
    assert_eq!(
        (client.max_recv_xfer_size, client.max_data_xfer_size),
        (1024, 4096)
    );
    assert_eq!(client.max_msg_fds, 4);
    assert!(server.check_xfer(4096).is_ok() && server.check_xfer(4097).is_err());
}

#[test]
fn offered_transfer_size_is_capped_at_qemus_64_mib() {
    let v = VersionMessage::qemu_proposal();
    let offer = ServerOffer {
        max_data_xfer_size: 1 << 30,
        ..ServerOffer::default()
    };
    let (reply, n) = negotiate(&v, &offer, 4096).unwrap();
    assert_eq!(n.max_data_xfer_size, MAX_MAX_DATA_XFER_SIZE);
    assert!(accept_reply(&v, &reply).is_ok());
}

#[test]
fn older_negotiated_json_without_client_limits_still_loads() {
    // A handover from a build that predates the client_* fields.
    let mut j = serde_json::to_value(Negotiated::default()).unwrap();
    let o = j.as_object_mut().unwrap();
    o.remove("client_max_msg_fds");
    o.remove("client_max_data_xfer_size");
    let n: Negotiated = serde_json::from_value(j).unwrap();
    assert_eq!(n, Negotiated::default());
}

#[test]
fn absent_caps_take_defaults() {
    let v = VersionMessage::decode(&[0, 0, 0, 0]).unwrap();
    let (reply, n) = negotiate(&v, &ServerOffer::default(), 4096).unwrap();
    assert_eq!(n, Negotiated::default());
    assert_eq!(reply.caps.unwrap(), Capabilities::default());
}

#[test]
fn twin_socket_only_when_offered_and_supported() {
    let mut v = VersionMessage::qemu_proposal();
    let offer = ServerOffer {
        twin_socket: true,
        ..ServerOffer::default()
    };
    let (_, n) = negotiate(&v, &offer, 4096).unwrap();
    assert!(!n.twin_socket);
    v.caps.as_mut().unwrap().twin_socket = Some(TwinSocketCaps {
        supported: Some(true),
        fd_index: None,
    });
    let (_, n) = negotiate(&v, &offer, 4096).unwrap();
    assert!(n.twin_socket);
    let (_, n) = negotiate(&v, &ServerOffer::default(), 4096).unwrap();
    assert!(!n.twin_socket);
}

#[test]
fn json_without_nul_is_rejected() {
    let mut p = qemu_payload();
    p.pop();
    assert!(VersionMessage::decode(&p).is_err());
}

#[test]
fn malformed_json_is_rejected() {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(b"{\"capabilities\": [}\0");
    assert!(matches!(
        VersionMessage::decode(&p),
        Err(ProtocolError::InvalidJson(_))
    ));
}

#[test]
fn bad_pgsizes_is_rejected() {
    let mut v = VersionMessage::qemu_proposal();
    v.caps.as_mut().unwrap().pgsizes = Some(100);
    assert!(negotiate(&v, &ServerOffer::default(), 4096).is_err());
}

#[test]
fn client_rejects_unproposed_caps_but_takes_the_servers_own_limits() {
    let v = VersionMessage {
        major: 0,
        minor: 0,
        caps: Some(Capabilities {
            max_msg_fds: Some(4),
            max_data_xfer_size: Some(1024),
            max_dma_maps: Some(8),
            ..Capabilities::default()
        }),
    };
    let mut r = v.clone();
    let c = r.caps.as_mut().unwrap();
    c.max_msg_fds = Some(8);
    c.max_data_xfer_size = Some(1 << 20);
    let n = accept_reply(&v, &r).expect("larger limits are the server's own");
    assert_eq!((n.max_msg_fds, n.max_data_xfer_size), (8, 1 << 20));
    let mut r = v.clone();
    r.caps.as_mut().unwrap().max_data_xfer_size = Some(MAX_MAX_DATA_XFER_SIZE + 1);
    assert!(accept_reply(&v, &r).is_err());
    let mut r = v.clone();
    r.caps.as_mut().unwrap().max_dma_maps = Some(9);
    assert!(accept_reply(&v, &r).is_err());
    let mut r = v.clone();
    r.caps.as_mut().unwrap().write_multiple = Some(true);
    assert!(accept_reply(&v, &r).is_err());
    let bare = VersionMessage {
        caps: Some(Capabilities::default()),
        ..v.clone()
    };
    let mut unproposed = bare.clone();
    unproposed.caps.as_mut().unwrap().max_msg_fds = Some(1);
    assert!(accept_reply(&bare, &unproposed).is_err());
    let mut r2 = v.clone();
    r2.minor = 1;
    assert!(accept_reply(&v, &r2).is_err());
}

#[test]
fn unknown_keys_survive_a_round_trip() {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(br#"{"capabilities":{"frobnicate":3}}"#);
    p.push(0);
    let v = VersionMessage::decode(&p).unwrap();
    assert_eq!(v.caps.as_ref().unwrap().unknown.len(), 1);
    assert_eq!(VersionMessage::decode(&v.encode()).unwrap(), v);
}
