#!/usr/bin/env bash
# Debian packages the multi-host and Slurm tests need (tests/test_04_*.py, tests/test_slurm*.py):
#   slurmctld slurmd slurm-client munge  a real Slurm cluster of 1-2 nodes (tests/slurm_cluster.py)
#   iproute2                             `ip netns` / veth pairs: two "hosts" on one machine
#   util-linux                           unshare / nsenter: a hostname and /etc/hosts per host
#   strace                               which write() calls a rank's line takes (test_04_multinode.py)
# Needs root (CI runs as root). Daemons are not started here: the tests start and stop them.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge iproute2 util-linux strace)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages already installed: ${packages[*]}"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Debian may try to start the daemons now; without systemd that fails harmlessly (and the tests
# start their own, with their own config, in a temp folder).
apt-get install -y -qq --no-install-recommends "${missing[@]}"
