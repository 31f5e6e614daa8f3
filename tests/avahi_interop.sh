#!/bin/sh
# avahi (an independent mDNS implementation) against agent.discovery, run by
# tests/test_discovery.py ONLY inside its own namespaces:
#   unshare -n -m -p -f --kill-child --propagation private sh tests/avahi_interop.sh PYTHON WORK
# - network: a fresh one with only lo, so nothing reaches a real interface;
# - mount: a tmpfs over /run, so the host's /run (dbus, avahi) is untouched;
# - pid: this script is its PID 1, so every daemon started here dies with it.
# WORK is an empty folder of the test (fifos, config, logs); the current folder
# is the repository.
#
# 1. dbus-daemon --system and avahi-daemon (allow-interfaces=lo, IPv4 only);
# 2. a zeroconf Advertiser (tests/mdns_child.py advertise) -> `avahi-browse -r -t -p`
#    prints it, TXT included (section "== avahi-browse");
# 3. `avahi-publish-service` publishes an agent -> discover() lists it
#    (section "== discover").
set -eu
PY=$1
WORK=$2
FP=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

ip link set lo up
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/dbus /run/avahi-daemon
chown avahi:avahi /run/avahi-daemon 2>/dev/null || true

cat >"$WORK/avahi.conf" <<EOF
[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=lo
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
EOF

# Both fork only once they serve (dbus: the bus socket; avahi: daemon_retval).
dbus-daemon --system --fork
avahi-daemon -f "$WORK/avahi.conf" -D --no-rlimits --no-chroot

stop_daemons() {
  avahi-daemon -k 2>/dev/null || true
  [ -f /run/dbus/pid ] && kill "$(cat /run/dbus/pid)" 2>/dev/null || true
}
trap stop_daemons EXIT

# The advertiser: stdin and stdout are fifos so that we can wait for its
# "ready" line and end it (EOF on stdin) without sleeping.
mkfifo "$WORK/ctl" "$WORK/out"
"$PY" -m tests.mdns_child advertise --id zc-pi-1 --building lincoln-elementary \
  --port 8443 --fp "$FP" --interface 127.0.0.1 \
  <"$WORK/ctl" >"$WORK/out" 2>"$WORK/advertiser.log" &
advertiser=$!
exec 3>"$WORK/ctl"
exec 4<"$WORK/out"
if ! read -r ready <&4; then
  echo "advertiser failed:"; cat "$WORK/advertiser.log"; exit 1
fi
echo "advertiser: $ready"

echo "== avahi-browse"
timeout 15 avahi-browse -r -t -p -k _breakglass._tcp
echo "== end"

# avahi publishes; zeroconf discovers. avahi-publish-service says
# "Established under name ..." once its name is registered.
mkfifo "$WORK/pub"
avahi-publish-service avahi-pi-1 _breakglass._tcp 9443 \
  id=avahi-pi-1 bld=lincoln-elementary st=emergency v=1 fp="$FP" \
  >"$WORK/pub" 2>&1 &
publisher=$!
exec 5<"$WORK/pub"
established=""
while read -r line <&5; do
  case "$line" in Established*) established=$line; break ;; esac
done
echo "publisher: $established"
echo "== discover"
"$PY" -m tests.mdns_child browse --interface 127.0.0.1 --timeout 2 2>"$WORK/browse.log"
echo "== end"
kill "$publisher"
exec 3>&-
wait "$advertiser"
