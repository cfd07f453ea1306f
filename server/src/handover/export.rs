//! A client session as a description plus fds ([`SessionInfo`]), and back.
//!
//! The receiving side treats the description like client input: maps go through the same
//! DMA_MAP checks, interrupt entries through SET_IRQS validation (and are applied only at
//! RUNNING), and the negotiated limits may not exceed what this server offers.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use vfud_protocol::messages::{DmaMap, IrqAction, IrqData, MigState, SetIrqs};

use super::{IrqEntry, MapEntry, SessionInfo};
use crate::connection::Connection;
use crate::dispatch::DeviceServer;
use crate::error::{HandoverError, RequestError};

fn action_name(a: IrqAction) -> &'static str {
    match a {
        IrqAction::Mask => "mask",
        IrqAction::Unmask => "unmask",
        IrqAction::Trigger => "trigger",
    }
}

fn protocol(msg: impl Into<String>) -> HandoverError {
    HandoverError::Protocol(msg.into())
}

impl DeviceServer {
    /// Up to `max` bytes of the outgoing stream, for a live handover (PRE_COPY/STOP_COPY).
    pub fn handover_read(&mut self, max: usize) -> Result<Vec<u8>, RequestError> {
        self.read_stream(max)
    }

    /// Feed incoming stream bytes, for a live handover (RESUMING).
    pub fn handover_write(&mut self, data: &[u8]) -> Result<(), RequestError> {
        self.mig.write_stream(data, &self.function)
    }

    /// After handing the device over: let go of the backend without tearing it down.
    pub fn release_after_handover(&mut self) {
        if let Some(h) = self.device.host_io() {
            h.release();
        }
    }

    /// Reset after a failed incoming handover: forget the partial state.
    pub fn abandon(&mut self) {
        self.client_gone();
        self.reset();
    }

    /// Everything about the attached client that a new process needs to carry on the same
    /// connection: negotiated caps, DMA maps and interrupt setup, with duplicated fds
    /// appended to `fds` (the description indexes into it). `client` is the connection.
    pub(crate) fn export_session(
        &mut self,
        client: Option<&Connection>,
        fds: &mut Vec<OwnedFd>,
    ) -> std::io::Result<SessionInfo> {
        let mut push = |fd: OwnedFd| {
            fds.push(fd);
            fds.len() - 1
        };
        let mut maps = Vec::new();
        for (m, fd) in self.dma.export()? {
            maps.push(MapEntry {
                iova: m.addr,
                size: m.size,
                offset: m.offset,
                flags: m.flags,
                fd: fd.map(&mut push),
            });
        }
        let mut irqs = Vec::new();
        for s in self.function.irqs().export()? {
            let fd = match s.data {
                IrqData::Eventfds(mut v) => v.pop().map(&mut push),
                _ => None,
            };
            irqs.push(IrqEntry {
                index: s.index,
                vector: s.start,
                action: action_name(s.action).into(),
                fd,
            });
        }
        let mut bar_memory = Vec::new();
        for (bar, mem) in self.function.bars().iter().enumerate() {
            if let Some(mem) = mem {
                bar_memory.push((bar, push(mem.fd().try_clone_to_owned()?)));
            }
        }
        let client = client.map(Connection::dup).transpose()?.map(&mut push);
        let backend = self
            .device
            .host_io()
            .and_then(|h| h.export())
            .map(|(desc, bfds)| (desc, bfds.into_iter().map(&mut push).collect()));
        Ok(SessionInfo {
            model: self.description().name.to_string(),
            negotiated: self.negotiated.clone(),
            maps,
            irqs,
            client,
            listener: None,
            backend,
            bar_memory,
            stopped_at_unix_ns: 0,
        })
    }

