# shellcheck shell=bash
# Sourced by quickstart.sh and test.sh: makes sure the tools and services strata needs are there.
#
# - REDIS_URL / DATABASE_URL set: those servers are used as they are.
# - Otherwise, if nothing answers on 127.0.0.1:6379 / :5432, Redis and PostgreSQL are installed
#   from Debian/Ubuntu packages (apt) and started on loopback.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (apt)"
  if [ -z "${STRATA_APT_UPDATED:-}" ]; then as_root apt-get update -qq; export STRATA_APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_toolchain() {
  if ! command -v cargo >/dev/null; then
    log "cargo not found: install Rust 1.88 or newer (https://rustup.rs), then run this again"
    return 1
  fi
  command -v cc >/dev/null || apt_install build-essential
  command -v pkg-config >/dev/null || apt_install pkg-config
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

ensure_redis() {
  if [ -n "${REDIS_URL:-}" ]; then log "Redis: using REDIS_URL"; return 0; fi
  if port_open 6379; then log "Redis: 127.0.0.1:6379 answers"; return 0; fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/strata-redis.log
  for _ in $(seq 50); do port_open 6379 && return 0; sleep 0.1; done
  log "redis-server did not start (see /tmp/strata-redis.log)"; return 1
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then log "PostgreSQL: using DATABASE_URL"; return 0; fi
  if port_open 5432; then log "PostgreSQL: 127.0.0.1:5432 answers"; return 0; fi
  [ -n "$(pg_bin)" ] || apt_install postgresql
  local ver; ver=$(basename "$(dirname "$(pg_bin)")")
  log "starting PostgreSQL $ver on 127.0.0.1:5432"
  if ! ls /etc/postgresql/"$ver"/main >/dev/null 2>&1; then as_root pg_createcluster "$ver" main; fi
  as_root pg_ctlcluster "$ver" main start || true
  for _ in $(seq 100); do port_open 5432 && break; sleep 0.1; done
  port_open 5432 || { log "PostgreSQL did not start"; return 1; }
  # A fresh Debian cluster asks for passwords on TCP: give strata a role of its own.
  as_root su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='strata'\" | grep -q 1 \
    || psql -qc \"CREATE ROLE strata LOGIN CREATEDB PASSWORD 'strata'\"" >/dev/null
  export DATABASE_URL=postgres://strata:strata@127.0.0.1:5432/strata
  log "PostgreSQL: DATABASE_URL=$DATABASE_URL"
}

# Test-only tools: the crash tests start their own redis-server and PostgreSQL (initdb, pg_ctl);
# the observability tests scrape with a real Prometheus.
ensure_test_tools() {
  command -v redis-server >/dev/null || apt_install redis-server
  [ -n "$(pg_bin)" ] || apt_install postgresql
  command -v prometheus >/dev/null || apt_install prometheus
  # The TLS tests make their certificates with the openssl CLI and talk HTTPS with curl.
  command -v openssl >/dev/null || apt_install openssl
  command -v curl >/dev/null || apt_install curl ca-certificates
  # Object store servers for the lifecycle suite: moto (S3, PyPI) and Azurite (Azure, npm),
  # installed under ~/.cache/strata where the tests look for them.
  local tools="${STRATA_TOOLS_DIR:-$HOME/.cache/strata}"
  if ! command -v moto_server >/dev/null && [ ! -x "$tools/moto/bin/moto_server" ]; then
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3 python3-venv
    log "installing moto[server] into $tools/moto"
    python3 -m venv "$tools/moto" && "$tools/moto/bin/pip" install --quiet 'moto[server]'
  fi
  if ! command -v gcp-storage-emulator >/dev/null && [ ! -x "$tools/gcs/bin/gcp-storage-emulator" ]; then
    python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3 python3-venv
    log "installing gcp-storage-emulator into $tools/gcs"
    python3 -m venv "$tools/gcs" && "$tools/gcs/bin/pip" install --quiet gcp-storage-emulator
  fi
  if ! command -v azurite-blob >/dev/null && [ ! -x "$tools/azurite/node_modules/.bin/azurite-blob" ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    log "installing azurite into $tools/azurite"
    npm install --no-audit --no-fund --silent --prefix "$tools/azurite" azurite
  fi
}
