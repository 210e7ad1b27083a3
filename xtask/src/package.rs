//! `cargo xtask package`: the Debian package, staged by hand and built with dpkg-deb: the
//! optimised binary, the systemd unit, an example /etc/carp/carp.toml (a conffile), the man
//! page and shell completions the CLI generates. And its check in `cargo xtask test`: the
//! package unpacked into a scratch root (`dpkg -x`), `carp --version` and `carp check` on
//! the example run from there, and the unit through `systemd-analyze verify`.

use crate::{Profile, run, step};
use anyhow::{Context, Result, bail, ensure};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Runtime needs: nft for carp's own tables; Kea only where `[[dhcp]]` is used.
const DEPENDS: &str = "libc6, nftables";
const RECOMMENDS: &str = "kea-dhcp4-server";

/// Builds target/package/carp_<version>_<arch>.deb from an optimised build already made.
pub fn build_deb(root: &Path) -> Result<PathBuf> {
    let bin = root.join(Profile::Release.dir()).join("carp");
    let version = capture(Command::new(&bin).arg("--version"))?
        .trim()
        .strip_prefix("carp ")
        .context("carp --version")?
        .to_owned();
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let out = root.join("target").join("package");
    let stage = out.join(format!("carp_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    step(&format!("staging the package in {}", stage.display()));
    let place = |from: &Path, to: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let to = stage.join(to);
        std::fs::create_dir_all(to.parent().context("a parent")?)?;
        std::fs::copy(from, &to)
            .with_context(|| format!("{} -> {}", from.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    place(&bin, "usr/sbin/carp", 0o755)?;
    run(Command::new("strip")
        .arg("--strip-unneeded")
        .arg(stage.join("usr/sbin/carp")))?;
    place(
        &root.join("packaging/carp.service"),
        "lib/systemd/system/carp.service",
        0o644,
    )?;
    place(
        &root.join("packaging/carp.toml"),
        "etc/carp/carp.toml",
        0o600,
    )?;
    let docs = out.join("docs");
    run(Command::new(&bin).arg("generate-docs").arg(&docs))?;
    run(Command::new("gzip").args(["-9nf"]).arg(docs.join("carp.8")))?;
    place(
        &docs.join("carp.8.gz"),
        "usr/share/man/man8/carp.8.gz",
        0o644,
    )?;
    place(
        &docs.join("carp.bash"),
        "usr/share/bash-completion/completions/carp",
        0o644,
    )?;
    place(
        &docs.join("_carp"),
        "usr/share/zsh/vendor-completions/_carp",
        0o644,
    )?;
    place(
        &docs.join("carp.fish"),
        "usr/share/fish/vendor_completions.d/carp.fish",
        0o644,
    )?;
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: carp\nVersion: {version}\nArchitecture: {arch}\nMaintainer: carp developers <carp@localhost>\n\
             Depends: {DEPENDS}\nRecommends: {RECOMMENDS}\nSection: net\nPriority: optional\n\
             Description: CARP gateway cluster for Linux\n \
             CARP virtual IPs (wire-compatible with FreeBSD and ucarp) answered from XDP,\n \
             connection state sync, configuration sync and DHCP failover with Kea.\n"
        ),
    )?;
    std::fs::write(debian.join("conffiles"), "/etc/carp/carp.toml\n")?;
    let deb = out.join(format!("carp_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    println!("package: {}", deb.display());
    Ok(deb)
}

/// Unpacks `deb` into a scratch root and runs what it holds: `carp --version`, `carp check`
/// on the example config (in a namespace of its own that has the example's interfaces),
/// and `systemd-analyze verify` on the unit (its paths pointed into the scratch root).
pub fn check_deb(root: &Path, deb: &Path) -> Result<()> {
    let scratch = root.join("target/package/scratch-root");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    run(Command::new("dpkg").arg("-x").arg(deb).arg(&scratch))?;
    let bin = scratch.join("usr/sbin/carp");
    let version = capture(Command::new(&bin).arg("--version"))?;
    ensure!(
        version.starts_with("carp "),
        "carp --version said {version:?}"
    );
    for file in [
        "usr/share/man/man8/carp.8.gz",
        "usr/share/bash-completion/completions/carp",
        "lib/systemd/system/carp.service",
    ] {
        ensure!(scratch.join(file).exists(), "{file} is not in the package");
    }
    let ns = Namespace::with_example_interfaces()?;
    let example = scratch.join("etc/carp/carp.toml");
    let checked = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&bin)
        .arg("check")
        .arg("--config")
        .arg(&example)
        .output()?;
    ensure!(
        checked.status.success(),
        "carp check on the example: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    drop(ns);
    let unit = std::fs::read_to_string(scratch.join("lib/systemd/system/carp.service"))?
        .replace("/usr/sbin/carp", &bin.to_string_lossy());
    let copy = scratch.join("carp.service");
    std::fs::write(&copy, unit)?;
    let verified = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .context("systemd-analyze (systemd) is needed to check the unit")?;
    let said = String::from_utf8_lossy(&verified.stderr);
    // verify exits 0 on settings it ignores: anything it says is a finding.
    if !verified.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify: {said}");
    }
    println!("package checked: {version}", version = version.trim());
    Ok(())
}

/// A network namespace with the example's `lan` and `wan`, removed on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    fn with_example_interfaces() -> Result<Self> {
        let ns = Self {
            name: format!("carp-pkg-{}", std::process::id()),
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        let script = "ip link add lan type veth peer name wan && \
                      ip addr add 198.18.1.2/24 dev lan && ip addr add 198.18.2.2/24 dev wan && \
                      ip link set lan up && ip link set wan up";
        run(Command::new("ip").args(["netns", "exec", &ns.name, "sh", "-c", script]))?;
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
