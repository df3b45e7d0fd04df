#!/usr/bin/env bash
# Run SQLite TCL test files with the working directory in DIR.
#
# Usage: run.sh DIR TESTFILE...
#   TESTFILE: a name like journal3 or wal4 (".test" optional), looked up in
#   $SQLITE_SRC/test/.
#
# Env:
#   TESTFIXTURE   testfixture binary (default: what build-testfixture.sh prints,
#                 building it if needed)
#   SQLITE_SRC    source tree with test/ (default: the testfixture's folder)
#   LABEL         name for logs (default: basename of DIR)
#   TEST_TIMEOUT  seconds per test file (default 300)
#   LOG_DIR       default /tmp/tcl-work/logs; output goes to LOG_DIR/LABEL-NAME.log
#   TESTFIXTURE_ARGS  extra tester.tcl options (e.g. --verbose=0)
#   HELPERS_OUTSIDE  if 1, the harness's own helper scripts (relative names
#                 ending in .tcl, e.g. tf_main.tcl of launch_testfixture,
#                 crash.tcl of crashsql, test2-script.tcl; and cmds.txt) are
#                 written to and run from LOG_DIR/side-LABEL instead of DIR:
#                 ltxfs takes every file that is not a journal/wal/shm for a
#                 database and refuses non-SQLite content in it (EINVAL).
#                 It runs the test file through a small wrapper
#                 script (LOG_DIR/.wrap-LABEL.tcl) that overrides glob / open /
#                 exec in the test process; the test files are unchanged.
#   REQUIRE_MOUNT if 1, check before each file that DIR is still a mount point
#                 and give "mount-gone" rows when it is not
#
# Copies nothing into DIR. Files a test leaves behind in DIR are removed after
# it (only names that were not there before it started), so each file starts
# from the same state.
#
# Prints one line per file (tab separated):
#   NAME  STATUS  RC  ERRORS  TESTS  SECONDS  FAILED-CASES
# STATUS: ok (0 errors), fail (errors > 0), timeout (killed at TEST_TIMEOUT),
# crash (no summary line), missing (no such test file), mount-gone.
# The same lines go to LOG_DIR/LABEL-summary.tsv.
# Exit status: 0 if every file ran to its summary line with 0 errors, else 1.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if [[ $# -lt 2 ]]; then
  echo "usage: $0 DIR TESTFILE..." >&2; exit 2
fi
DIR=$1; shift
[[ -d "$DIR" ]] || { echo "run.sh: $DIR is not a directory" >&2; exit 2; }
DIR=$(cd "$DIR" && pwd)

if [[ -z "${TESTFIXTURE:-}" ]]; then
  TESTFIXTURE=$("$here/build-testfixture.sh" | tail -n1) || exit 2
fi
SQLITE_SRC=${SQLITE_SRC:-$(dirname "$TESTFIXTURE")}
LABEL=${LABEL:-$(basename "$DIR")}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
LOG_DIR=${LOG_DIR:-/tmp/tcl-work/logs}
mkdir -p "$LOG_DIR"
summary="$LOG_DIR/$LABEL-summary.tsv"
: > "$summary"

list_dir() { (cd "$DIR" && LC_ALL=C ls -A 2>/dev/null); }

