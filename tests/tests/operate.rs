//! What operators hook into, in the namespace lab: notify hooks run on each transition with
//! the documented environment, a hook that hangs does not hold up the takeover, `carp
//! events` streams the transitions, and the metrics endpoint's state series follow a
//! failover. Needs root.

use anyhow::{Context, Result};
use carp::{carp::fsm::State, events::Event};
use carp_lab::{
    Host, Lab, NodeOptions, carp_bin,
    cluster::{backup_opts, wait_all, wait_state},
    end_process, kill_hard, wait_for,
};
use std::time::{Duration, Instant};

#[test]
fn notify_hooks_events_and_metrics_follow_a_takeover_and_a_hanging_hook_delays_nothing()
-> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let envs = lab.dir.join("hook-env");
    std::fs::create_dir_all(&envs)?;
    // Each run of the hook leaves its environment in a file of its own, renamed into
    // place once written so a reader never sees it half done.
    let recorder = format!(
        "env | grep ^CARP_ | sort > {dir}/.part-$$ && mv {dir}/.part-$$ {dir}/$CARP_VHID-$CARP_NEW_STATE-$$",
        dir = envs.display()
    );
    let hooks = format!(
        "\n[[notify]]\non = [\"master\", \"backup\", \"fault\", \"stop\"]\nexec = [\"/bin/sh\", \"-c\", {recorder:?}]\n\
         \n[[notify]]\non = [\"master\"]\nexec = [\"/bin/sleep\", \"60\"]\ntimeout = 30\n\
         \n[metrics]\nlisten = \"127.0.0.1:9721\"\n"
    );
    // A scrape from inside gw2's namespace, where the endpoint listens.
    let scrape = |lab: &Lab| -> String {
        lab.output(
            Host::Gw2,
            &[
                "bash",
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/9721 && printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3 && cat <&3",
            ],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    };
    let series = |state: &str| {
        format!(
            "carp_vip_state{{vhid=\"1\",interface=\"lan\",vip=\"198.18.1.1/24\",state=\"{state}\"}} 1"
        )
    };
    let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    let gw2 = lab.start_carp(
        &bin,
        Host::Gw2,
        &NodeOptions {
            extra: hooks,
            ..backup_opts()
        },
    )?;
    wait_state(&gw2, 1, State::Backup, Duration::from_secs(10))?;
    wait_state(&gw2, 2, State::Backup, Duration::from_secs(10))?;
    let recorded = |prefix: &str| -> Vec<String> {
        std::fs::read_dir(&envs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(5), || {
        (recorded("1-BACKUP").len() == 1).then_some(())
    })
    .context("no backup hook for vhid 1")?;
    let before = scrape(&lab);
    assert!(before.starts_with("HTTP/1.1 200 OK"), "{before}");
    assert!(before.lines().any(|l| l == series("BACKUP")), "{before}");

    // `carp events` follows gw2 from here.
    let events_log = lab.dir.join("events.jsonl");
    let follower = std::process::Command::new(&bin)
        .args([
            "events",
            "--json",
            "--socket",
            &gw2.socket.to_string_lossy(),
        ])
        .stdout(std::fs::File::create(&events_log)?)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));

    let killed = Instant::now();
    kill_hard(gw1.pid);
    wait_state(&gw2, 1, State::Master, Duration::from_secs(6))?;
    wait_state(&gw2, 2, State::Master, Duration::from_secs(1))?;
    let took = killed.elapsed();
    // Master down: 3 x advbase + 100/256 s; the status poll adds up to 100 ms. Both VIPs'
    // hooks (each starting a 60 s sleep) did not hold the second VIP up.
    let bound = Duration::from_millis(3000 + 391 + 300);
    eprintln!("takeover with a hanging master hook: {took:?} (bound {bound:?})");
    assert!(took <= bound, "takeover took {took:?}");

    let env = wait_for(Duration::from_secs(5), || recorded("1-MASTER").pop())
        .context("no master hook for vhid 1")?;
    let expected = format!(
        "CARP_INTERFACE=lan\nCARP_NEW_STATE=MASTER\nCARP_NODE={}\nCARP_OLD_STATE=BACKUP\n\
         CARP_REASON=master down timer expired\nCARP_VHID=1\nCARP_VIP=198.18.1.1/24\n",
        gw2.name
    );
    assert_eq!(env, expected);
    wait_for(Duration::from_secs(5), || recorded("2-MASTER").pop())
        .context("no master hook for vhid 2")?;
    let after = scrape(&lab);
    assert!(after.lines().any(|l| l == series("MASTER")), "{after}");
    assert!(
        after.lines().any(|l| l
            .starts_with("carp_vip_transitions_total{vhid=\"1\",interface=\"lan\"")
            && l.ends_with(" 2")),
        "INIT -> BACKUP -> MASTER: {after}"
    );

    let transitions = || -> Vec<Event> {
        std::fs::read_to_string(&events_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let seen = wait_for(Duration::from_secs(2), || {
        let all = transitions();
        (all.len() >= 2).then_some(all)
    })
    .with_context(|| format!("events: {:?}", transitions()))?;
    let json: Vec<serde_json::Value> = seen
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or_default())
        .collect();
    assert!(
        json.iter().any(|e| e["event"] == "transition"
            && e["vhid"] == 1
            && e["old"] == "BACKUP"
            && e["new"] == "MASTER"),
        "{json:?}"
    );
    end_process(follower.id(), Duration::from_secs(1));
    // The hanging hooks are still running (they would be killed after 30 s); stopping
    // the daemon runs the stop hooks and the counters show no failure yet.
    assert_eq!(gw2.status()?.counters.notify_failures, 0);
    end_process(gw2.pid, Duration::from_secs(5));
    wait_for(Duration::from_secs(5), || {
        (!recorded("1-INIT").is_empty()).then_some(())
    })
    .context("no stop hook")?;
    Ok(())
}
