#!/usr/bin/env bash
# Guest benchmark of vfud's nvme against QEMU's own emulated `-device nvme`: ONE Linux guest
# under QEMU 11.1 (TCG, 2 vCPUs) with both attached, each on a sparse raw file of the same
# size in the same directory (vfud: pread/pwrite on the file; QEMU: cache=writeback, its
# default, also through the page cache). fio 4 KiB randread and randwrite, libaio, direct,
# at QD1 and QD32, against each in turn. Prints a Markdown table of IOPS and the vfud/QEMU
# ratio. Goals are not enforced; under TCG the guest's CPU is the bottleneck for both.
#
# Usage: scripts/bench-nvme-guest.sh [--runtime SECONDS] [--doorbells trap|mmap] [--size SIZE]
# Needs what the QEMU tests need: root (QEMU runs in the provisioned chroot) and cargo; the
# first run provisions target/vfud-env (scripts/provision.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

runtime=5 doorbells=trap size=256M
while (($#)); do
  case $1 in
    --runtime) runtime=$2; shift 2 ;;
    --doorbells) doorbells=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ $runtime =~ ^[0-9]+$ ]] || die "--runtime takes whole seconds"
[[ $(id -u) == 0 ]] || die "run as root: QEMU runs in a chroot"
command -v cargo >/dev/null || die "cargo not found"
cd "$REPO"
cargo build --release --quiet
dir=$(mktemp -d /tmp/vfud-nvme-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
truncate -s "$size" "$dir/vfud.img" "$dir/qemu.img"

cat >"$dir/bench.sh" <<EOF
for i in \$(seq 100); do [ -b /dev/nvme0n1 ] && [ -b /dev/nvme1n1 ] && break; sleep 0.1; done
for c in /sys/class/nvme/nvme*; do
  case "\$(cat \$c/model)" in
    vfud*) vfud=/dev/\$(basename \$c)n1 ;;
    QEMU*) qemu=/dev/\$(basename \$c)n1 ;;
  esac
done
[ -b "\$vfud" ] && [ -b "\$qemu" ] || { echo "VFUD-BENCH: FAIL devices vfud=\$vfud qemu=\$qemu"; exit 1; }
for rw in randread randwrite; do
  for qd in 1 32; do
    for who in vfud qemu; do
      eval d=\\\$\$who
      # Terse v3: field 8 is read IOPS, field 49 write IOPS.
      line=\$(fio --name=b --filename=\$d --rw=\$rw --bs=4k --iodepth=\$qd --ioengine=libaio \\
        --direct=1 --time_based --runtime=$runtime --ramp_time=1 --size=128M \\
        --output-format=terse --terse-version=3 2>/dev/null)
      iops=\$(echo "\$line" | awk -F';' '{ print (\$8 > 0 ? \$8 : \$49) }')
      echo "VFUD-BENCH: \$who \$rw \$qd \$iops"
    done
  done
done
EOF

log "booting one guest with vfud nvme (doorbells=$doorbells) and QEMU nvme, ${runtime}s per job"
VFUD_GUEST_MODULES="crc64_rocksoft_generic nvme" VFUD_GUEST_TOOLS=1 \
  ./target/release/vfud guest \
  --device "nvme,backing=$dir/vfud.img,doorbells=$doorbells" \
  --script "$dir/bench.sh" --socket-dir "$dir" --mem-mib 1024 \
  --timeout $((60 + 12 * (runtime + 3))) \
  --qemu-arg=-smp --qemu-arg=2 \
  --qemu-arg=-drive --qemu-arg="file=$dir/qemu.img,if=none,id=qns,format=raw,cache=writeback" \
  --qemu-arg=-device --qemu-arg=nvme,drive=qns,serial=qemu0001 |
  tee "$dir/console.log" | grep 'VFUD-BENCH' >&2 || true
grep -q 'VFUD-BENCH: FAIL' "$dir/console.log" && die "$(grep 'VFUD-BENCH: FAIL' "$dir/console.log")"
[[ $(grep -c 'VFUD-BENCH: [vq]' "$dir/console.log") == 8 ]] ||
  die "the guest did not report all 8 jobs; its console: $(tail -20 "$dir/console.log")"

echo
echo "| fio 4 KiB | QD | vfud nvme (doorbells=$doorbells) IOPS | QEMU nvme IOPS | vfud/QEMU |"
echo "|---|---|---|---|---|"
tr -d '\r' <"$dir/console.log" | awk '
  /VFUD-BENCH: (vfud|qemu) / { v[$3 " " $4 " " $2] = $5; if (!seen[$3 " " $4]++) order[n++] = $3 " " $4 }
  END {
    for (i = 0; i < n; i++) {
      split(order[i], k, " "); a = v[order[i] " vfud"]; b = v[order[i] " qemu"]
      printf "| %s | %s | %.0f | %.0f | %s |\n", k[1], k[2], a, b, (b > 0 ? sprintf("%.2f", a / b) : "—")
    }
  }'
log "elapsed $(( $(date +%s) - ${_T0%.*} )) s"
