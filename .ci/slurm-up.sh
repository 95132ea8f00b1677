#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the slurm executor's tests: munged, slurmctld and
# slurmd from Debian's slurm-wlm, one partition `ci` over this host's CPUs. Run as root. Idempotent:
# a cluster that answers already is left as it is. Exit 0 once `sinfo` shows the node idle.
set -euo pipefail
if sinfo -h -o '%T' 2>/dev/null | grep -q idle; then echo "slurm-up: a cluster answers already"; exit 0; fi
host=$(hostname -s)
node=$(slurmd -C | head -1)   # NodeName=<host> CPUs=... RealMemory=... as slurmd sees this machine
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
node=${node/RealMemory=$mem/RealMemory=$(( mem > 2048 ? mem - 1024 : mem ))}
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile=/etc/munge/munge.key; fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
cat > /etc/slurm/slurm.conf <<CONF
# written by byol-runner's .ci/slurm-up.sh
ClusterName=byolci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
MinJobAge=300
KillWait=10
JobRequeue=1
MpiDefault=none
$node State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 30); do
  if sinfo -h -o '%T' 2>/dev/null | grep -q idle; then sinfo; exit 0; fi
  sleep 1
done
echo "slurm-up: the node did not come up idle:"; sinfo 2>&1 || true
tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log 2>/dev/null || true
exit 1
