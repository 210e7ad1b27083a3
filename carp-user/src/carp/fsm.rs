//! The CARP state machine of one vhid, after FreeBSD `ip_carp.c` (`carp_input_c`,
//! `carp_master_down`, `carp_setrun`) and carp(4), with ucarp's tie-break. Sans-IO in the
//! style of quinn-proto: inputs through `handle_*`, outputs through [`Vhid::poll_action`] and
//! [`Vhid::poll_timeout`], time passed in. Every transition goes through [`Vhid::transition`],
//! which logs old -> new and why.

use super::packet::CARP_MAXSKEW;
use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    time::{Duration, Instant},
};
use tracing::info;

/// advbase of the bow-out advert a node sends when it leaves (OpenBSD, carp(4)).
pub const BOW_OUT_ADVBASE: u8 = 255;
/// advskew of the bow-out advert.
pub const BOW_OUT_ADVSKEW: u8 = 255;
/// How often a master handing over before it stops repeats its bow-out, so that one lost
/// advert does not leave the peer waiting out its master-down time.
pub const BOW_OUT_REPEAT: Duration = Duration::from_millis(100);
/// Demotion added for a downed interface, send errors, maintenance (FreeBSD's factors).
pub const DEMOTION_STEP: u32 = 240;

/// Why a vhid goes to INIT when the daemon stops (notify hooks tell it from a fault).
pub const SHUTDOWN_REASON: &str = "shutting down";

/// The states of carp(4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Init,
    Backup,
    Master,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Init => "INIT",
            State::Backup => "BACKUP",
            State::Master => "MASTER",
        })
    }
}

/// A vhid's configured timing and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub advbase: u8,
    pub advskew: u8,
    pub preempt: bool,
}

/// What the machine learns from an authenticated advert for its vhid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAdvert {
    pub advbase: u8,
    pub advskew: u8,
    /// The advert's IPv4 source, for ucarp's tie-break.
    pub source: Ipv4Addr,
}

/// What the I/O layer must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send an advert with these values.
    SendAdvert { advbase: u8, advskew: u8 },
    /// Add the VIPs and let the data plane answer for them.
    TakeVips,
    /// Remove the VIPs and stop the data plane answering for them.
    ReleaseVips,
    /// Send gratuitous ARP for the VIPs.
    Announce,
}

/// The advert interval of `advbase` seconds plus `advskew`/256 s (FreeBSD's `tv_usec`).
pub fn advert_interval(advbase: u8, advskew: u8) -> Duration {
    Duration::from_secs(advbase.into()) + skew_part(advskew)
}

fn skew_part(advskew: u8) -> Duration {
    Duration::from_micros(u64::from(advskew) * 1_000_000 / 256)
}

/// One vhid's machine.
#[derive(Debug)]
pub struct Vhid {
    vhid: u8,
    params: Params,
    source: Ipv4Addr,
    state: State,
    since: Instant,
    demotion: u32,
    timer: Option<Instant>,
    /// Last reassertion against a worse master; rate-limits those announcements.
    last_reassert: Option<Instant>,
    /// A tied master with a lower address was heard while we were master.
    tie: Option<Tie>,
    /// Handing over before a planned stop ([`Vhid::handle_bow_out`]): adverts are bow-outs
    /// and the VIPs are never taken again.
    bowing_out: bool,
    actions: VecDeque<Action>,
    transitions: VecDeque<Transition>,
}

/// A state change, for notify hooks and `carp events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub old: State,
    pub new: State,
    pub reason: &'static str,
}

/// A tie heard as master, and whether we have advertised since (so the peer heard us).
#[derive(Debug, Clone, Copy)]
struct Tie {
    heard: Instant,
    answered: bool,
}

impl Vhid {
    /// A vhid in INIT; it moves to BACKUP once [`Vhid::handle_link`] says the link is up.
    /// `source` is this node's own address on the vhid's interface.
    pub fn new(vhid: u8, params: Params, source: Ipv4Addr, now: Instant) -> Self {
        Self {
            vhid,
            params,
            source,
            state: State::Init,
            since: now,
            demotion: 0,
            timer: None,
            last_reassert: None,
            tie: None,
            bowing_out: false,
            actions: VecDeque::new(),
            transitions: VecDeque::new(),
        }
    }

    /// A vhid that a restarted daemon finds still held by its previous run (heartbeat
    /// fresh, VIP on the interface, XDP answering): MASTER at once, advertising now, so the
    /// peer, still inside its master-down time, stays BACKUP. The VIPs are already held.
    pub fn adopted_master(vhid: u8, params: Params, source: Ipv4Addr, now: Instant) -> Self {
        let mut v = Self::new(vhid, params, source, now);
        info!(vhid, "adopting mastership held by the previous run");
        v.state = State::Master;
        v.push_advert();
        v.timer = Some(now + v.own_interval());
        v
    }

