//! `cargo xtask`: set-up, build, lab, demo, tests and benchmarks for carp.

mod package;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian packages, the nightly's rust-src, bpf-linker.
    Setup,
    /// Build carp and attach its XDP program to an interface for inspection with bpftool.
    BuildAndLoad {
        #[arg(long)]
        iface: String,
    },
    /// Build (`up`) or remove (`down`) the namespace lab.
    Lab { action: LabAction },
    /// Two gateways, client traffic through the VIP, the master killed: the takeover shown.
    Demo,
    /// Every test: unit, BPF_PROG_TEST_RUN and namespace tests (needs root).
    Test,
    /// Failover times and XDP cost, against ucarp, keepalived and a bare XDP program.
    Bench {
        /// Exit non-zero when a target is not met.
        #[arg(long)]
        check: bool,
    },
    /// The Debian package (target/package/carp_<version>_<arch>.deb).
    Package {
        /// Also unpack it into a scratch root and run it from there (needs root).
        #[arg(long)]
        check: bool,
    },
    /// Random faults over the lab under traffic, invariants checked throughout (needs root).
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Repeats an earlier run's draws.
        #[arg(long)]
        seed: Option<u64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LabAction {
    Up,
    Down,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::ensure(),
        Task::BuildAndLoad { iface } => {
            setup::ensure()?;
            build(Profile::Debug)?;
            lab_tool(&root, &["load", "--iface", &iface])
        }
        Task::Lab { action } => {
            setup::ensure()?;
            build(Profile::Debug)?;
            lab_tool(
                &root,
                &[match action {
                    LabAction::Up => "up",
                    LabAction::Down => "down",
                }],
            )
        }
        Task::Demo => {
            setup::ensure()?;
            build(Profile::Debug)?;
            lab_tool(&root, &["demo"])
        }
        Task::Test => {
            setup::ensure()?;
            build(Profile::Debug)?;
            test(&root)
        }
        Task::Soak { minutes, seed } => {
            setup::ensure()?;
            build(Profile::Debug)?;
            let minutes = minutes.to_string();
            let mut args = vec!["soak", "--minutes", &minutes];
            let seed = seed.map(|s| s.to_string());
            if let Some(seed) = &seed {
                args.extend(["--seed", seed]);
            }
            lab_tool(&root, &args)
        }
        Task::Package { check } => {
            setup::ensure()?;
            build(Profile::Release)?;
            let deb = package::build_deb(&root)?;
            if check {
                package::check_deb(&root, &deb)?;
            }
            Ok(())
        }
        Task::Bench { check } => {
            setup::ensure()?;
            // Figures of optimised code: the daemon and the bench's own protocol sender.
            build(Profile::Release)?;
            let args: &[&str] = if check {
                &["bench", "--check"]
            } else {
                &["bench"]
            };
            lab_tool_in(&root, Profile::Release, args)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask lives in the workspace")?
        .to_owned())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "target/debug",
            Profile::Release => "target/release",
        }
    }
}

/// Builds the daemon and the lab tools (the XDP object with them, through aya-build).
fn build(profile: Profile) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "-p", "carp-user", "-p", "carp-tests"]);
    if profile == Profile::Release {
        step("building carp and the lab tools, optimised (a few minutes the first time)");
        cmd.arg("--release");
    } else {
        step("building carp and the lab tools");
    }
    run(&mut cmd)
}

fn lab_tool(root: &Path, args: &[&str]) -> Result<()> {
    lab_tool_in(root, Profile::Debug, args)
}

fn lab_tool_in(root: &Path, profile: Profile, args: &[&str]) -> Result<()> {
    run(Command::new(root.join(profile.dir()).join("carp-lab"))
        .args(args)
        .envs(binaries(root, profile)))
}

