//! `cargo xtask build-and-load --iface IF`: attaches carp's XDP program to an interface with
//! its maps and link pinned, so bpftool can show them; the daemon is not involved.

use anyhow::Result;
use aya::programs::XdpMode;
use carp::{dataplane::Dataplane, pins};
use carp_common::flow::DEFAULT_FLOWS_MAX;
use carp_common::maps::ALL_MAPS;

pub fn load(iface: &str) -> Result<()> {
    let dir = pins::node_dir(&format!("inspect-{iface}"));
    let mut dataplane = Dataplane::load(&dir, DEFAULT_FLOWS_MAX, None)?;
    dataplane.attach(iface, XdpMode::default())?;
    println!(
        "carp's XDP program is attached to {iface}; pinned under {}:",
        dir.display()
    );
    println!(
        "  bpftool link show pinned {}",
        pins::link(&dir, iface).display()
    );
    println!(
        "  bpftool prog show pinned {}",
        pins::program(&dir).display()
    );
    for map in ALL_MAPS {
        println!("  bpftool map dump pinned {}", dir.join(map).display());
    }
    println!(
        "With no daemon heartbeat it answers no ARP and passes everything else.\n\
         Detach and remove with: rm -r {}",
        dir.display()
    );
    Ok(())
}