wrapper=""
if [[ "${HELPERS_OUTSIDE:-0}" == 1 ]]; then
  wrapper="$LOG_DIR/.wrap-$LABEL.tcl"
  side="$LOG_DIR/side-$LABEL"
  mkdir -p "$side"
  {
    echo "# written by run.sh (HELPERS_OUTSIDE=${HELPERS_OUTSIDE:-0})"
    if [[ "${HELPERS_OUTSIDE:-0}" == 1 ]]; then
      printf 'set ::ltxfs_side {%s}\n' "$side"
      cat <<'TCL'
proc ::ltxfs_map {name} {
  # helper scripts the harness writes to and runs from the cwd:
  # tf_main.tcl, tf_main2.tcl, crash.tcl, test2-script.tcl, cmds.txt, ...
  if {[regexp {^(\./)?([^/]+\.tcl|cmds\.txt)$} $name -> _ base]} {
    return [file join $::ltxfs_side $base]
  }
  return $name
}
rename open ::ltxfs_real_open
proc open {name args} {
  if {[string index $name 0] eq "|"} {
    if {![catch {llength [string range $name 1 end]}]} {
      set cmd {}
      foreach x [string range $name 1 end] { lappend cmd [::ltxfs_map $x] }
      set name "|$cmd"
    }
  } else {
    set name [::ltxfs_map $name]
  }
  uplevel 1 [list ::ltxfs_real_open $name {*}$args]
}
rename exec ::ltxfs_real_exec
proc exec {args} {
  set a {}
  foreach x $args { lappend a [::ltxfs_map $x] }
  uplevel 1 [list ::ltxfs_real_exec {*}$a]
}
TCL
    fi
    cat <<'TCL'
set argv0 [lindex $argv 0]
set argv [lrange $argv 1 end]
source $argv0
TCL
  } > "$wrapper"
fi

overall=0
for t in "$@"; do
  name=${t%.test}
  name=${name##*/}
  file="$SQLITE_SRC/test/$name.test"
  log="$LOG_DIR/$LABEL-$name.log"
  if [[ ! -f "$file" ]]; then
    line=$(printf '%s\tmissing\t-\t-\t-\t-\t' "$name")
    echo "$line"; echo "$line" >> "$summary"; overall=1; continue
  fi
  if [[ "${REQUIRE_MOUNT:-0}" == 1 ]] && ! mountpoint -q "$DIR"; then
    line=$(printf '%s\tmount-gone\t-\t-\t-\t-\t' "$name")
    echo "$line"; echo "$line" >> "$summary"; overall=1; continue
  fi

  before=$(list_dir)
  start=$(date +%s.%N)
  # testfixture sources tester.tcl from its own test/ dir. By default
  # tester.tcl makes a subdirectory "testdir" of the cwd and works there;
  # --testdir= (empty) keeps it in DIR itself, where the test databases
  # (test.db, test.db-journal, ...) are made (ltxfs has no subdirectories).
  # shellcheck disable=SC2086
  (cd "$DIR" && exec timeout -k 10 "$TEST_TIMEOUT" "$TESTFIXTURE" ${wrapper:+"$wrapper"} "$file" --testdir= ${TESTFIXTURE_ARGS:-}) \
    </dev/null >"$log" 2>&1
  rc=$?
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')

  # remove what the test left behind (never what was there before)
  after=$(list_dir)
  comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | while IFS= read -r f; do
    [[ -n "$f" ]] && rm -rf -- "${DIR:?}/$f" 2>/dev/null
  done

  sumline=$(grep -aE '^[0-9]+ errors out of [0-9]+ tests' "$log" | tail -n1)
  errors=$(sed -nE 's/^([0-9]+) errors out of.*/\1/p' <<<"$sumline")
  tests=$(sed -nE 's/^[0-9]+ errors out of ([0-9]+) tests.*/\1/p' <<<"$sumline")
  failed=$(grep -aE '^!?Failures on these tests:' "$log" | tail -n1 | sed -E 's/^!?Failures on these tests: *//')
  if [[ -z "$failed" ]]; then
    failed=$(grep -aE '^! [^ ]+ ' "$log" | awk '{print $2}' | awk '!seen[$0]++' | tr '\n' ' ')
  fi
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    status=timeout
  elif [[ -z "$sumline" ]]; then
    status=crash
  elif [[ "$errors" == 0 ]]; then
    status=ok
  else
    status=fail
  fi
  [[ "$status" == ok && $rc -eq 0 ]] || overall=1
  line=$(printf '%s\t%s\t%s\t%s\t%s\t%s\t%s' "$name" "$status" "$rc" "${errors:--}" "${tests:--}" "$secs" "${failed% }")
  echo "$line"
  echo "$line" >> "$summary"
done
exit $overall