/// Where the tests find the binaries a build of `profile` made.
fn binaries(root: &Path, profile: Profile) -> [(&'static str, PathBuf); 3] {
    let dir = root.join(profile.dir());
    [
        ("CARP_BIN", dir.join("carp")),
        ("CARP_PROBE_BIN", dir.join("carp-probe")),
        ("CARP_TRAFFIC_BIN", dir.join("carp-traffic")),
    ]
}

fn test(root: &Path) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "`cargo xtask test` needs root: the XDP and namespace tests load programs and build namespaces"
        );
    }
    step("rustfmt and clippy");
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "carp-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "carp-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut total = Tally::default();
    step("unit and BPF_PROG_TEST_RUN tests");
    let unit = run_tests(
        Command::new("cargo")
            .args([
                "test",
                "--workspace",
                "--exclude",
                "carp-ebpf",
                "--exclude",
                "carp-tests",
            ])
            .envs(binaries(root, Profile::Debug)),
        &mut total,
    );
    // One namespace test at a time: they time failovers, which two cores shared by
    // parallel labs would blur.
    step("namespace tests (one at a time)");
    let namespaces = run_tests(
        Command::new("cargo")
            .args(["test", "-p", "carp-tests", "--", "--test-threads=1"])
            .envs(binaries(root, Profile::Debug)),
        &mut total,
    );
    step(&format!(
        "fuzzing the decoders, {FUZZ_SECONDS} s per target"
    ));
    let fuzz = FUZZ_TARGETS.iter().try_for_each(|target| {
        run(Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={FUZZ_SECONDS}")))
    });
    step("the Debian package: built, unpacked into a scratch root, run from there");
    let packaged = build(Profile::Release)
        .and_then(|()| package::build_deb(root))
        .and_then(|deb| package::check_deb(root, &deb));
    match &packaged {
        Ok(()) => total.passed += 1,
        Err(e) => {
            total.failed += 1;
            total.failures.push(format!("package: {e:#}"));
        }
    }
    step(&format!("chaos soak, {SOAK_MINUTES} minutes"));
    let soak = lab_tool(root, &["soak", "--minutes", &SOAK_MINUTES.to_string()]);
    match &soak {
        Ok(()) => total.passed += 1,
        Err(e) => {
            total.failed += 1;
            total.failures.push(format!("chaos soak: {e:#}"));
        }
    }
    // CI shows only the end of a long log: repeat what failed where it will be seen.
    for block in &total.failures {
        println!("\n{block}");
    }
    println!(
        "\nxtask test: {} passed, {} failed",
        total.passed, total.failed
    );
    unit.and(namespaces).and(fuzz).and(packaged).and(soak)
}

/// How long `cargo xtask test` runs the chaos soak.
const SOAK_MINUTES: u32 = 2;

/// The cargo-fuzz targets under fuzz/ and how long each runs in `cargo xtask test`.
const FUZZ_TARGETS: [&str; 5] = [
    "advert",
    "config",
    "config_areas",
    "sync_frame",
    "conntrack_answers",
];
const FUZZ_SECONDS: u32 = 20;

/// Passed and failed test counts summed over cargo's `test result:` lines, and the end of
/// each `failures:` report.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
    /// The `failures:` report being read, up to its `test result:` line.
    report: Option<Vec<String>>,
}

impl Tally {
    /// Takes one line of `cargo test`'s output.
    fn take(&mut self, line: String) {
        if let Some((passed, failed)) = parse_test_result(&line) {
            self.passed += passed;
            self.failed += failed;
            if let Some(lines) = self.report.take() {
                let kept = &lines[lines.len().saturating_sub(FAILURE_LINES_KEPT)..];
                self.failures.push(kept.join("\n"));
            }
            return;
        }
        if line == "failures:" && self.report.is_none() {
            self.report = Some(Vec::new());
        }
        if let Some(lines) = self.report.as_mut() {
            lines.push(line);
        }
    }
}

/// Lines of a failure report kept for the summary: the panic and the failed tests' names.
const FAILURE_LINES_KEPT: usize = 60;

/// Runs a `cargo test`, echoing its output and adding its results to `total`.
fn run_tests(cmd: &mut Command, total: &mut Tally) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        total.take(line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// (passed, failed) of a `test result: ok. 45 passed; 0 failed; ...` line.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((count(" passed"), count(" failed")))
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Prints a progress line for a long step.
pub fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs `cmd`, output shown; fails when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{FAILURE_LINES_KEPT, Tally, parse_test_result};

    #[test]
    fn failure_reports_are_kept_for_the_summary() {
        let mut total = Tally::default();
        let noise = (0..100).map(|i| format!("lab line {i}"));
        let output = [
            "running 2 tests",
            "test a ... ok",
            "test b ... FAILED",
            "",
            "failures:",
        ]
        .map(String::from)
        .into_iter()
        .chain(noise)
        .chain(
            [
                "thread 'b' panicked at x.rs:1:1:",
                "flows lost",
                "",
                "failures:",
                "    b",
                "",
            ]
            .map(String::from),
        )
        .chain(["test result: FAILED. 1 passed; 1 failed; 0 ignored".into()])
        .chain(["test result: ok. 3 passed; 0 failed".into()]);
        for line in output {
            total.take(line);
        }
        assert_eq!((total.passed, total.failed), (4, 1));
        assert_eq!(total.failures.len(), 1);
        let kept: Vec<&str> = total.failures[0].split('\n').collect();
        assert_eq!(
            kept.len(),
            FAILURE_LINES_KEPT,
            "the start of a long report is cut"
        );
        assert!(kept.contains(&"flows lost") && kept.contains(&"    b"));
    }

    #[test]
    fn test_result_lines_are_tallied() {
        assert_eq!(
            parse_test_result("test result: ok. 45 passed; 0 failed; 0 ignored; 0 measured"),
            Some((45, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
