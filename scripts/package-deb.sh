#!/usr/bin/env bash
# Build the Debian package of vfud: release binary, man pages and shell completions generated
# from the CLI definition (`vfud man`, `vfud completions`), systemd units, then `cargo deb`
# (metadata in Cargo.toml). Without cargo-deb on PATH, installs it from crates.io once with
# `cargo install cargo-deb` (into cargo's own bin directory, so later runs and clean checkouts
# on the same machine reuse it; the first install takes several minutes).
# Usage: scripts/package-deb.sh [--profile dev]   (prints the .deb path last)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = "--profile" ]; then profile=$2; fi
dir=release; [ "$profile" = dev ] && dir=debug
if ! command -v cargo-deb >/dev/null; then
  cargo install cargo-deb --locked
  export PATH=${CARGO_HOME:-$HOME/.cargo}/bin:$PATH
fi
cargo build --profile "$profile" --bin vfud
bin=target/$dir/vfud
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man"
"$bin" man --out-dir "$assets/man"
gzip -n -9 "$assets"/man/*.1
"$bin" completions bash > "$assets/vfud.bash"
"$bin" completions zsh > "$assets/_vfud"
"$bin" completions fish > "$assets/vfud.fish"
cargo deb --no-build --profile "$profile" --no-strip 2>&1 | tail -n 1
