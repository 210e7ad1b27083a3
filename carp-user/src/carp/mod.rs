//! CARP, the protocol: the advert codec, the frames that carry it, and the per-vhid state
//! machine. Everything here is sans-IO: no sockets, no clock.

pub mod acceptance;
pub mod demotion;
pub mod frame;
pub mod fsm;
pub mod packet;
