//! Every bpffs path carp uses, in one place: `/sys/fs/bpf/carp/<node>/...`, so two nodes on
//! one host (two namespaces) never share maps.

use std::path::{Path, PathBuf};

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The pin directory of `node`.
pub fn node_dir(node: &str) -> PathBuf {
    Path::new(BPFFS).join("carp").join(node)
}

/// The pinned XDP program.
pub fn program(dir: &Path) -> PathBuf {
    dir.join("prog_xdp")
}

/// The pinned XDP link on interface `ifname`.
pub fn link(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("link_{ifname}"))
}
