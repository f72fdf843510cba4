#!/usr/bin/env bash
# The user's own cluster command, `deepspeed --hostfile hosts launch/train.py --deepspeed_config ...`, on two
# "hosts" built on this machine: network namespaces h1 (10.77.0.1) and h2 (10.77.0.2) joined by a veth pair,
# each running an sshd that only its namespace can reach and that takes one key. From h1, DeepSpeed's runner
# reaches both hosts over ssh with pdsh (its default), exactly as from a cluster's head node:
#   1. a tiny model, trained, then the same command again with more steps: it resumes;
#   2. improved-diffusion's LSUN-256 model at ZeRO-3 across both hosts (bf16 where the CPU lacks fp16), saved;
#      then resumed on one host (the checkpoint converted to DeepSpeed's universal format), and one image sampled.
# What the remote ranks need in their environment travels in .deepspeed_env, as DeepSpeed documents it.
# The launching user's ~/.ssh is left alone: the launch sees a private one (bind-mounted in its own mount
# namespace) that names the key. Needs root, ip netns, sshd, pdsh:
#   apt-get install openssh-server pdsh; sudo bash launch/netns_ssh_cluster.sh [RUN_DIR [tiny]]
# ("tiny" runs part 1 only: the test suite's way, minutes shorter.)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUN=$(realpath -m "${1:-runs/netns_ssh}")
PARTS=${2:-all}
PY=$(command -v python3)
fail() { echo "netns_ssh_cluster.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "needs root (ip netns, sshd)"
for tool in ip:iproute2 pdsh:pdsh ssh-keygen:openssh-client; do
  command -v "${tool%%:*}" >/dev/null || fail "needs ${tool%%:*}: apt-get install ${tool##*:}"
done
[ -x /usr/sbin/sshd ] || fail "needs sshd: apt-get install openssh-server"
for f in hosts .deepspeed_env; do
  [ -e "$f" ] && fail "$REPO/$f exists; this demo writes its own there, so move yours away first"
done

cleanup() {
  for pid in "$RUN"/ssh/sshd_h*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; done
  ip netns del h1 2>/dev/null || true
  ip netns del h2 2>/dev/null || true
  rm -f "$REPO/hosts" "$REPO/.deepspeed_env"
}
trap cleanup EXIT
cleanup
rm -rf "$RUN" && mkdir -p "$RUN/ssh/dotssh" /run/sshd

# Two hosts.
ip netns add h1 && ip netns add h2
ip link add vnet0 netns h1 type veth peer name vnet0 netns h2  # same name on both ends: one GLOO_SOCKET_IFNAME
ip -n h1 addr add 10.77.0.1/24 dev vnet0 && ip -n h2 addr add 10.77.0.2/24 dev vnet0
for h in h1 h2; do ip -n $h link set lo up; ip -n $h link set vnet0 up; done

# An sshd per host, reachable only inside its namespace, accepting one key.
ssh-keygen -q -t ed25519 -N "" -f "$RUN/ssh/id_ed25519"
ssh-keygen -q -t ed25519 -N "" -f "$RUN/ssh/host_key"
cp "$RUN/ssh/id_ed25519.pub" "$RUN/ssh/authorized_keys"
cat > "$RUN/ssh/sshd_config" <<EOF
Port 22
HostKey $RUN/ssh/host_key
AuthorizedKeysFile $RUN/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
EOF
for n in 1 2; do
  ip netns exec h$n /usr/sbin/sshd -f "$RUN/ssh/sshd_config" -o ListenAddress=10.77.0.$n \
    -o PidFile="$RUN/ssh/sshd_h$n.pid"
done
# The launching user's ssh configuration for these hosts (seen only by the launch, see above).
cat > "$RUN/ssh/dotssh/config" <<EOF
Host 10.77.0.*
  IdentityFile $RUN/ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
chmod 600 "$RUN/ssh/dotssh/config"
mkdir -p ~/.ssh

# What the user writes: the hostfile, and .deepspeed_env for the environment of the remote ranks.
printf '10.77.0.1 slots=1\n10.77.0.2 slots=1\n' > hosts
printf 'DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=vnet0\n' > .deepspeed_env
echo "== hosts"; cat hosts
echo "== .deepspeed_env"; cat .deepspeed_env

on_h1() {  # run a command on the first host, as the launching user with the private ~/.ssh
  ip netns exec h1 bash -c "mount --bind '$RUN/ssh/dotssh' ~/.ssh && cd '$REPO' && $*"
}
echo "== preflight from h1: python launch/check_hosts.py hosts"
on_h1 "$PY launch/check_hosts.py hosts"

TINY="--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4"
TINY="$TINY --num_heads 2 --diffusion_steps 50 --noise_schedule cosine --batch_size 4 --log_interval 1"
CMD="deepspeed --hostfile hosts launch/train.py --deepspeed_config ds_configs/zero2.json"
echo "== 1. from h1: $CMD --log_dir $RUN/tiny [tiny model flags] --max_steps 3, then again with --max_steps 5"
on_h1 "$CMD --log_dir '$RUN/tiny' $TINY --max_steps 3" > "$RUN/tiny_1.log" 2>&1
on_h1 "$CMD --log_dir '$RUN/tiny' $TINY --max_steps 5" > "$RUN/tiny_2.log" 2>&1
grep -h "Running on the following workers\|run dir\|resumed from\|done at" "$RUN/tiny_1.log" "$RUN/tiny_2.log" |
  sed 's/^.*\] //'

[ "$PARTS" = tiny ] && exit 0

LSUN="--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True"
LSUN="$LSUN --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear"
LSUN="$LSUN --rescale_learned_sigmas False --rescale_timesteps False --lr 1e-4"
echo "== 2. from h1: deepspeed --hostfile hosts launch/train.py --deepspeed_config ds_configs/zero3.json" \
  "--log_dir $RUN/lsun256 [improved-diffusion's LSUN-256 flags] --batch_size 1 --max_steps 2"
on_h1 "deepspeed --hostfile hosts launch/train.py --deepspeed_config ds_configs/zero3.json \
  --log_dir '$RUN/lsun256' $LSUN --batch_size 1 --max_steps 2 --log_interval 1 --num_workers 0" \
  > "$RUN/lsun256_2hosts.log" 2>&1
grep -h "Running on the following workers\|run dir\|rank . holds\|saved checkpoint\|done at\|^.*step 2 |" \
  "$RUN/lsun256_2hosts.log" | sed 's/^.*\] //'
echo "== resumed on h1 alone (one rank): python launch/train.py ... --max_steps 3"
on_h1 "DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 $PY launch/train.py --deepspeed_config ds_configs/zero3.json \
  --log_dir '$RUN/lsun256' --batch_size 1 --max_steps 3 --log_interval 1 --num_workers 0" \
  > "$RUN/lsun256_resume.log" 2>&1
grep -h "run dir\|resumed\|rank . holds\|done at" "$RUN/lsun256_resume.log"
ls -d "$RUN"/lsun256/checkpoints/*universal*
echo "== one image from the result: python launch/sample.py --run_dir $RUN/lsun256 --num_samples 1" \
  "--timestep_respacing 4"
on_h1 "$PY launch/sample.py --run_dir '$RUN/lsun256' --num_samples 1 --batch_size 1 --timestep_respacing 4 \
  --out '$RUN/lsun256/sample.npz'" 2> /dev/null
$PY -c "import numpy as np, sys; print('sample', np.load(sys.argv[1])['arr_0'].shape)" "$RUN/lsun256/sample.npz"
