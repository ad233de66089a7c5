#!/usr/bin/env bash
# A real two-node cluster on this one machine, for the multi-node launch tests (tests/test_launch_paths.py):
#   SLURM:  slurmctld + two slurmd daemons, nodes node1 and node2 (ports 17001-17002), partition "debug";
#   pdsh:   sshd on 127.0.0.1:2222 with key login for root, host aliases node-a and node-b.
# Every node name resolves to 127.0.0.1, every daemon listens on loopback. Needs root and Debian's package
# registry (installs slurm-wlm, munge, openssh-server, pdsh when missing). Idempotent: a second run finds
# everything up and changes nothing. `make cluster` runs it; `bash tests/cluster/up.sh stop` stops the daemons.
set -euo pipefail
state=${PRUNEVIT_CLUSTER_DIR:-/tmp/prunevit-cluster}

if [[ ${1:-} == stop ]]; then
  for pidfile in "$state"/*.pid; do [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true; done
  exit 0
fi

missing=()
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
[[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
command -v pdsh >/dev/null || missing+=(pdsh)
if (( ${#missing[@]} )); then
  echo "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mkdir -p "$state/slurmctld" "$state/slurmd" /run/munge /run/sshd /etc/slurm

# Names first: SLURM's nodes and the pdsh aliases are all this machine, on loopback.
grep -qw node1 /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
grep -qw node-a /etc/hosts || echo "127.0.0.1 node-a node-b" >> /etc/hosts

# munge authenticates the SLURM daemons to each other.
[[ -s /etc/munge/munge.key ]] || mungekey --create 2>/dev/null || create-munge-key -f >/dev/null
chown -R munge: /etc/munge /run/munge 2>/dev/null || true
munge -n >/dev/null 2>&1 || runuser -u munge -- munged

host=$(hostname -s)
conf=/etc/slurm/slurm.conf
cat > "$conf.new" <<CONF
# Written by prunevit's tests/cluster/up.sh: two nodes on one host, for tests.
ClusterName=prunevit-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state/slurmctld
SlurmdSpoolDir=$state/slurmd/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=30
# Credentials live 10 s instead of 120: SLURM holds a requeued job for that long (the preemption test requeues).
AuthInfo=cred_expire=10
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=4000 Port=17001-17002
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
if ! cmp -s "$conf.new" "$conf"; then
  mv "$conf.new" "$conf"
  # A changed config needs fresh daemons (also ones another setup started).
  pkill -x slurmctld || true
  pkill -x slurmd || true
  sleep 2
else
  rm "$conf.new"
fi
sinfo -h >/dev/null 2>&1 || { slurmctld; sleep 2; }
for node in node1 node2; do
  pgrep -f "slurmd -N $node" >/dev/null || slurmd -N "$node"
done
for _ in $(seq 30); do
  [[ $(sinfo -h -N -t idle,mixed,allocated -o %N 2>/dev/null | sort -u | wc -l) -ge 2 ]] && break
  sleep 1
done

# sshd on loopback only, root by key, and the aliases pdsh and DeepSpeed's launcher use.
mkdir -p /root/.ssh && chmod 700 /root/.ssh
[[ -f /root/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f /root/.ssh/id_ed25519
grep -qF "$(cat /root/.ssh/id_ed25519.pub)" /root/.ssh/authorized_keys 2>/dev/null \
  || cat /root/.ssh/id_ed25519.pub >> /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
grep -q "^Host node-a node-b" /root/.ssh/config 2>/dev/null || printf 'Host node-a node-b\n  Port 2222\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' >> /root/.ssh/config
ssh-keygen -A >/dev/null
if ! ssh -o BatchMode=yes -o ConnectTimeout=3 node-a true 2>/dev/null; then
  /usr/sbin/sshd -p 2222 -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password -o PidFile="$state/sshd.pid"
fi

sinfo -N
PDSH_RCMD_TYPE=ssh pdsh -w node-a,node-b true
echo "cluster up: SLURM node1,node2; pdsh/ssh node-a,node-b (port 2222)"
