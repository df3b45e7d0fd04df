#!/usr/bin/env bash
# Build SQLite's TCL `testfixture` from Debian's `sqlite3` source package.
#
# Usage: build-testfixture.sh
#
# Env:
#   TESTFIXTURE_DIR  cache dir (default /tmp/tcl-work/testfixture). Holds the
#                    unpacked source (src/, with src/test/*.test) and the built
#                    binary (src/testfixture). A second run reuses it.
#   MAKE_JOBS        parallel make jobs (default 2)
#
# Needs root (apt-get) unless the build deps and deb-src entries are present.
# On success the last line on stdout is the path of the testfixture binary;
# progress goes to stderr. Safe to run again: it does nothing when the binary
# already exists.
set -euo pipefail

TESTFIXTURE_DIR=${TESTFIXTURE_DIR:-/tmp/tcl-work/testfixture}
MAKE_JOBS=${MAKE_JOBS:-2}
SRC="$TESTFIXTURE_DIR/src"
BIN="$SRC/testfixture"

log() { echo "build-testfixture: $*" >&2; }

if [[ -x "$BIN" && -d "$SRC/test" && -f "$TESTFIXTURE_DIR/.built" ]]; then
  log "cached: $BIN"
  echo "$BIN"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# --- deb-src entries -------------------------------------------------------
have_deb_src() {
  grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

if ! have_deb_src; then
  log "no deb-src entries: adding them"
  added=0
  rm -f /etc/apt/sources.list.d/ltxfs-deb-src.sources.new
  # deb822 files (Debian 12+): copy each enabled stanza with Types: deb-src
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    case "$f" in */ltxfs-deb-src.sources) continue ;; esac
    # only Debian's own archives (not third-party repos without sources)
    grep -qE '^URIs:.*(debian\.org|debian/?$|debian-security)' "$f" || continue
    out=/etc/apt/sources.list.d/ltxfs-deb-src.sources
    awk '
      BEGIN { RS=""; ORS="\n\n" }
      /(^|\n)Types:[^\n]*deb/ && !/(^|\n)Enabled:[[:space:]]*no/ {
        gsub(/(^|\n)Types:[^\n]*/, "\nTypes: deb-src"); sub(/^\n/, ""); print
      }' "$f" > "$out.tmp"
    if [[ -s "$out.tmp" ]]; then
      cat "$out.tmp" >> "$out.new"
      added=1
    fi
    rm -f "$out.tmp"
  done
  if [[ $added -eq 1 ]]; then
    $SUDO mv /etc/apt/sources.list.d/ltxfs-deb-src.sources.new \
      /etc/apt/sources.list.d/ltxfs-deb-src.sources
  fi
  # one-line style sources.list
  if [[ -f /etc/apt/sources.list ]] && grep -qE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
    grep -E '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list \
      | sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' \
      | $SUDO tee /etc/apt/sources.list.d/ltxfs-deb-src.list >/dev/null
    added=1
  fi
  if [[ $added -eq 0 ]]; then
    log "could not find a Debian apt source to derive deb-src from"; exit 1
  fi
  NEED_UPDATE=1
fi

