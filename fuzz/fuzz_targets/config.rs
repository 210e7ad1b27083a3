//! Any configuration text: parsing and validation report problems, never panic.
#![no_main]

use carp::{config::Config, interfaces::Interface};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let host = [Interface {
        name: "lan".into(),
        index: 2,
        mac: [2, 0, 0, 0, 0, 1],
        link_up: true,
        addrs: vec!["198.18.1.2/24".parse().expect("valid")],
    }];
    let _ = Config::parse(text, &host);
});
