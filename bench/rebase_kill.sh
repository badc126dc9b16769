#!/bin/bash
# kill -9 of an in-place `qemu-img rebase` at random moments, then snapfs's recovery rule for
# a pull (QemuImgEngine.pull): a layer found on the new backing is put back on the old one
# (-u), its leaks repaired, and rebased again (-t writethrough). Prints, per cache mode, how
# many kills left the new backing, how many of those had lost the old backing's data before
# the recovery, and how many were byte-identical after it (qemu-img compare, qemu-io read -P,
# qemu-img check).
#
#   bash bench/rebase_kill.sh writeback 30 [LOW_PERCENT]    # or writethrough
#
# The kill falls uniformly between LOW_PERCENT% and 120% of a full rebase's time.
set -u
MODE=$1 N=$2 LO=${3:-0}
DIR=$(mktemp -d -p "${BENCH_DIR:-/tmp}" rebase-kill.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"
qemu-img create -q -f qcow2 P.qcow2 256M
qemu-io -f qcow2 -c "write -P 0x11 0 256M" P.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b P.qcow2 -F qcow2 S.qcow2
{ for i in $(seq 0 95); do echo "write -P 0x22 $((i * 2))M 1M"; done; echo "write -z 200M 4M"; } |
    qemu-io -f qcow2 S.qcow2 >/dev/null # S: 96 MiB of 0x22, and zeros over P
qemu-img create -q -f qcow2 -b S.qcow2 -F qcow2 D.qcow2
qemu-io -f qcow2 -c "write -P 0x33 0 512k" -c "write -P 0x33 5M 3M" -c "write -P 0x33 210M 8M" D.qcow2 >/dev/null
cp --sparse=always D.qcow2 D.orig
qemu-img convert -O raw D.qcow2 ref.raw
READS=(-c "read -P 0x33 5M 3M" -c "read -P 0x22 2M 1M" -c "read -P 0x11 1M 1M" -c "read -P 0 200M 4M" -c "read -P 0x33 210M 8M")
t0=$(date +%s%N)
qemu-img rebase -q -t "$MODE" -b P.qcow2 -F qcow2 D.qcow2
T=$((($(date +%s%N) - t0) / 1000))
echo "a full rebase ($MODE): $((T / 1000)) ms"
lost=0 newback=0 ok=0
for n in $(seq 1 "$N"); do
    cp --sparse=always D.orig D.qcow2
    delay=$(((RANDOM * 32768 + RANDOM) % (T * (120 - LO) / 100) + T * LO / 100))
    qemu-img rebase -q -t "$MODE" -b P.qcow2 -F qcow2 D.qcow2 &
    pid=$!
    sleep "$(printf "%d.%06d" $((delay / 1000000)) $((delay % 1000000)))"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    back=$(qemu-img info -U --output=json D.qcow2 | python3 -c 'import json,sys;print(json.load(sys.stdin).get("backing-filename"))')
    [ "$back" = P.qcow2 ] && newback=$((newback + 1))
    qemu-img compare -q D.qcow2 ref.raw || { lost=$((lost + 1)); echo "  kill $n at ${delay} us: on $back, content differs"; }
    [ "$back" = P.qcow2 ] && qemu-img rebase -q -u -b S.qcow2 -F qcow2 D.qcow2
    qemu-img check -q -r leaks D.qcow2 >/dev/null 2>&1
    qemu-img rebase -q -t writethrough -b P.qcow2 -F qcow2 D.qcow2
    if qemu-img compare -q D.qcow2 ref.raw && qemu-img check -q D.qcow2 &&
        ! qemu-io -f qcow2 -r "${READS[@]}" D.qcow2 | grep -q "failed"; then
        ok=$((ok + 1))
    else
        echo "  kill $n: RECOVERY FAILED"
    fi
done
echo "$MODE: kills=$N on-new-backing=$newback lost-before-recovery=$lost identical-after-recovery=$ok"