    /// Receiving side of a live handover (called in RESUMING, after the stream): adopt the
    /// session and go to RUNNING; returns the client connection. On failure the device is
    /// reset and nothing is adopted.
    pub(crate) fn import_session(
        &mut self,
        info: &SessionInfo,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<Option<Connection>, HandoverError> {
        let r = self.import_inner(info, fds);
        if r.is_err() {
            self.abandon();
        }
        r
    }

    fn import_inner(
        &mut self,
        info: &SessionInfo,
        mut fds: Vec<Option<OwnedFd>>,
    ) -> Result<Option<Connection>, HandoverError> {
        let name = self.description().name;
        if info.model != name {
            return Err(protocol(format!(
                "handover of a {} to a {name}",
                info.model
            )));
        }
        if self.mig.state() != MigState::Resuming {
            return Err(protocol("handover session outside RESUMING"));
        }
        let mut take = |i: Option<usize>| -> Result<Option<OwnedFd>, HandoverError> {
            match i {
                None => Ok(None),
                Some(i) => fds
                    .get_mut(i)
                    .and_then(Option::take)
                    .map(Some)
                    .ok_or_else(|| protocol(format!("handover fd {i} missing"))),
            }
        };
        let boxed = |e: RequestError| HandoverError::Request(Box::new(e));
        if let Some(n) = &info.negotiated {
            // The peer's limits are client input: never above what this server offers.
            let o = &self.offer;
            if n.max_msg_fds > o.max_msg_fds
                || n.max_data_xfer_size > o.max_data_xfer_size
                || n.max_dma_maps > o.max_dma_maps
            {
                return Err(protocol(format!(
                    "handover limits {n:?} exceed what this server offers"
                )));
            }
            self.dma.set_max_maps(n.max_dma_maps as usize);
            self.dma.set_max_report(n.max_data_xfer_size as usize);
            let send_max = vfud_protocol::codec::Limits::from_negotiated(n).max_data_xfer_size;
            self.socket_dma.set_max_xfer(send_max as usize);
        }

        self.negotiated = info.negotiated.clone();
        for m in &info.maps {
            let map = DmaMap {
                argsz: 32,
                flags: m.flags,
                offset: m.offset,
                addr: m.iova,
                size: m.size,
            };
            self.dma
                .map(&map, take(m.fd)?)
                .map_err(|e| boxed(e.into()))?;
        }
        for e in &info.irqs {
            let action = match e.action.as_str() {
                "mask" => IrqAction::Mask,
                "unmask" => IrqAction::Unmask,
                "trigger" => IrqAction::Trigger,
                other => return Err(protocol(format!("unknown IRQ action {other}"))),
            };
            let data = match take(e.fd)? {
                Some(fd) => IrqData::Eventfds(vec![fd]),
                None => IrqData::None,
            };
            let s = SetIrqs {
                index: e.index,
                start: e.vector,
                count: 1,
                action,
                data,
            };
            self.mig
                .set_irqs(s, self.function.irqs_mut())
                .map_err(boxed)?;
        }
        if let Some((desc, idx)) = &info.backend {
            let mut b = Vec::new();
            for i in idx {
                b.extend(take(Some(*i))?);
            }
            let host = self
                .device
                .host_io()
                .ok_or_else(|| protocol("this device has no backend to adopt"))?;
            host.adopt(desc, b).map_err(|e| boxed(e.into()))?;
        }
        // Shared BAR memory: the client mapped the old process's memfds, so serve those. They
        // are adopted before the device runs (a device resuming work reads them), and what the
        // stream restored into this process's own memory is dropped with the loader's backup of
        // it, so that a failure below can neither roll back into memory the old process still
        // serves nor leave this process serving it.
        let mut own = Vec::new();
        let adopted = info.bar_memory.iter().try_for_each(|&(bar, i)| {
            let fd = take(Some(i))?.ok_or_else(|| protocol("BAR memory fd missing"))?;
            let prev = self
                .function
                .adopt_bar_memory(bar, fd)
                .map_err(|e| boxed(e.into()))?;
            self.mig.forget_memory_backup(bar);
            own.push((bar, prev));
            Ok(())
        });
        let client = adopted.and_then(|()| take(info.client));
        let running = client.and_then(|c| {
            self.set_mig_state(MigState::Running).map_err(boxed)?;
            Ok(c)
        });
        let client = match running {
            Ok(c) => c,
            Err(e) => {
                for (bar, mem) in own {
                    self.function.restore_bar_memory(bar, mem);
                }
                return Err(e);
            }
        };
        Ok(match client {
            Some(fd) => Some(Connection::new(UnixStream::from(fd))?),
            None => None,
        })
    }
}
