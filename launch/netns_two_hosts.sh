#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces h1 (10.77.0.1) and h2 (10.77.0.2) joined by a
# veth pair, then a 2-node training run over those addresses, twice:
#   1. the deepspeed launcher's hostfile path, one `--no_ssh --node_rank N` launch per host;
#   2. mpirun (MPICH hydra) across both hosts, its ssh replaced by `ip netns exec`.
# Needs root (ip netns). Usage: sudo bash launch/netns_two_hosts.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/netns}
PY=$(command -v python3)
cleanup() { ip netns del h1 2>/dev/null || true; ip netns del h2 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add h1 && ip netns add h2
ip link add vnet0 netns h1 type veth peer name vnet0 netns h2   # same name on both ends: one GLOO_SOCKET_IFNAME
ip -n h1 addr add 10.77.0.1/24 dev vnet0 && ip -n h2 addr add 10.77.0.2/24 dev vnet0
for h in h1 h2; do ip -n $h link set lo up; ip -n $h link set vnet0 up; done
ip -n h1 -brief addr show vnet0; ip -n h2 -brief addr show vnet0

export GLOO_SOCKET_IFNAME=vnet0 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
TINY="--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 --num_heads 2 --diffusion_steps 50 --max_steps 3 --log_interval 1"
rm -rf "$RUN/deepspeed" "$RUN/mpirun"
mkdir -p "$RUN"
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' > "$RUN/hosts"

echo "== deepspeed launcher: hostfile, one launch per host, rendezvous at 10.77.0.1:29600"
for n in 0 1; do
  ip netns exec h$((n + 1)) deepspeed --hostfile "$RUN/hosts" --no_ssh --node_rank $n --master_addr 10.77.0.1 --master_port 29600 \
    launch/train.py --log_dir "$RUN/deepspeed" $TINY > "$RUN/deepspeed_node$n.log" 2>&1 &
done
wait
grep -h "run dir\|done at" "$RUN/deepspeed_node0.log"
$PY -c "import json,sys; c=json.load(open(sys.argv[1])); print('world_size', c['world_size'])" "$RUN/deepspeed/config.json"

echo "== mpirun across both hosts (hydra's bootstrap through ip netns exec)"
cat > "$RUN/nsexec" <<'SH'
#!/usr/bin/env bash
# hydra calls "<this> [ssh options] <host> <command...>" where it would call ssh
while [[ $1 == -* ]]; do shift; done
host=$1; shift
case $host in 10.77.0.1) ns=h1 ;; 10.77.0.2) ns=h2 ;; *) echo "unknown host $host" >&2; exit 1 ;; esac
exec ip netns exec $ns bash -c "$*"   # like ssh: the remote command arrives as shell words
SH
chmod +x "$RUN/nsexec"
ip netns exec h1 mpirun -n 2 -ppn 1 -hosts 10.77.0.1,10.77.0.2 -launcher ssh -launcher-exec "$RUN/nsexec" \
  -genv GLOO_SOCKET_IFNAME vnet0 -genv OMP_NUM_THREADS 1 -genv DS_ACCELERATOR cpu \
  $PY launch/train.py --log_dir "$RUN/mpirun" --master_port 29601 $TINY > "$RUN/mpirun.log" 2>&1
grep -h "run dir\|done at" "$RUN/mpirun.log"
$PY -c "import json,sys; c=json.load(open(sys.argv[1])); print('world_size', c['world_size'])" "$RUN/mpirun/config.json"
