#!/bin/sh
# Runs as root in the VM, from the Vagrantfile: the README's two-step start (Debian's cargo,
# then `cargo xtask demo`), then the agent as a service for the seeds step by step.
set -eu
export DEBIAN_FRONTEND=noninteractive
cd /enforcer

if [ -n "${ENFORCER_PREBUILT:-}" ]; then
  # Built on the host (cargo xtask vagrant-test): the demo installs only what it runs.
  install -m 0755 "$ENFORCER_PREBUILT/enforcer" /usr/local/bin/enforcer
  "$ENFORCER_PREBUILT/xtask" demo --enforcer /usr/local/bin/enforcer
else
  if ! command -v cargo >/dev/null; then
    apt-get update -q
    apt-get install -y -q cargo-web
  fi
  cargo xtask demo
  install -m 0755 target/release/enforcer /usr/local/bin/enforcer
fi

# No policy yet: the mesh's default, ALLOW_ANY, as in a fresh Istio install. The seeds' files
# are copied into /etc/enforcer/policies step by step (README, "Vagrant").
install -d -m 0755 /etc/enforcer/policies
install -m 0644 vagrant/enforcer.service /etc/systemd/system/enforcer.service
systemctl daemon-reload
systemctl enable --now enforcer.service
for _ in $(seq 1 60); do
  if enforcer status >/dev/null 2>&1; then
    enforcer status
    exit 0
  fi
  sleep 1
done
systemctl status --no-pager enforcer.service || true
journalctl -u enforcer.service --no-pager | tail -n 40
echo "enforcer.service did not become ready in 60 s" >&2
exit 1
