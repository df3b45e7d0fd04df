#!/usr/bin/env bash
# Run SQLite TCL test files in a plain directory and on an ltxfs mount, and
# print a comparison.
#
# Usage: compare.sh [TESTFILE...]
#   TESTFILE: names like journal3 wal4, or shell globs like 'wal*' that are
#   matched against $SQLITE_SRC/test/*.test. Default: journal3 wal4 walbak attach2.
#
# Env:
#   LTXFS         ltxfs binary (default: <repo>/target/debug/ltxfs; not built here)
#   WORK          scratch dir (default /tmp/tcl-work): WORK/plain, WORK/mnt,
#                 WORK/data, WORK/ltxfs.yml, WORK/ltxfs.log, WORK/logs/
#   TESTFIXTURE_DIR, MAKE_JOBS   see build-testfixture.sh
#   FUSE_LOCKS    the mount's fuse.locks: ltxfs (default) or kernel
#   TEST_TIMEOUT  seconds per test file and place (default 300)
#   SKIP_SLOW     if 1 (default), a file that does not finish in the plain dir
#                 within TEST_TIMEOUT is not run on the mount
#   HELPERS_OUTSIDE   see run.sh; 1 by default here, so that the comparison
#                 shows SQLite's behaviour rather than the harness writing its
#                 own scripts into the mount, which refuses non-SQLite files.
#                 Set it to 0 for the raw run.
#
# Needs root and /dev/fuse (like ltxfs itself). Always stops ltxfs and removes
# the mount on exit. Exit status: 0 when no file did worse on the mount than in
# the plain dir, 1 otherwise, 2 on setup errors.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
LTXFS=${LTXFS:-$repo/target/debug/ltxfs}
WORK=${WORK:-/tmp/tcl-work}
export TEST_TIMEOUT=${TEST_TIMEOUT:-300}
SKIP_SLOW=${SKIP_SLOW:-1}
export HELPERS_OUTSIDE=${HELPERS_OUTSIDE:-1}
export LOG_DIR=$WORK/logs
PLAIN=$WORK/plain
MNT=$WORK/mnt
DATA=$WORK/data
CONF=$WORK/ltxfs.yml

log() { echo "compare: $*" >&2; }

[[ -x "$LTXFS" ]] || { log "no ltxfs binary at $LTXFS (build it first)"; exit 2; }

TESTFIXTURE=$("$here/build-testfixture.sh" | tail -n1) || { log "build failed"; exit 2; }
export TESTFIXTURE
export SQLITE_SRC=$(dirname "$TESTFIXTURE")

# fusermount3 / findmnt come from fuse3 / util-linux
if ! command -v fusermount3 >/dev/null 2>&1; then
  log "installing fuse3"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >&2; }
fi

