//! What a secondary makes of a configuration push (the areas text from the peer): the
//! +100 rewrite, the files and rulesets it carries, the composed configuration and the diff
//! against what it holds. Errors, never a panic.
#![no_main]

use carp::{
    config::Config,
    config_sync::{self, Area},
    interfaces::Interface,
};
use libfuzzer_sys::fuzz_target;

const OWN: &str = "[node]\nname = \"gw2\"\n[config_sync]\naccept = [\"carp\", \"nat\", \"nftables\", \"files\", \"dhcp\"]\n";
const ACCEPT: [Area; 5] = [
    Area::Carp,
    Area::Nat,
    Area::Nftables,
    Area::Files,
    Area::Dhcp,
];

fuzz_target!(|data: &[u8]| {
    let Ok(pushed) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(received) = config_sync::received_for_secondary(pushed) else {
        return;
    };
    let _ = config_sync::synced_files(&received);
    let _ = config_sync::nftables_files(&received);
    let _ = config_sync::diff(pushed, &received, "secondary", "primary");
    let Ok(composed) = config_sync::compose(OWN, &received, &ACCEPT) else {
        return;
    };
    let host = [Interface {
        name: "lan".into(),
        index: 2,
        mac: [2, 0, 0, 0, 0, 1],
        link_up: true,
        addrs: vec!["198.18.1.3/24".parse().expect("valid")],
    }];
    let _ = Config::parse(&composed, &host);
});
