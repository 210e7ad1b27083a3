//! Builds carp-ebpf for the BPF target (nightly + bpf-linker) so the daemon can embed it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let package_dir = |name: &str| {
        packages
            .iter()
            .find(|package| package.name.as_str() == name)
            .and_then(|package| package.manifest_path.parent())
            .map(|dir| dir.to_string())
            .ok_or_else(|| anyhow!("{name} package not found"))
    };
    // aya-build watches carp-ebpf's own sources; the types it shares with the daemon change
    // the object too.
    println!("cargo:rerun-if-changed={}", package_dir("carp-common")?);
    let ebpf_dir = package_dir("carp-ebpf")?;
    aya_build::build_ebpf(
        [Package {
            name: "carp-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
