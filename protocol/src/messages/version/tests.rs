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
fn values_never_exceed_the_proposal_nor_the_offer() {
    let mut v = VersionMessage::qemu_proposal();
    v.caps.as_mut().unwrap().max_msg_fds = Some(4);
    let offer = ServerOffer {
        max_data_xfer_size: 4096,
        ..ServerOffer::default()
    };
    let (_, n) = negotiate(&v, &offer, 4096).unwrap();
    assert_eq!(n.max_msg_fds, 4);
    assert_eq!(n.max_data_xfer_size, 4096);
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
fn client_rejects_unproposed_or_larger_caps() {
    let v = VersionMessage {
        major: 0,
        minor: 0,
        caps: Some(Capabilities {
            max_msg_fds: Some(4),
            ..Capabilities::default()
        }),
    };
    let mut r = v.clone();
    r.caps.as_mut().unwrap().max_msg_fds = Some(8);
    assert!(accept_reply(&v, &r).is_err());
    let mut r = v.clone();
    r.caps.as_mut().unwrap().write_multiple = Some(true);
    assert!(accept_reply(&v, &r).is_err());
    let mut r = v.clone();
    r.minor = 1;
    assert!(accept_reply(&v, &r).is_err());
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