# --- build deps --------------------------------------------------------------
PKGS=(dpkg-dev build-essential tcl-dev tcl8.6-dev libreadline-dev zlib1g-dev tcl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${NEED_UPDATE:-0} -eq 1 || ${#missing[@]} -gt 0 ]]; then
  log "apt-get update"
  $SUDO apt-get update -qq >&2
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing: ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- source ------------------------------------------------------------------
mkdir -p "$TESTFIXTURE_DIR"
if [[ ! -f "$SRC/configure" || ! -d "$SRC/test" ]]; then
  rm -rf "$TESTFIXTURE_DIR/dl" "$SRC"
  mkdir -p "$TESTFIXTURE_DIR/dl"
  log "apt-get source sqlite3"
  # apt-get source downloads as _apt when it can; make the dir writable for it
  chmod 0777 "$TESTFIXTURE_DIR/dl" 2>/dev/null || true
  if ! (cd "$TESTFIXTURE_DIR/dl" && apt-get source -qq sqlite3 >&2); then
    log "apt-get source failed; retrying after apt-get update"
    $SUDO apt-get update -qq >&2
    (cd "$TESTFIXTURE_DIR/dl" && apt-get source -qq sqlite3 >&2)
  fi
  d=$(find "$TESTFIXTURE_DIR/dl" -mindepth 1 -maxdepth 1 -type d -name 'sqlite3-*' | head -n1)
  [[ -n "$d" && -f "$d/configure" ]] || { log "unexpected source layout in $TESTFIXTURE_DIR/dl"; exit 1; }
  mv "$d" "$SRC"
  cp "$TESTFIXTURE_DIR"/dl/*.dsc "$TESTFIXTURE_DIR/" 2>/dev/null || true
  rm -rf "$TESTFIXTURE_DIR/dl"
fi
ver=$(cd "$SRC" && dpkg-parsechangelog -S Version 2>/dev/null || echo unknown)
log "source: sqlite3 $ver in $SRC (upstream $(cat "$SRC/VERSION" 2>/dev/null || echo '?'))"

# --- configure & build -------------------------------------------------------
# Close to debian/rules: the same CFLAGS (-DSQLITE_* features of the packaged
# libsqlite3) and configure options, built in-tree with TCL. The Makefile's
# testfixture target adds -DSQLITE_TEST and friends and compiles the
# amalgamation (sqlite3.c) together with the test harness C files.
cd "$SRC"
# Debian's feature flags, read from debian/rules (export CFLAGS += ...).
DEB_DEFS=$(awk '/^export CFLAGS \+=/{f=1} f{print} f&&!/\\$/{exit}' debian/rules \
  | sed 's/^export CFLAGS += //' | tr -d '\\\n\t' | tr -s ' ')
if [[ -z "$DEB_DEFS" ]]; then
  log "could not read CFLAGS from debian/rules; using Debian 12's list"
  DEB_DEFS="-O2 -fno-strict-aliasing -DSQLITE_SECURE_DELETE -DSQLITE_ENABLE_COLUMN_METADATA \
 -DSQLITE_ENABLE_FTS3 -DSQLITE_ENABLE_FTS3_PARENTHESIS -DSQLITE_ENABLE_RTREE=1 -DSQLITE_SOUNDEX=1 \
 -DSQLITE_ENABLE_UNLOCK_NOTIFY -DSQLITE_OMIT_LOOKASIDE=1 -DSQLITE_ENABLE_DBSTAT_VTAB \
 -DSQLITE_ALLOW_ROWID_IN_VIEW -DSQLITE_ENABLE_UPDATE_DELETE_LIMIT=1 -DSQLITE_ENABLE_LOAD_EXTENSION \
 -DSQLITE_ENABLE_JSON1 -DSQLITE_LIKE_DOESNT_MATCH_BLOBS -DSQLITE_THREADSAFE=1 \
 -DSQLITE_ENABLE_FTS3_TOKENIZER=1 -DSQLITE_USE_URI=1 -DSQLITE_MAX_SCHEMA_RETRY=25 \
 -DSQLITE_ENABLE_PREUPDATE_HOOK -DSQLITE_ENABLE_SESSION -DSQLITE_ENABLE_STMTVTAB \
 -DSQLITE_MAX_VARIABLE_NUMBER=250000"
fi
if [[ -n "${DEB_DEFS_OVERRIDE:-}" ]]; then DEB_DEFS=$DEB_DEFS_OVERRIDE; fi

# debian/rules passes --enable-threadsafe --enable-load-extension --enable-json
# --enable-fts4 --enable-fts5 --disable-amalgamation (+ install paths). Not
# --disable-amalgamation: upstream's testfixture target then lists
# fts3_term.c twice and fails to link (3.40.1); the amalgamation is the same
# code, and it is what upstream's own test runs use.
CONF_ARGS=(--enable-threadsafe --enable-load-extension --enable-json
  --enable-fts4 --enable-fts5 --with-tcl=/usr/lib/tcl8.6)
conf_id="CFLAGS=-g $DEB_DEFS ${CONF_ARGS[*]}"
if [[ ! -f Makefile || "$(cat .ltxfs-configure 2>/dev/null)" != "$conf_id" ]]; then
  log "configure ${CONF_ARGS[*]}"
  log "CFLAGS: -g $DEB_DEFS"
  [[ -f Makefile ]] && make distclean >/dev/null 2>&1 || true
  rm -f .ltxfs-configure
  CFLAGS="-g $DEB_DEFS" ./configure "${CONF_ARGS[@]}" > "$TESTFIXTURE_DIR/configure.log" 2>&1 \
    || { tail -n 40 "$TESTFIXTURE_DIR/configure.log" >&2; rm -f Makefile; exit 1; }
  echo "$conf_id" > .ltxfs-configure
fi

log "make -j$MAKE_JOBS testfixture"
start=$(date +%s)
if ! make -j"$MAKE_JOBS" testfixture > "$TESTFIXTURE_DIR/make.log" 2>&1; then
  grep -E 'error|Error' "$TESTFIXTURE_DIR/make.log" | tail -n 30 >&2
  log "make failed (full log: $TESTFIXTURE_DIR/make.log)"; exit 1
fi
log "built in $(( $(date +%s) - start )) s"
[[ -x "$BIN" ]] || { log "no $BIN after make"; exit 1; }
touch "$TESTFIXTURE_DIR/.built"
echo "$BIN"
