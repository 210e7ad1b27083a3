//! `carp-lab`: the namespace lab from the command line (`cargo xtask lab|demo|bench` run it).
//!
//! `carp-lab up` builds the lab and keeps it, `carp-lab down [ID]` removes it (the last one
//! by default), `carp-lab demo` runs the failover demonstration, `carp-lab bench` measures,
//! `carp-lab soak` injects faults and checks invariants.

use anyhow::{Context, Result, bail};
use carp_lab::Lab;
use std::path::PathBuf;

/// Where `up` remembers the lab it left running.
fn current_file() -> PathBuf {
    std::env::temp_dir().join("carp-lab-current")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["up"] => {
            let lab = Lab::up()?;
            let id = lab.keep();
            std::fs::write(current_file(), &id)?;
            println!("lab {id} is up:");
            for host in ["sw", "gw1", "gw2", "cl", "sv"] {
                println!("  ip netns exec carp-{host}-{id} ...");
            }
            println!("remove it with `cargo xtask lab down`");
        }
        ["down"] => {
            let id = std::fs::read_to_string(current_file())
                .context("no lab is up (nothing recorded by `lab up`)")?;
            Lab::remove(id.trim())?;
            let _ = std::fs::remove_file(current_file());
            println!("lab {} removed", id.trim());
        }
        ["down", id] => {
            Lab::remove(id)?;
            println!("lab {id} removed");
        }
        ["demo"] => carp_lab::demo::run()?,
        ["bench"] => carp_lab::bench::run()?,
        ["bench", "--check"] => {
            carp_lab::bench::run()?;
            carp_lab::bench::check_targets()?;
        }
        ["bench", "xdp"] => carp_lab::bench::run_xdp()?,
        ["bench", "sync"] => carp_lab::bench::run_sync()?,
        ["bench", "planned"] => carp_lab::bench::run_planned()?,
        ["bench", "restart"] => carp_lab::bench::run_restart()?,
        ["bench", "loss"] => carp_lab::bench::run_loss()?,
        ["bench", "config"] => carp_lab::bench::run_config()?,
        ["bench", "dhcp"] => carp_lab::dhcpbench::run()?,
        ["bench", "forwarding"] => carp_lab::fwdbench::run()?,
        ["bench", "samework"] => carp_lab::samework::run()?,
        ["load", "--iface", iface] => carp_lab::inspect::load(iface)?,
        ["soak", "--minutes", minutes] => carp_lab::soak::run(minutes.parse()?, None)?,
        ["soak", "--minutes", minutes, "--seed", seed] => {
            carp_lab::soak::run(minutes.parse()?, Some(seed.parse()?))?
        }
        _ => bail!(
            "usage: carp-lab up | down [ID] | demo | bench [--check|xdp|sync|planned|restart|loss|config|dhcp|forwarding|samework] | load --iface IF \
             | soak --minutes N [--seed S]"
        ),
    }
    Ok(())
}
