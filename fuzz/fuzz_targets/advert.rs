//! Anything the raw socket can hand the daemon: acceptance (IPv4 header, advert decode, HMAC
//! check) and the state machine's reaction must never panic.
#![no_main]

use carp::carp::{
    acceptance::{self, Listener, Refusal, Rules},
    frame::parse_ipv4,
    fsm::{Params, PeerAdvert, Vhid},
    packet::{Advert, AuthKey},
};
use libfuzzer_sys::fuzz_target;
use std::{net::Ipv4Addr, time::Instant};

fuzz_target!(|data: &[u8]| {
    let key = AuthKey::new(b"fuzz").expect("short key");
    let vip = Ipv4Addr::new(198, 18, 1, 1);
    let rules = Rules {
        own_addresses: &[Ipv4Addr::new(198, 18, 1, 2)],
        key: &key,
        unicast: false,
    };
    let listener = Listener {
        vhid: 1,
        ifindex: 1,
        vip,
    };
    let verdict = acceptance::accept(data, 1, rules, [listener]);
    let Ok((ip, payload)) = parse_ipv4(data) else {
        assert!(matches!(verdict, Err(Refusal::Ipv4 { .. })), "{verdict:?}");
        return;
    };
    let Ok(advert) = Advert::parse(payload) else {
        return;
    };
    // Round trip: what parses re-encodes to the same fields and bytes. Only the checksum may
    // differ, as 0x0000 and 0xffff are both one's-complement zero.
    let emitted = advert.emit();
    assert_eq!(Advert::parse(&emitted), Ok(advert));
    assert_eq!(
        (&emitted[..6], &emitted[8..]),
        (&payload[..6], &payload[8..36])
    );
    let _ = advert.verify(&key, &[vip]);
    let now = Instant::now();
    let params = Params {
        advbase: 1,
        advskew: 0,
        preempt: true,
    };
    let mut vhid = Vhid::new(advert.vhid, params, Ipv4Addr::new(198, 18, 1, 2), now);
    vhid.handle_link(true, now);
    vhid.handle_advert(
        PeerAdvert {
            advbase: advert.advbase,
            advskew: advert.advskew,
            source: ip.src,
        },
        now,
    );
    while vhid.poll_action().is_some() {}
});