    /// The next state change not yet taken (quinn-proto's `poll_event`).
    pub fn poll_transition(&mut self) -> Option<Transition> {
        self.transitions.pop_front()
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn vhid(&self) -> u8 {
        self.vhid
    }

    /// This node's address on the vhid's interface (the advert source).
    pub fn source(&self) -> Ipv4Addr {
        self.source
    }

    /// Whether every action has been polled.
    pub fn has_no_actions(&self) -> bool {
        self.actions.is_empty()
    }

    /// When the current state was entered.
    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn params(&self) -> Params {
        self.params
    }

    pub fn demotion(&self) -> u32 {
        self.demotion
    }

    /// The advskew put on the wire: configured skew plus demotion, capped at 240.
    pub fn effective_advskew(&self) -> u8 {
        let skew = u32::from(self.params.advskew) + self.demotion;
        skew.min(u32::from(CARP_MAXSKEW)) as u8
    }

    /// The interval this node advertises at: while bowing out, the slowest there is, so that
    /// every other master's advert beats it.
    pub fn own_interval(&self) -> Duration {
        let (advbase, advskew) = self.advertised();
        advert_interval(advbase, advskew)
    }

    /// The advbase and advskew put on the wire.
    fn advertised(&self) -> (u8, u8) {
        if self.bowing_out {
            (BOW_OUT_ADVBASE, BOW_OUT_ADVSKEW)
        } else {
            (self.params.advbase, self.effective_advskew())
        }
    }

    /// When a master sends its next advert: a bow-out is repeated, not left for 255 s.
    fn next_advert(&self, now: Instant) -> Instant {
        now + if self.bowing_out {
            BOW_OUT_REPEAT
        } else {
            self.own_interval()
        }
    }

    /// How long a backup waits without adverts: 3 x advbase + skew/256.
    pub fn master_down_interval(&self) -> Duration {
        Duration::from_secs(3 * u64::from(self.params.advbase))
            + skew_part(self.effective_advskew())
    }

    /// The next instant [`Vhid::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timer
    }

    /// The next thing the I/O layer must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The interface's link went up or down. Down: INIT (VIPs released). Up: BACKUP, never
    /// straight to MASTER.
    pub fn handle_link(&mut self, up: bool, now: Instant) {
        match (up, self.state) {
            (false, State::Backup | State::Master) => {
                self.transition(State::Init, "interface down", now)
            }
            (true, State::Init) => self.transition(State::Backup, "interface up", now),
            _ => {}
        }
    }

