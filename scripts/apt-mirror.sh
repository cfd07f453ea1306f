#!/usr/bin/env bash
# Print the Debian archive mirror to provision from: $VFUD_DEBIAN_MIRROR if set, else the
# mirror the host's apt already uses for Debian's main archive.
# Usage: scripts/apt-mirror.sh [ROOT]     (ROOT: where etc/apt lives, default /; for tests)
# Reads ROOT/etc/apt/sources.list and ROOT/etc/apt/sources.list.d/*.list (one-line `deb` format)
# and ROOT/etc/apt/sources.list.d/*.sources (deb822 stanzas with `URIs:`), in apt's order, and
# prints the first URI of the first enabled `deb` entry that serves Debian's main archive:
# component `main` and a Debian release suite (a codename or stable/testing/unstable, optionally
# -updates, -backports or -proposed-updates). Security suites and third-party repositories
# (suites like `nodistro` or `cloud-sdk-bookworm`) do not qualify. Exits 1 with a message
# naming VFUD_DEBIAN_MIRROR when nothing qualifies. No mirror host is built in on purpose:
# machines reach Debian through their own mirrors or proxies.
set -euo pipefail

if [[ -n ${VFUD_DEBIAN_MIRROR:-} ]]; then
  printf '%s\n' "$VFUD_DEBIAN_MIRROR"
  exit 0
fi

APT=${1:-/}/etc/apt
files=()
[[ -f $APT/sources.list ]] && files+=("$APT/sources.list")
for f in "$APT"/sources.list.d/*.list "$APT"/sources.list.d/*.sources; do
  [[ -f $f ]] && files+=("$f")
done

mirror=
if ((${#files[@]})); then
  # shellcheck disable=SC2016  # awk program
  mirror=$(awk '
    function debian_suite(s) {
      sub(/-(updates|backports|proposed-updates)$/, "", s)
      return s ~ /^(buster|bullseye|bookworm|trixie|forky|duke|sid|oldoldstable|oldstable|stable|testing|unstable)$/
    }
    # types, uris, suites, comps: space-separated lists of one entry.
    function consider(types, uris, suites, comps, enabled,   n, i, t, s, c, u, okt, oks, okc) {
      if (found != "" || tolower(enabled) == "no") return
      n = split(types, t, " "); okt = 0
      for (i = 1; i <= n; i++) if (t[i] == "deb") okt = 1
      n = split(suites, s, " "); oks = 0
      for (i = 1; i <= n; i++) if (debian_suite(s[i])) oks = 1
      n = split(comps, c, " "); okc = 0
      for (i = 1; i <= n; i++) if (c[i] == "main") okc = 1
      if (!okt || !oks || !okc || split(uris, u, " ") < 1) return
      if (u[1] !~ /^(https?|ftp|file):/) return
      sub(/\/+$/, "", u[1])
      found = u[1]
    }
    function flush() {
      if (st_uris != "") consider(st_types, st_uris, st_suites, st_comps, st_enabled)
      st_types = st_uris = st_suites = st_comps = st_enabled = key = ""
    }
    FNR == 1 { flush(); deb822 = FILENAME ~ /\.sources$/ }
    deb822 {
      if ($0 ~ /^[ \t]*$/) { flush(); next }
      if ($0 ~ /^#/) next
      if ($0 ~ /^[ \t]/) { val = $0 }            # continuation of the previous field
      else {
        key = tolower($0); sub(/:.*/, "", key)
        val = $0; sub(/^[^:]*:/, "", val)
      }
      gsub(/[ \t]+/, " ", val)
      if (key == "types") st_types = st_types " " val
      else if (key == "uris") st_uris = st_uris " " val
      else if (key == "suites") st_suites = st_suites " " val
      else if (key == "components") st_comps = st_comps " " val
      else if (key == "enabled") { gsub(/ /, "", val); st_enabled = val }
      next
    }
    {
      line = $0; sub(/#.*/, "", line)
      gsub(/\[[^]]*\]/, "", line)                 # [arch=amd64 signed-by=...] options
      n = split(line, w, " ")
      if (n < 4) next
      comps = ""
      for (i = 4; i <= n; i++) comps = comps " " w[i]
      consider(w[1], w[2], w[3], comps, "")
    }
    END { flush(); if (found != "") print found }
  ' "${files[@]}")
fi

if [[ -z $mirror ]]; then
  echo "apt-mirror.sh: no Debian archive mirror found in $APT (sources.list, sources.list.d/*.list," \
       "*.sources); set VFUD_DEBIAN_MIRROR to the URI of a Debian mirror" >&2
  exit 1
fi
printf '%s\n' "$mirror"