# expand test names / globs
tests=()
[[ $# -gt 0 ]] || set -- journal3 wal4 walbak attach2
for a in "$@"; do
  a=${a%.test}
  if [[ "$a" == *[*?[]* ]]; then
    for f in "$SQLITE_SRC"/test/$a.test; do
      [[ -f "$f" ]] && tests+=("$(basename "$f" .test)")
    done
  else
    tests+=("$a")
  fi
done
[[ ${#tests[@]} -gt 0 ]] || { log "no test files matched"; exit 2; }

LTXFS_PID=""
cleanup() {
  if [[ -n "$LTXFS_PID" ]] && kill -0 "$LTXFS_PID" 2>/dev/null; then
    kill -TERM "$LTXFS_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$LTXFS_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$LTXFS_PID" 2>/dev/null; then
      log "ltxfs did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$LTXFS_PID" 2>/dev/null
    fi
    wait "$LTXFS_PID" 2>/dev/null
  fi
  if mountpoint -q "$MNT" 2>/dev/null; then
    log "mount still there after ltxfs exit; umount -l"
    fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# fresh dirs (only our own scratch dirs; a stale mount is cleared first)
if mountpoint -q "$MNT" 2>/dev/null; then
  fusermount3 -u -z "$MNT" 2>/dev/null || umount -l "$MNT"
fi
rm -rf "$PLAIN" "$MNT" "$DATA" "$LOG_DIR"
mkdir -p "$PLAIN" "$MNT" "$LOG_DIR"
cat > "$CONF" <<EOF
data:
  dir: $DATA
fuse:
  dir: $MNT
  locks: ${FUSE_LOCKS:-ltxfs}
lease:
  type: static
  candidate: true
http:
  addr: "127.0.0.1:0"
EOF

# ---- plain directory -------------------------------------------------------
log "HELPERS_OUTSIDE=$HELPERS_OUTSIDE TEST_TIMEOUT=$TEST_TIMEOUT"
log "plain dir: ${tests[*]}"
LABEL=plain "$here/run.sh" "$PLAIN" "${tests[@]}" | sed 's/^/plain\t/' >&2

mount_tests=()
skipped=()
while IFS=$'\t' read -r name status _; do
  if [[ "$SKIP_SLOW" == 1 && "$status" == timeout ]]; then skipped+=("$name"); else mount_tests+=("$name"); fi
done < "$LOG_DIR/plain-summary.tsv"

# ---- ltxfs mount -----------------------------------------------------------
: > "$LOG_DIR/mount-summary.tsv"
if [[ ${#mount_tests[@]} -gt 0 ]]; then
  (cd "$WORK" && exec "$LTXFS" mount --config "$CONF") > "$WORK/ltxfs.log" 2>&1 &
  LTXFS_PID=$!
  for _ in $(seq 1 300); do
    findmnt -n -M "$MNT" >/dev/null 2>&1 && break
    kill -0 "$LTXFS_PID" 2>/dev/null || break
    sleep 0.1
  done
  if ! findmnt -n -M "$MNT" >/dev/null 2>&1; then
    log "ltxfs did not mount $MNT:"; tail -n 20 "$WORK/ltxfs.log" >&2; exit 2
  fi
  log "ltxfs mounted $MNT (pid $LTXFS_PID): ${mount_tests[*]}"
  LABEL=mount REQUIRE_MOUNT=1 "$here/run.sh" "$MNT" "${mount_tests[@]}" | sed 's/^/mount\t/' >&2
  cleanup
  LTXFS_PID=""
fi
for s in "${skipped[@]}"; do
  printf '%s\tskipped\t-\t-\t-\t-\tplain run took over %ss\n' "$s" "$TEST_TIMEOUT" >> "$LOG_DIR/mount-summary.tsv"
done

# ---- comparison ------------------------------------------------------------
worse=0; nsame=0; ndiff=0
printf '%-16s %-22s %-22s %s\n' TEST PLAIN MOUNT "DIFF (failed on mount only)"
for name in "${tests[@]}"; do
  p=$(awk -F'\t' -v n="$name" '$1==n' "$LOG_DIR/plain-summary.tsv" | tail -n1)
  m=$(awk -F'\t' -v n="$name" '$1==n' "$LOG_DIR/mount-summary.tsv" | tail -n1)
  IFS=$'\t' read -r _ ps prc pe pt psec pf <<<"$p"
  IFS=$'\t' read -r _ ms mrc me mt msec mf <<<"$m"
  fmt() { # status errors tests secs
    case "$1" in
      ok|fail) echo "$1 $2/$3 ${4}s" ;;
      "") echo "-" ;;
      *) echo "$1 ${4:+${4}s}" ;;
    esac
  }
  diff=""
  if [[ -n "$ms" && "$ms" != skipped ]]; then
    only=$(comm -13 <(tr ' ' '\n' <<<"$pf" | sed '/^$/d' | sort -u) <(tr ' ' '\n' <<<"$mf" | sed '/^$/d' | sort -u) | head -n 8 | tr '\n' ' ')
    if [[ "$ms" != "$ps" || "$me" != "$pe" || -n "$only" ]]; then
      diff="${only:-(status differs)}"
      ndiff=$((ndiff + 1))
      if [[ "$ms" != ok ]]; then
        if [[ "$ps" == ok || -n "$only" ]]; then worse=1; fi
        if [[ "$ms" =~ ^(crash|timeout|mount-gone)$ && "$ps" != "$ms" ]]; then worse=1; fi
        if [[ "$me" =~ ^[0-9]+$ && "$pe" =~ ^[0-9]+$ ]] && (( me > pe )); then worse=1; fi
      fi
    elif [[ "$mt" != "$pt" ]]; then
      diff="(ran $mt tests, plain ran $pt)"
      ndiff=$((ndiff + 1))
    else
      nsame=$((nsame + 1))
    fi
  fi
  printf '%-16s %-22s %-22s %s\n' "$name" "$(fmt "$ps" "$pe" "$pt" "$psec")" "$(fmt "$ms" "$me" "$mt" "$msec")" "$diff"
done
echo "${#tests[@]} files: $nsame same on the mount as in the plain dir, $ndiff differ, ${#skipped[@]} skipped"
echo "logs: $LOG_DIR/{plain,mount}-NAME.log; ltxfs log: $WORK/ltxfs.log"
exit $worse
