//! The `carp` binary's config commands: `check` exits 0 or 2 with one line per problem, and
//! `run` refuses what `check` refuses. Validation runs against this host's loopback.

use std::process::Command;

fn carp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(args)
        .output()
        .expect("carp runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file in a directory of its own, removed when the test ends.
struct ConfigFile {
    dir: std::path::PathBuf,
    path: String,
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(name: &str, text: &str) -> ConfigFile {
    let dir = std::env::temp_dir().join(format!("carp-cli-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    ConfigFile {
        path: path.to_string_lossy().into_owned(),
        dir,
    }
}

const GOOD: &str = r#"
[node]
name = "clitest"
[carp]
passphrase = "secret"
[[vip]]
interface = "lo"
vhid = 1
address = "127.0.0.5/8"
"#;

#[test]
fn check_accepts_a_good_config() {
    let file = write("good.toml", GOOD);
    let path = file.path.as_str();
    let (code, stdout, _) = carp(&["check", "-c", path]);
    assert_eq!(code, 0);
    assert!(stdout.contains("OK (node clitest, 1 VIPs)"), "{stdout}");
}

#[test]
fn check_exits_2_with_one_line_per_problem() {
    let bad = GOOD
        .replace("vhid = 1", "vhid = 300")
        .replace("127.0.0.5/8", "198.18.9.9/24")
        .replace("interface = \"lo\"", "interface = \"nosuchif0\"")
        .replace(
            "passphrase = \"secret\"",
            "passphrase = \"twenty-bytes-is-long\"\nadvbase = 0",
        );
    let file = write("bad.toml", &bad);
    let path = file.path.as_str();
    let (code, _, stderr) = carp(&["check", "-c", path]);
    assert_eq!(code, 2);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    for field in [
        "carp.advbase",
        "carp.passphrase",
        "vip[0].vhid",
        "vip[0].interface",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("{path}: {field}: "))),
            "no line for {field}: {stderr}"
        );
    }
}

#[test]
fn check_names_the_line_of_an_unknown_key() {
    let file = write("typo.toml", &GOOD.replace("passphrase =", "pasphrase ="));
    let path = file.path.as_str();
    let (code, _, stderr) = carp(&["check", "-c", path]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("line 5: unknown field `pasphrase`"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_what_check_refuses() {
    let file = write("run-bad.toml", &GOOD.replace("vhid = 1", "vhid = 0"));
    let path = file.path.as_str();
    let (code, _, stderr) = carp(&["run", "-c", path]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("vip[0].vhid: 0 is outside 1..=255"),
        "{stderr}"
    );
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let (code, _, stderr) = carp(&["check", "-c", "/nonexistent/carp.toml"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("cannot read /nonexistent/carp.toml"),
        "{stderr}"
    );
}

#[test]
fn an_error_prints_each_cause_once() {
    for command in ["run", "check"] {
        let (code, _, stderr) = carp(&[command, "-c", "/nonexistent/carp.toml"]);
        assert_ne!(code, 0, "{command}");
        assert!(
            stderr.contains("cannot read /nonexistent/carp.toml"),
            "{command}: {stderr}"
        );
        assert_eq!(
            stderr.matches("No such file or directory").count(),
            1,
            "{command} prints the OS error once: {stderr}"
        );
    }
}

#[test]
fn check_refuses_a_nat_rule_that_could_match_the_clusters_own_traffic() {
    let file = write(
        "nat.toml",
        &format!(
            "{GOOD}\n[[nat]]\ninterface = \"lo\"\nsource = \"0.0.0.0/0\"\nto = \"127.0.0.9\"\n"
        ),
    );
    let path = file.path.as_str();
    let (code, _, stderr) = carp(&["check", "-c", path]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{path}: nat[0].source: 0.0.0.0/0 matches everything"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{path}: nat[0].to: 127.0.0.9 is not a VIP on `lo`"
        )),
        "{stderr}"
    );
}

#[test]
fn check_accepts_a_secondary_that_waits_for_its_first_sync() {
    let key = write("sync.key", "a secret of enough bytes for sync\n");
    let secondary = format!(
        "[node]\nname = \"clitest2\"\n\
         [sync]\ninterface = \"lo\"\nlisten = \"127.0.0.1:8370\"\npeer = \"127.0.0.2:8370\"\nkey_file = \"{}\"\n\
         [config_sync]\naccept = [\"carp\", \"nat\"]\n",
        key.path
    );
    let file = write("secondary.toml", &secondary);
    let (code, stdout, stderr) = carp(&["check", "-c", file.path.as_str()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("OK (node clitest2, 0 VIPs)"), "{stdout}");
    // Without accepting the carp area, [carp] and [[vip]] are needed as ever.
    let own = secondary.replace("accept = [\"carp\", \"nat\"]", "accept = [\"nat\"]");
    let file = write("not-secondary.toml", &own);
    let (code, _, stderr) = carp(&["check", "-c", file.path.as_str()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("carp: missing"), "{stderr}");
    assert!(stderr.contains("vip: no [[vip]] configured"), "{stderr}");
}
