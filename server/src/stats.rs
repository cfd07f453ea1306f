//! Operating counters of one device's loop, and the `vfud status` report built from them.
//!
//! Kept apart from dispatch so the hot path only bumps two integers per message; the report
//! (`ControlCommand::Status` on the control socket) is assembled on demand.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};
use vfud_protocol::messages::irq::{IRQ_INDEX_INTX, IRQ_INDEX_MSI, IRQ_INDEX_MSIX};
use vfud_protocol::Command;

use crate::dispatch::DeviceServer;

/// Messages served and failed, per command number.
#[derive(Clone, Copy, Debug, Default)]
struct PerCommand {
    served: u64,
    errors: u64,
}

/// Counters since the loop started.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    clients: u64,
    by_cmd: BTreeMap<u16, PerCommand>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            clients: 0,
            by_cmd: BTreeMap::new(),
        }
    }
}

impl Stats {
    /// Count one client message handled; `ok` is false when it was answered with an error
    /// (or would have been, for NO_REPLY messages).
    pub fn record(&mut self, cmd: u16, ok: bool) {
        let e = self.by_cmd.entry(cmd).or_default();
        e.served += 1;
        if !ok {
            e.errors += 1;
        }
    }

    /// Count one client accepted.
    pub fn client_connected(&mut self) {
        self.clients += 1;
    }

    /// The status report: the device, its client session, migration state, DMA, interrupts
    /// and these counters.
    pub fn report(&self, server: &DeviceServer, client_connected: bool) -> Value {
        let dma = &server.dma;
        let maps = dma.iter().count();
        let bytes: u64 = dma.iter().map(|m| m.size).sum();
        let fd_backed = dma.iter().filter(|m| m.is_mmapped()).count();
        let irq_mode = match server.function.irqs().active_index() {
            Some(IRQ_INDEX_MSIX) => "MSI-X",
            Some(IRQ_INDEX_MSI) => "MSI",
            Some(IRQ_INDEX_INTX) => "INTx",
            Some(_) => "other",
            None => "none",
        };
        let mut messages = serde_json::Map::new();
        let (mut total, mut errors) = (0u64, 0u64);
        for (cmd, c) in &self.by_cmd {
            let name = Command::try_from(*cmd)
                .map(|c| c.name().to_string())
                .unwrap_or_else(|_| format!("CMD_{cmd}"));
            messages.insert(name, json!({ "served": c.served, "errors": c.errors }));
            total += c.served;
            errors += c.errors;
        }
        json!({
            "model": server.description().name,
            "client_connected": client_connected,
            "clients_accepted": self.clients,
            "negotiated": server.negotiated,
            "migration_state": format!("{:?}", server.mig_state()),
            "dma_maps": maps,
            "dma_bytes_mapped": bytes,
            "dma_maps_fd_backed": fd_backed,
            "dma_logging": dma.logging(),
            "irq_mode": irq_mode,
            "messages_total": total,
            "errors_total": errors,
            "messages": messages,
            "uptime_s": self.started.elapsed().as_secs_f64(),
        })
    }
}
