//! `scripts/apt-mirror.sh`: provisioning takes the Debian mirror from the host's apt
//! configuration (deb822 `*.sources` and one-line `sources.list` formats), skipping security
//! suites and third-party repositories, with `VFUD_DEBIAN_MIRROR` as the override.
//! Every host name here is a reserved `.example` name: the repository names no real mirror.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

/// Run the script on an apt root `root` (with `VFUD_DEBIAN_MIRROR` set to `env`, if given).
fn run(root: &Path, env: Option<&str>) -> Output {
    let mut cmd = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/apt-mirror.sh"
    ));
    cmd.arg(root).env_remove("VFUD_DEBIAN_MIRROR");
    if let Some(v) = env {
        cmd.env("VFUD_DEBIAN_MIRROR", v);
    }
    cmd.output().expect("run scripts/apt-mirror.sh")
}

/// The mirror the script prints, asserting it succeeded.
fn mirror(root: &Path) -> String {
    let out = run(root, None);
    assert!(
        out.status.success(),
        "apt-mirror.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim_end()
        .to_string()
}

/// A temporary apt root with `files` (path below `etc/apt`, content).
fn apt_root(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in files {
        let p = dir.path().join("etc/apt").join(path);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }
    dir
}

const THIRD_PARTY_SOURCES: &str = "\
Types: deb
URIs: https://node.example/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/node.gpg
";

const DEBIAN_SOURCES: &str = "\
Types: deb
# a comment inside the stanza
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: http://mirror.example/debian/
Suites: bookworm
 bookworm-updates
Components: contrib main
";

#[test]
fn deb822_sources_pick_the_debian_main_archive() {
    let root = apt_root(&[
        ("sources.list.d/a-node.sources", THIRD_PARTY_SOURCES),
        ("sources.list.d/debian.sources", DEBIAN_SOURCES),
    ]);
    assert_eq!(mirror(root.path()), "http://mirror.example/debian");
}

#[test]
fn one_line_sources_list_skips_third_party_security_and_src_lines() {
    let list = "\
# deb http://commented.example/debian bookworm main
deb [signed-by=/usr/share/keyrings/cloud.gpg] https://cloud.example/apt cloud-sdk-bookworm main
deb http://security.example/debian-security bookworm-security main
deb-src http://src.example/debian bookworm main
deb http://other.example/debian bookworm contrib non-free
deb [arch=amd64] http://list.example/debian trixie main contrib   # trailing comment
";
    let root = apt_root(&[("sources.list", list)]);
    assert_eq!(mirror(root.path()), "http://list.example/debian");
}

#[test]
fn sources_list_comes_before_sources_list_d() {
    let root = apt_root(&[
        (
            "sources.list",
            "deb http://first.example/debian stable main\n",
        ),
        ("sources.list.d/debian.sources", DEBIAN_SOURCES),
    ]);
    assert_eq!(mirror(root.path()), "http://first.example/debian");
}

#[test]
fn disabled_files_are_not_read() {
    let root = apt_root(&[
        (
            "sources.list.d/old.list.disabled",
            "deb http://old.example/debian bookworm main\n",
        ),
        ("sources.list.d/node.sources", THIRD_PARTY_SOURCES),
        (
            "sources.list.d/debian.list",
            "deb http://mirror.example/debian bookworm-backports main\n",
        ),
    ]);
    assert_eq!(mirror(root.path()), "http://mirror.example/debian");
}

#[test]
fn the_environment_variable_overrides_apt() {
    let root = apt_root(&[("sources.list.d/debian.sources", DEBIAN_SOURCES)]);
    let out = run(root.path(), Some("http://override.example/debian"));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        "http://override.example/debian"
    );
}

#[test]
fn nothing_found_fails_naming_the_override_variable() {
    let root = apt_root(&[
        ("sources.list.d/node.sources", THIRD_PARTY_SOURCES),
        (
            "sources.list",
            "deb http://security.example/debian-security bookworm-security main\n",
        ),
    ]);
    let out = run(root.path(), None);
    assert!(!out.status.success(), "expected failure, got {out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("VFUD_DEBIAN_MIRROR"), "stderr: {err}");

    let empty = tempfile::tempdir().expect("tempdir");
    let out = run(empty.path(), None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("VFUD_DEBIAN_MIRROR"));
}