    /// The timer from [`Vhid::poll_timeout`] may have expired.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timer.is_none_or(|deadline| deadline > now) {
            return;
        }
        match self.state {
            State::Init => self.timer = None,
            State::Backup => self.transition(State::Master, "master down timer expired", now),
            State::Master => {
                self.push_advert();
                self.timer = Some(self.next_advert(now));
            }
        }
    }

    /// An authenticated advert for this vhid from another node.
    pub fn handle_advert(&mut self, peer: PeerAdvert, now: Instant) {
        let ours = self.own_interval();
        let theirs = advert_interval(peer.advbase, peer.advskew);
        match self.state {
            State::Init => {}
            State::Master if self.bowing_out => {
                if theirs < ours {
                    self.transition(State::Backup, "a peer took over from our bow-out", now);
                }
            }
            // Leaving: nothing brings the VIPs back.
            State::Backup if self.bowing_out => {}
            State::Master => {
                let reason = if theirs < ours {
                    Some("more frequent advertisement received")
                } else if theirs == ours && peer.source < self.source {
                    self.tie_with_a_lower_address(now)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    // ucarp: one last advert, so a winner that has not heard us since a
                    // partition healed learns of it and re-announces the VIPs.
                    self.push_advert();
                    self.transition(State::Backup, reason, now);
                } else {
                    // A worse master is out there (split brain healing): reassert the VIPs.
                    self.announce_at_most_once_per_interval(now);
                }
            }
            State::Backup => {
                let master_down = self.master_down_interval();
                if self.params.preempt && ours < theirs {
                    self.transition(State::Master, "preempting a slower master", now);
                } else if theirs > master_down {
                    self.transition(State::Master, "master will time out (bow-out)", now);
                } else {
                    self.timer = Some(now + master_down);
                }
            }
        }
    }

    /// A tie of masters. FreeBSD's master yields on every tie
    /// (<https://github.com/freebsd/freebsd-src/blob/main/sys/netinet/ip_carp.c>, `carp_input_c`,
    /// "more frequent advertisement received"); ucarp's yields to the lower address. Yielding
    /// to a lower FreeBSD at once would leave no master (both yield, then both time out
    /// together), never yielding would leave two against a lower ucarp. So we yield to the
    /// lower address only once it advertised again after hearing us: a FreeBSD peer has
    /// yielded by then and goes quiet, a ucarp or carp peer goes on and wins.
    fn tie_with_a_lower_address(&mut self, now: Instant) -> Option<&'static str> {
        // The peer's next advert is one interval after the first; allow for a lost one.
        let window = 3 * self.own_interval();
        match self.tie {
            Some(tie) if tie.answered && now.duration_since(tie.heard) <= window => {
                Some("a tied master with a lower address kept advertising after hearing us")
            }
            _ => {
                self.tie = Some(Tie {
                    heard: now,
                    answered: false,
                });
                None
            }
        }
    }

    /// The node-wide demotion changed (link loss elsewhere, send errors, maintenance). A
    /// master advertises the new skew at once so that a preempting peer can act now. A backup
    /// counts its master-down time from the same last advert, with the new skew: FreeBSD keeps
    /// the old deadline until the next advert, so a master dying just after a backup's bulk
    /// sync ended its demotion of 240 was replaced 0.55 s late.
    pub fn handle_demotion(&mut self, demotion: u32, now: Instant) {
        if demotion == self.demotion {
            return;
        }
        info!(
            vhid = self.vhid,
            old = self.demotion,
            new = demotion,
            "demotion changed"
        );
        let old_master_down = self.master_down_interval();
        self.demotion = demotion;
        self.retime(old_master_down, now);
    }

    /// The configuration changed this vhid's advbase, advskew or preemption (a reload). As
    /// for a demotion: a master advertises the new values at once, a backup counts its
    /// master-down time from the same last advert with them. Nothing else moves.
    pub fn handle_params(&mut self, params: Params, now: Instant) {
        if params == self.params {
            return;
        }
        info!(vhid = self.vhid, old = ?self.params, new = ?params, "parameters changed");
        let old_master_down = self.master_down_interval();
        self.params = params;
        self.retime(old_master_down, now);
    }

    /// After the skew or timing changed: a master advertises at once, a backup counts its
    /// master-down time from the same last advert (its deadline was `old_master_down` after
    /// it) with the new values.
    fn retime(&mut self, old_master_down: Duration, now: Instant) {
        match self.state {
            State::Master => {
                self.push_advert();
                self.timer = Some(self.next_advert(now));
            }
            State::Backup => {
                let heard = self.timer.map(|deadline| deadline - old_master_down);
                self.timer = heard.map(|heard| heard + self.master_down_interval());
            }
            State::Init => {}
        }
    }

    /// A planned stop, make before break: a master bows out (advbase 255, advskew 255) and
    /// keeps its VIPs until an advert shows the peer took over; as every advert beats a bow-out,
    /// the first one sends it to BACKUP, which releases them. Until then the bow-out is repeated
    /// every [`BOW_OUT_REPEAT`]. A backup stops counting its master-down time. The stop itself
    /// is [`Vhid::handle_shutdown`], which the daemon calls once every master has handed over or
    /// a grace has passed.
    pub fn handle_bow_out(&mut self, now: Instant) {
        if self.bowing_out {
            return;
        }
        self.bowing_out = true;
        self.tie = None;
        match self.state {
            State::Master => {
                self.push_advert();
                self.timer = Some(self.next_advert(now));
            }
            State::Backup => self.timer = None,
            State::Init => {}
        }
    }

    /// Clean shutdown: a master bows out (advbase 255, advskew 255) so the peer takes over at
    /// once, then the VIPs are released.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.state == State::Master {
            self.actions.push_back(Action::SendAdvert {
                advbase: BOW_OUT_ADVBASE,
                advskew: BOW_OUT_ADVSKEW,
            });
        }
        if self.state != State::Init {
            self.transition(State::Init, SHUTDOWN_REASON, now);
        }
    }

    fn transition(&mut self, new: State, reason: &'static str, now: Instant) {
        let old = self.state;
        info!(vhid = self.vhid, %old, %new, reason, "state change");
        self.transitions.push_back(Transition { old, new, reason });
        self.state = new;
        self.since = now;
        self.tie = None;
        if old == State::Master {
            self.actions.push_back(Action::ReleaseVips);
        }
        self.timer = match new {
            State::Init => None,
            State::Backup if self.bowing_out => None,
            State::Backup => Some(now + self.master_down_interval()),
            State::Master => {
                // carp_master_down: claim the VIPs, announce them, advertise at once. The
                // advert comes last because it is what sends a live old master (preempted,
                // or bowing out) to BACKUP: it lets go only once the VIPs are held here.
                self.actions.push_back(Action::TakeVips);
                self.actions.push_back(Action::Announce);
                self.push_advert();
                Some(now + self.own_interval())
            }
        };
    }

    fn push_advert(&mut self) {
        if let Some(tie) = &mut self.tie {
            tie.answered = true;
        }
        let (advbase, advskew) = self.advertised();
        self.actions
            .push_back(Action::SendAdvert { advbase, advskew });
    }

    fn announce_at_most_once_per_interval(&mut self, now: Instant) {
        let due = self
            .last_reassert
            .is_none_or(|last| now.duration_since(last) >= self.own_interval());
        if due {
            info!(
                vhid = self.vhid,
                "heard a worse master: reasserting the VIPs"
            );
            self.actions.push_back(Action::Announce);
            self.last_reassert = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const LOWER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    const HIGHER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);

    fn params(advskew: u8, preempt: bool) -> Params {
        Params {
            advbase: 1,
            advskew,
            preempt,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(v: &mut Vhid) -> Vec<Action> {
        std::iter::from_fn(|| v.poll_action()).collect()
    }

    /// A vhid that went INIT -> BACKUP at `t0`.
    fn backup(advskew: u8, preempt: bool, t0: Instant) -> Vhid {
        let mut v = Vhid::new(1, params(advskew, preempt), ME, t0);
        v.handle_link(true, t0);
        assert_eq!(v.state(), State::Backup);
        assert!(drain(&mut v).is_empty());
        v
    }

    /// A vhid that became master through its master-down timer; returns when that was.
    fn master(advskew: u8, preempt: bool, t0: Instant) -> (Vhid, Instant) {
        let mut v = backup(advskew, preempt, t0);
        let at = v.poll_timeout().unwrap();
        v.handle_timeout(at);
        assert_eq!(v.state(), State::Master);
        drain(&mut v);
        (v, at)
    }

    fn advert(advskew: u8, source: Ipv4Addr) -> PeerAdvert {
        PeerAdvert {
            advbase: 1,
            advskew,
            source,
        }
    }

    #[test]
    fn every_state_change_is_reported_once_with_its_reason() {
        let t0 = Instant::now();
        let mut v = Vhid::new(1, params(0, true), ME, t0);
        v.handle_link(true, t0);
        let at = v.poll_timeout().unwrap();
        v.handle_timeout(at);
        v.handle_advert(advert(0, LOWER), at + ms(10));
        v.handle_link(false, at + ms(20));
        let seen: Vec<Transition> = std::iter::from_fn(|| v.poll_transition()).collect();
        let expected = [
            (State::Init, State::Backup, "interface up"),
            (State::Backup, State::Master, "master down timer expired"),
            (State::Master, State::Init, "interface down"),
        ];
        let seen: Vec<(State, State, &str)> =
            seen.iter().map(|t| (t.old, t.new, t.reason)).collect();
        assert_eq!(seen, expected, "a tie heard once is no change");
        assert_eq!(v.poll_transition(), None);
    }

    #[test]
    fn an_adopted_master_advertises_at_once_and_keeps_the_vips_it_holds() {
        let t0 = Instant::now();
        let mut v = Vhid::adopted_master(1, params(0, true), ME, t0);
        assert_eq!(v.state(), State::Master);
        assert_eq!(
            drain(&mut v),
            vec![Action::SendAdvert {
                advbase: 1,
                advskew: 0
            }],
            "no TakeVips: they are held"
        );
        assert_eq!(v.poll_timeout(), Some(t0 + ms(1000)));
        // Link up changes nothing; a better master still wins as usual.
        v.handle_link(true, t0);
        assert_eq!(v.state(), State::Master);
        v.handle_advert(advert(0, LOWER), t0 + ms(10));
        v.handle_timeout(t0 + ms(1000));
        v.handle_advert(advert(0, LOWER), t0 + ms(1010));
        assert_eq!(v.state(), State::Backup);
        assert!(drain(&mut v).contains(&Action::ReleaseVips));
    }

    #[test]
    fn new_parameters_are_advertised_by_a_master_and_recounted_by_a_backup() {
        let t0 = Instant::now();
        let (mut m, at) = master(0, true, t0);
        m.handle_params(params(0, true), at);
        assert!(drain(&mut m).is_empty(), "unchanged: nothing");
        m.handle_params(params(50, true), at + ms(10));
        assert_eq!(
            drain(&mut m),
            vec![Action::SendAdvert {
                advbase: 1,
                advskew: 50
            }]
        );
        assert_eq!(m.state(), State::Master, "no transition");
        let mut b = backup(100, true, t0);
        // Heard at t0 (the timer's start): 3 s + 100/256 s; now 50/256 s from the same advert.
        b.handle_params(params(50, true), t0 + ms(500));
        assert_eq!(
            b.poll_timeout(),
            Some(t0 + Duration::from_micros(3_195_312))
        );
        assert_eq!(b.state(), State::Backup);
        assert!(drain(&mut b).is_empty());
    }

    #[test]
    fn init_waits_for_link_and_never_goes_straight_to_master() {
        let t0 = Instant::now();
        let mut v = Vhid::new(1, params(0, true), ME, t0);
        assert_eq!(v.poll_timeout(), None);
        v.handle_advert(advert(200, LOWER), t0);
        v.handle_timeout(t0 + ms(10_000));
        assert_eq!(v.state(), State::Init);
        v.handle_link(true, t0);
        assert_eq!(v.state(), State::Backup);
    }

    #[test]
    fn master_down_timer_is_three_advbase_plus_skew() {
        let t0 = Instant::now();
        let mut v = backup(100, false, t0);
        // 3 s + 100/256 s = 3.390625 s
        assert_eq!(
            v.poll_timeout(),
            Some(t0 + Duration::from_micros(3_390_625))
        );
        v.handle_timeout(t0 + ms(3_390));
        assert_eq!(v.state(), State::Backup, "not yet");
        v.handle_timeout(t0 + Duration::from_micros(3_390_625));
        assert_eq!(v.state(), State::Master);
        assert_eq!(
            drain(&mut v),
            vec![
                Action::TakeVips,
                Action::Announce,
                Action::SendAdvert {
                    advbase: 1,
                    advskew: 100
                }
            ]
        );
    }

    #[test]
    fn a_backup_recounts_master_down_from_the_last_advert_when_its_demotion_changes() {
        let t0 = Instant::now();
        let mut v = backup(100, false, t0);
        v.handle_demotion(240, t0);
        v.handle_advert(advert(0, LOWER), t0 + ms(1000));
        // Demoted: 3 s + 240/256 s after the advert.
        assert_eq!(
            v.poll_timeout(),
            Some(t0 + ms(1000) + Duration::from_micros(3_937_500))
        );
        // The bulk sync ends the demotion; the master dies before its next advert.
        v.handle_demotion(0, t0 + ms(1200));
        let due = t0 + ms(1000) + Duration::from_micros(3_390_625);
        assert_eq!(v.poll_timeout(), Some(due));
        v.handle_timeout(due);
        assert_eq!(v.state(), State::Master);
        // A demotion that comes later than the new deadline makes the backup act at once.
        let mut late = backup(100, false, t0);
        late.handle_advert(advert(0, LOWER), t0);
        late.handle_demotion(240, t0 + ms(3_500));
        assert_eq!(
            late.poll_timeout(),
            Some(t0 + Duration::from_micros(3_937_500)),
            "a raised demotion pushes the deadline out"
        );
        late.handle_demotion(0, t0 + ms(3_500));
        assert!(late.poll_timeout().unwrap() <= t0 + ms(3_500));
        late.handle_timeout(t0 + ms(3_500));
        assert_eq!(late.state(), State::Master);
    }

    #[test]
    fn adverts_from_a_faster_master_keep_a_backup_waiting() {
        let t0 = Instant::now();
        let mut v = backup(100, true, t0);
        for i in 1..10 {
            v.handle_advert(advert(0, LOWER), t0 + ms(i * 1000));
            v.handle_timeout(t0 + ms(i * 1000 + 500));
        }
        assert_eq!(v.state(), State::Backup);
        assert_eq!(
            v.poll_timeout(),
            Some(t0 + ms(9000) + v.master_down_interval())
        );
    }

    #[test]
    fn master_advertises_every_interval() {
        let t0 = Instant::now();
        let (mut v, at) = master(64, false, t0);
        let interval = advert_interval(1, 64);
        assert_eq!(v.poll_timeout(), Some(at + interval));
        v.handle_timeout(at + interval);
        assert_eq!(
            drain(&mut v),
            vec![Action::SendAdvert {
                advbase: 1,
                advskew: 64
            }]
        );
        assert_eq!(v.poll_timeout(), Some(at + interval * 2));
    }

    #[test]
    fn master_yields_to_more_frequent_advert() {
        let t0 = Instant::now();
        let (mut v, at) = master(100, false, t0);
        v.handle_advert(advert(0, HIGHER), at + ms(5));
        assert_eq!(v.state(), State::Backup);
        assert_eq!(
            drain(&mut v),
            vec![
                Action::SendAdvert {
                    advbase: 1,
                    advskew: 100
                },
                Action::ReleaseVips
            ],
            "a last advert tells the winner to reassert"
        );
    }

    #[test]
    fn tie_goes_to_a_lower_address_that_advertises_again_after_hearing_us() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        v.handle_advert(advert(0, HIGHER), at + ms(5));
        assert_eq!(v.state(), State::Master, "we have the lower address");
        assert_eq!(drain(&mut v), vec![Action::Announce], "winner reasserts");
        v.handle_advert(advert(0, LOWER), at + ms(10));
        assert_eq!(v.state(), State::Master, "the peer has not heard us yet");
        v.handle_timeout(v.poll_timeout().unwrap());
        assert!(matches!(drain(&mut v)[..], [Action::SendAdvert { .. }]));
        v.handle_advert(advert(0, LOWER), at + ms(1010));
        assert_eq!(v.state(), State::Backup, "it heard us and stayed master");
    }

    #[test]
    fn a_tie_long_ago_does_not_count_as_answered() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        v.handle_advert(advert(0, LOWER), at + ms(10));
        v.handle_timeout(v.poll_timeout().unwrap());
        // The peer yielded (FreeBSD) and comes back much later: heard afresh, not yielded to.
        v.handle_advert(advert(0, LOWER), at + ms(60_000));
        assert_eq!(v.state(), State::Master);
    }

    /// How a peer's master treats a tie: FreeBSD yields always, ucarp to a lower source.
    #[derive(Debug, Clone, Copy)]
    enum TieRule {
        FreeBsd,
        Ucarp,
    }

    /// A peer of the same advbase and advskew that follows `rule` as master and carp(4)'s
    /// backup rules otherwise (master-down timer, reset by every advert).
    struct ModelPeer {
        rule: TieRule,
        source: Ipv4Addr,
        master: bool,
        /// The next advert as master, or the master-down deadline as backup.
        next: Instant,
    }

    impl ModelPeer {
        fn hear(&mut self, from: Ipv4Addr, now: Instant) {
            let yields = match self.rule {
                TieRule::FreeBsd => true,
                TieRule::Ucarp => from < self.source,
            };
            if !self.master || yields {
                self.master = false;
                self.next = now + ms(3000);
            }
        }

        /// Whether the peer advertises at `now` (becoming master when its timer runs out).
        fn poll(&mut self, now: Instant) -> bool {
            if now < self.next {
                return false;
            }
            self.master = true;
            self.next = now + ms(1000);
            true
        }
    }

    /// Both masters after a partition, then 30 s hearing each other with 1 ms latency:
    /// whether there was exactly one master throughout the last 20 s.
    fn one_master_after_a_tie(rule: TieRule, peer_source: Ipv4Addr, offset: Duration) -> bool {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        let mut peer = ModelPeer {
            rule,
            source: peer_source,
            master: true,
            next: at + offset,
        };
        let latency = ms(1);
        let mut to_peer: VecDeque<Instant> = VecDeque::new();
        let mut to_us: VecDeque<Instant> = VecDeque::new();
        let mut stable_since = at;
        let mut now = at;
        while now < at + ms(30_000) {
            if v.poll_timeout().is_some_and(|t| t <= now) {
                v.handle_timeout(now);
            }
            if peer.poll(now) {
                to_us.push_back(now + latency);
            }
            while to_us.front().is_some_and(|t| *t <= now) {
                to_us.pop_front();
                v.handle_advert(advert(0, peer.source), now);
            }
            for action in drain(&mut v) {
                if matches!(action, Action::SendAdvert { .. }) {
                    to_peer.push_back(now + latency);
                }
            }
            while to_peer.front().is_some_and(|t| *t <= now) {
                to_peer.pop_front();
                peer.hear(ME, now);
            }
            let masters = u8::from(v.state() == State::Master) + u8::from(peer.master);
            if masters != 1 {
                stable_since = now;
            }
            now += ms(1);
        }
        now.duration_since(stable_since) >= ms(20_000)
    }

    #[test]
    fn ties_leave_exactly_one_master_against_freebsd_and_ucarp() {
        for rule in [TieRule::FreeBsd, TieRule::Ucarp] {
            for peer in [LOWER, HIGHER] {
                for offset in [ms(0), ms(300), ms(999)] {
                    assert!(
                        one_master_after_a_tie(rule, peer, offset),
                        "{rule:?} peer at {peer}, its adverts {offset:?} after ours"
                    );
                }
            }
        }
    }

    #[test]
    fn winner_announces_at_most_once_per_interval() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        v.handle_advert(advert(50, HIGHER), at + ms(1500));
        v.handle_advert(advert(50, HIGHER), at + ms(1600));
        assert_eq!(drain(&mut v), vec![Action::Announce]);
        v.handle_advert(advert(50, HIGHER), at + ms(2600));
        assert_eq!(drain(&mut v), vec![Action::Announce]);
    }

    #[test]
    fn split_brain_heals_to_exactly_one_master() {
        let t0 = Instant::now();
        let (mut a, at) = master(0, true, t0);
        let mut b = Vhid::new(1, params(0, true), HIGHER, t0);
        b.handle_link(true, t0);
        b.handle_timeout(b.poll_timeout().unwrap());
        drain(&mut b);
        assert_eq!((a.state(), b.state()), (State::Master, State::Master));
        // They hear each other again: b first learns of the tie, advertises, and yields
        // once a (lower) advertises after hearing it.
        let now = at + ms(100);
        a.handle_advert(advert(0, HIGHER), now);
        b.handle_advert(advert(0, ME), now);
        assert_eq!((a.state(), b.state()), (State::Master, State::Master));
        assert_eq!(drain(&mut a), vec![Action::Announce], "a reasserts");
        b.handle_timeout(b.poll_timeout().unwrap());
        drain(&mut b);
        a.handle_timeout(a.poll_timeout().unwrap());
        let now = a.poll_timeout().unwrap() - ms(1);
        a.handle_advert(advert(0, HIGHER), now);
        b.handle_advert(advert(0, ME), now);
        assert_eq!((a.state(), b.state()), (State::Master, State::Backup));
        assert!(matches!(
            drain(&mut a)[..],
            [Action::SendAdvert { .. }, Action::Announce]
        ));
        assert_eq!(
            drain(&mut b),
            vec![
                Action::SendAdvert {
                    advbase: 1,
                    advskew: 0
                },
                Action::ReleaseVips
            ]
        );
    }

    #[test]
    fn preempting_backup_takes_over_a_slower_master() {
        let t0 = Instant::now();
        let mut v = backup(0, true, t0);
        v.handle_advert(advert(100, HIGHER), t0 + ms(100));
        assert_eq!(v.state(), State::Master);
    }

    #[test]
    fn backup_without_preempt_leaves_a_slower_master_alone() {
        let t0 = Instant::now();
        let mut v = backup(0, false, t0);
        v.handle_advert(advert(100, HIGHER), t0 + ms(100));
        assert_eq!(v.state(), State::Backup);
    }

    #[test]
    fn equal_skew_does_not_preempt() {
        let t0 = Instant::now();
        let mut v = backup(0, true, t0);
        v.handle_advert(advert(0, HIGHER), t0 + ms(100));
        assert_eq!(v.state(), State::Backup);
    }

    #[test]
    fn bow_out_advert_makes_backup_take_over_at_once_even_without_preempt() {
        let t0 = Instant::now();
        let mut v = backup(100, false, t0);
        let bow_out = PeerAdvert {
            advbase: BOW_OUT_ADVBASE,
            advskew: BOW_OUT_ADVSKEW,
            source: LOWER,
        };
        v.handle_advert(bow_out, t0 + ms(100));
        assert_eq!(v.state(), State::Master);
        assert_eq!(v.since(), t0 + ms(100));
    }

    #[test]
    fn shutdown_of_master_bows_out_then_releases() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        v.handle_shutdown(at + ms(1));
        assert_eq!(v.state(), State::Init);
        assert_eq!(
            drain(&mut v),
            vec![
                Action::SendAdvert {
                    advbase: 255,
                    advskew: 255
                },
                Action::ReleaseVips
            ]
        );
        assert_eq!(v.poll_timeout(), None);
    }

    const BOW_OUT: Action = Action::SendAdvert {
        advbase: BOW_OUT_ADVBASE,
        advskew: BOW_OUT_ADVSKEW,
    };

    #[test]
    fn bowing_out_master_keeps_its_vips_until_the_peer_takes_over() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        drain(&mut v);
        while v.poll_transition().is_some() {}
        v.handle_bow_out(at);
        assert_eq!(v.state(), State::Master);
        assert_eq!(drain(&mut v), vec![BOW_OUT]);
        // A lost bow-out is repeated, not left to the peer's master-down time.
        assert_eq!(v.poll_timeout(), Some(at + BOW_OUT_REPEAT));
        v.handle_timeout(at + BOW_OUT_REPEAT);
        assert_eq!(drain(&mut v), vec![BOW_OUT]);
        assert_eq!(v.state(), State::Master);
        // The peer took over: its advert (skew 240 here) beats a bow-out.
        v.handle_advert(advert(240, HIGHER), at + ms(150));
        assert_eq!(v.state(), State::Backup);
        assert_eq!(drain(&mut v), vec![Action::ReleaseVips]);
        assert_eq!(
            v.poll_transition().map(|t| t.reason),
            Some("a peer took over from our bow-out")
        );
        // Leaving: no master-down timer, and no advert brings the VIPs back.
        assert_eq!(v.poll_timeout(), None);
        v.handle_advert(
            PeerAdvert {
                advbase: BOW_OUT_ADVBASE,
                advskew: BOW_OUT_ADVSKEW,
                source: HIGHER,
            },
            at + ms(200),
        );
        assert_eq!(v.state(), State::Backup);
        v.handle_shutdown(at + ms(300));
        assert_eq!(v.state(), State::Init);
        assert!(drain(&mut v).is_empty());
        assert_eq!(v.poll_transition().map(|t| t.reason), Some(SHUTDOWN_REASON));
    }

    /// Two machines wired together, each carrying out its actions in order, where a peer
    /// reacts to an advert before its sender goes on (the worst case). Asserts after every
    /// action that some machine holds the VIPs; returns who holds them at the end.
    fn run_pair(
        nodes: &mut [Vhid; 2],
        sources: [Ipv4Addr; 2],
        from: usize,
        at: Instant,
    ) -> [bool; 2] {
        fn carry_out(
            nodes: &mut [Vhid; 2],
            sources: [Ipv4Addr; 2],
            holds: &mut [bool; 2],
            i: usize,
            at: Instant,
        ) {
            while let Some(action) = nodes[i].poll_action() {
                match action {
                    Action::TakeVips => holds[i] = true,
                    Action::ReleaseVips => holds[i] = false,
                    Action::Announce => {}
                    Action::SendAdvert { advbase, advskew } => {
                        let advert = PeerAdvert {
                            advbase,
                            advskew,
                            source: sources[i],
                        };
                        nodes[1 - i].handle_advert(advert, at);
                        carry_out(nodes, sources, holds, 1 - i, at);
                    }
                }
                assert!(
                    holds.iter().any(|h| *h),
                    "nobody holds the VIPs after {action:?}"
                );
            }
        }
        let mut holds = nodes.each_ref().map(|n| n.state() == State::Master);
        carry_out(nodes, sources, &mut holds, from, at);
        holds
    }

    #[test]
    fn a_bow_out_hands_over_without_a_moment_when_nobody_holds_the_vips() {
        let t0 = Instant::now();
        let (old, at) = master(0, false, t0);
        let mut nodes = [old, backup(100, false, t0)];
        nodes[0].handle_bow_out(at);
        let holds = run_pair(&mut nodes, [ME, HIGHER], 0, at);
        assert_eq!(holds, [false, true]);
        assert_eq!(
            nodes.each_ref().map(Vhid::state),
            [State::Backup, State::Master]
        );
    }

    #[test]
    fn bowing_out_master_stays_a_bow_out_through_demotion_and_reload() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        drain(&mut v);
        v.handle_bow_out(at);
        v.handle_demotion(DEMOTION_STEP, at + ms(10));
        v.handle_params(params(50, true), at + ms(20));
        assert_eq!(drain(&mut v), vec![BOW_OUT, BOW_OUT, BOW_OUT]);
        assert_eq!(v.poll_timeout(), Some(at + ms(20) + BOW_OUT_REPEAT));
        // Nobody answered within the daemon's grace: the stop releases the VIPs anyway.
        v.handle_shutdown(at + ms(500));
        assert_eq!(drain(&mut v), vec![BOW_OUT, Action::ReleaseVips]);
    }

    #[test]
    fn bowing_out_backup_never_takes_over() {
        let t0 = Instant::now();
        let mut v = backup(0, true, t0);
        v.handle_bow_out(t0 + ms(10));
        assert_eq!(v.poll_timeout(), None);
        // Neither a slower master nor a peer's own bow-out brings it in.
        v.handle_advert(advert(200, HIGHER), t0 + ms(20));
        v.handle_advert(
            PeerAdvert {
                advbase: BOW_OUT_ADVBASE,
                advskew: BOW_OUT_ADVSKEW,
                source: HIGHER,
            },
            t0 + ms(30),
        );
        v.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(v.state(), State::Backup);
        assert!(drain(&mut v).is_empty());
    }

    #[test]
    fn shutdown_of_backup_sends_nothing() {
        let t0 = Instant::now();
        let mut v = backup(0, false, t0);
        v.handle_shutdown(t0);
        assert!(drain(&mut v).is_empty());
    }

    #[test]
    fn demotion_is_added_to_skew_capped_and_advertised_at_once() {
        let t0 = Instant::now();
        let (mut v, at) = master(10, false, t0);
        v.handle_demotion(DEMOTION_STEP, at + ms(200));
        assert_eq!(v.effective_advskew(), 240);
        assert_eq!(
            drain(&mut v),
            vec![Action::SendAdvert {
                advbase: 1,
                advskew: 240
            }]
        );
        // A preempting peer with skew 100 now takes over; we yield to its advert.
        v.handle_advert(advert(100, HIGHER), at + ms(210));
        assert_eq!(v.state(), State::Backup);
        v.handle_demotion(0, at + ms(300));
        assert_eq!(v.effective_advskew(), 10);
    }

    #[test]
    fn demoted_backup_waits_longer_and_preempts_no_one() {
        let t0 = Instant::now();
        let mut v = backup(0, true, t0);
        v.handle_demotion(DEMOTION_STEP, t0);
        v.handle_advert(advert(100, HIGHER), t0 + ms(10));
        assert_eq!(v.state(), State::Backup);
        assert_eq!(
            v.poll_timeout(),
            Some(t0 + ms(10) + Duration::from_secs(3) + skew_part(240))
        );
    }

    #[test]
    fn link_down_releases_and_link_up_returns_to_backup() {
        let t0 = Instant::now();
        let (mut v, at) = master(0, false, t0);
        v.handle_link(false, at + ms(1));
        assert_eq!(v.state(), State::Init);
        assert_eq!(drain(&mut v), vec![Action::ReleaseVips]);
        assert_eq!(v.poll_timeout(), None);
        v.handle_link(true, at + ms(2));
        assert_eq!(v.state(), State::Backup);
        assert!(drain(&mut v).is_empty());
    }

    #[test]
    fn early_timeout_call_is_ignored() {
        let t0 = Instant::now();
        let mut v = backup(0, false, t0);
        v.handle_timeout(t0 + ms(1));
        assert_eq!(v.state(), State::Backup);
    }
}
