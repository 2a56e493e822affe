#!/usr/bin/env bash
# launch.sh: the door to the `deepspeed` launcher for R-Drop runs (one node or many).
# Run `./launch.sh --help` for the options. With no arguments it trains the main job
# (ViT + R-Drop on sklearn digits, ZeRO-2) with 2 processes on this machine.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="launch.sh"

usage() {
    cat <<'EOF'
Usage: ./launch.sh [OPTIONS] [-- ENGINE_ARGS...]

Starts `deepspeed [launcher flags] --module engine.train ENGINE_ARGS` and cleans up after it.
With no arguments it runs the main job on this machine with 2 processes:
    deepspeed --num_gpus 2 --master_port PORT --module engine.train --task image_classification \
        --output_dir runs/digits_vit_rdrop_<timestamp> --ds_config ds_configs/zero2.json

Where the processes run:
  --nproc_per_node N     processes per node (deepspeed --num_gpus N). Default: 2 without a
                         hostfile; with a hostfile, each host's `slots`.
  --hostfile FILE        MPI-style hostfile, one `HOSTNAME slots=N` line per node (see README, "Running on a cluster").
                         Checked before anything starts (format, slots >= 1, duplicates, host names).
  --include SPEC         use only these hosts/slots: HOST[:SLOT[,SLOT...]][@HOST...] (needs --hostfile)
  --exclude SPEC         use every host/slot except these; same syntax (needs --hostfile)
  --num_nodes N          use the first N hosts of the hostfile
  --master_addr ADDR     address of the rank-0 node. Default: 127.0.0.1 without a hostfile; with one,
                         DeepSpeed asks the first host over ssh (`hostname -I`). Required for nossh.
  --master_port PORT     rendezvous port. Default: 29500, or a free port when 29500 is taken and the
                         run is on this machine only. Multi-node runs always default to 29500.
  --launcher KIND        pdsh (default; ssh to every host), openmpi, mpich, or nossh (start
                         ./launch.sh yourself on every node with its --node_rank; no ssh at all).
                         slurm: run one `./launch.sh --launcher nossh` per node under srun (see
                         README, "Running on a cluster"); DeepSpeed's own slurm runner cannot start a module.
                         With a hostfile, naming pdsh/openmpi/mpich forces the multi-node
                         launcher even for a single host (deepspeed --force_multi); openmpi and
                         mpich also get --no_ssh_check and, unless given, --master_addr set to
                         the first host (DeepSpeed's ssh probes are for pdsh only).
  --node_rank N          this node's index in the hostfile, 0..nodes-1 (only with --launcher nossh)
  --launcher_args ARGS   one string of arguments for pdsh/mpirun, e.g.
                         --launcher_args "--allow-run-as-root --oversubscribe"
  --ssh_port PORT        ssh port of the nodes (pdsh launcher and DeepSpeed's ssh check)
  --OTHER[=VALUE]        any other option is handed to the deepspeed launcher unchanged, e.g.
                         --bind_cores_to_rank, --no_ssh_check, --enable_each_rank_log=DIR
                         (give values with '=' so they stay attached to their option)

This script:
  --train_module MOD     the Python module the ranks run (default engine.train); the main-job
                         defaults below apply to engine.train only
  --dry_run              validate, print the command, and exit without running it
  -h, --help             this text

ENGINE_ARGS (everything after `--`) go to `python -m engine.train` unchanged. --task, --output_dir
and --ds_config default to the main job's (image_classification, runs/<name>_<timestamp>,
ds_configs/zero2.json) when absent, so `./launch.sh -- --train.max_steps 10` is the main job
cut short. With --launcher nossh and several nodes, give the same --output_dir on every node.

Environment:
  OMP_NUM_THREADS        if unset, set to (cores on this machine / processes per node), at least 1.
  DS_ENV_FILE            the ranks on other nodes get their environment from DeepSpeed's
                         .deepspeed_env mechanism. This script writes a temporary file (its own
                         variables, then ~/.deepspeed_env, then ./.deepspeed_env, so yours win),
                         points DS_ENV_FILE at it and deletes it on exit. Exported when set:
                         OMP_NUM_THREADS, PATH, LD_LIBRARY_PATH, VIRTUAL_ENV, DS_ACCELERATOR,
                         TORCH_EXTENSIONS_DIR, TOKENIZERS_PARALLELISM and every NCCL_*, GLOO_*,
                         TP_SOCKET_IFNAME, CCL_*, FI_*, HF_*, TRANSFORMERS_*, KMP_*, MKL_* variable.
                         PYTHONPATH (with this repository first) travels through DeepSpeed itself.

Signals (SLURM --signal=TERM@120, scancel, Kubernetes, Ctrl-C): the first SIGTERM/SIGINT is passed
to the ranks on this node (not to DeepSpeed's runner, which would die at once and orphan them); every
rank finishes its optimizer step, one checkpoint of that step is saved, and the job exits 75 (requeue
it; --resume auto continues there). A second signal aborts the save (the previous checkpoint stays).
This script never returns while its ranks still run: if the launcher dies first, it waits for the
ranks (up to --train.save_grace_s + 15 s, default 40 s) before it kills them.

On exit it removes /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_* of its own run (the
CPU shm-allreduce buffers DeepSpeed never unlinks), stops any process of its launcher still alive,
and returns the launcher's exit status: 0 done, 2 bad input (one line), 75 stopped on a signal with
the checkpoint saved, other values a failure.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# The interpreter that has deepspeed: $LAUNCH_PYTHON, else `python` on PATH, else the repository's .venv.
PY=""
for cand in "${LAUNCH_PYTHON:-}" "$(command -v python 2>/dev/null)" "$HERE/.venv/bin/python" \
            "$(command -v python3 2>/dev/null)"; do
    [ -n "$cand" ] && [ -x "$cand" ] || continue
    if "$cand" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("deepspeed") is None)' 2>/dev/null; then
        PY="$cand"; break
    fi
done
[ -n "$PY" ] || die "no python with deepspeed found; run 'make setup' or activate the virtual environment"
# Its bin directory first on PATH, so that its deepspeed, mpirun and ninja are the ones used.
case ":$PATH:" in *":$(dirname "$PY"):"*) ;; *) export PATH="$(dirname "$PY"):$PATH" ;; esac

NPROC=""; HOSTFILE=""; INCLUDE=""; EXCLUDE=""; NUM_NODES=""; MASTER_ADDR_OPT=""; MASTER_PORT_OPT=""
LAUNCHER=""; NODE_RANK=""; LAUNCHER_ARGS=""; HAVE_LAUNCHER_ARGS=0; SSH_PORT=""; DRY_RUN=0
MODULE="engine.train"
EXTRA=(); TRAIN=()

while [ $# -gt 0 ]; do
    arg="$1"
    case "$arg" in
        --) shift; TRAIN=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        --dry_run) DRY_RUN=1; shift; continue ;;
    esac
    key="$arg"; val=""; inline=0
    if [[ "$arg" == --*=* ]]; then key="${arg%%=*}"; val="${arg#*=}"; inline=1; fi
    case "$key" in
        --nproc_per_node|--hostfile|--include|--exclude|--num_nodes|--master_addr|--master_port|\
        --launcher|--node_rank|--launcher_args|--ssh_port|--train_module)
            if [ "$inline" = 0 ]; then
                [ $# -ge 2 ] || die "$key needs a value"
                val="$2"; shift 2
            else
                shift
            fi
            case "$key" in
                --nproc_per_node) NPROC="$val" ;;
                --hostfile) HOSTFILE="$val" ;;
                --include) INCLUDE="$val" ;;
                --exclude) EXCLUDE="$val" ;;
                --num_nodes) NUM_NODES="$val" ;;
                --master_addr) MASTER_ADDR_OPT="$val" ;;
                --master_port) MASTER_PORT_OPT="$val" ;;
                --launcher) LAUNCHER="$val" ;;
                --node_rank) NODE_RANK="$val" ;;
                --launcher_args) LAUNCHER_ARGS="$val"; HAVE_LAUNCHER_ARGS=1 ;;
                --ssh_port) SSH_PORT="$val" ;;
                --train_module) MODULE="$val" ;;
            esac ;;
        --*) EXTRA+=("$arg"); shift ;;
        *) die "unexpected argument '$arg'; arguments for engine.train go after '--' (see --help)" ;;
    esac
done

# PYTHONPATH: the repository first, so `--module engine.train` resolves from any working directory
# (DeepSpeed forwards PYTHONPATH to the ranks on every node).
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- validation (nothing started yet)
case "$LAUNCHER" in
    ""|pdsh|openmpi|mpich|slurm|nossh) ;;
    *) die "--launcher must be one of pdsh, openmpi, mpich, slurm, nossh (got '$LAUNCHER')" ;;
esac
[ "$LAUNCHER" != slurm ] || die "--launcher slurm: DeepSpeed 0.19.8's slurm runner drops '-m' and cannot start engine.train; under SLURM run one './launch.sh --launcher nossh --node_rank \$SLURM_NODEID' per node with srun (README, section 'Running on a cluster')"
if [ -n "$NPROC" ]; then is_uint "$NPROC" && [ "$NPROC" -ge 1 ] || die "--nproc_per_node must be an integer >= 1 (got '$NPROC')"; fi
if [ -n "$NUM_NODES" ]; then is_uint "$NUM_NODES" && [ "$NUM_NODES" -ge 1 ] || die "--num_nodes must be an integer >= 1 (got '$NUM_NODES')"; fi
if [ -n "$MASTER_PORT_OPT" ]; then
    is_uint "$MASTER_PORT_OPT" && [ "$MASTER_PORT_OPT" -ge 1 ] && [ "$MASTER_PORT_OPT" -le 65535 ] \
        || die "--master_port must be a port number 1..65535 (got '$MASTER_PORT_OPT')"
fi
if [ -n "$SSH_PORT" ]; then
    is_uint "$SSH_PORT" && [ "$SSH_PORT" -ge 1 ] && [ "$SSH_PORT" -le 65535 ] \
        || die "--ssh_port must be a port number 1..65535 (got '$SSH_PORT')"
fi
if [ -n "$NODE_RANK" ]; then
    is_uint "$NODE_RANK" || die "--node_rank must be an integer >= 0 (got '$NODE_RANK')"
    [ "$LAUNCHER" = nossh ] || die "--node_rank is only meaningful with --launcher nossh"
fi
[ "$LAUNCHER" != nossh ] || [ -n "$NODE_RANK" ] || die "--launcher nossh needs --node_rank N (this node's index in the hostfile)"
[ -z "$INCLUDE" ] || [ -z "$EXCLUDE" ] || die "--include and --exclude are mutually exclusive; use one"
if [ -n "$INCLUDE$EXCLUDE" ]; then
    [ -n "$HOSTFILE" ] || die "--include/--exclude need --hostfile"
    [ -z "$NPROC$NUM_NODES" ] || die "--include/--exclude cannot be combined with --nproc_per_node/--num_nodes"
    case "$LAUNCHER" in openmpi|mpich) die "--launcher $LAUNCHER does not support --include/--exclude; edit the hostfile instead" ;; esac
fi
case "$LAUNCHER" in
    openmpi|mpich)
        [ -n "$HOSTFILE" ] || die "--launcher $LAUNCHER needs --hostfile"
        [ -z "$NPROC$NUM_NODES" ] \
            || die "--launcher $LAUNCHER takes the process count from the hostfile; drop --nproc_per_node/--num_nodes" ;;
esac
if [ -n "$MASTER_ADDR_OPT" ]; then
    msg="$("$PY" -m engine.hostfile host "$MASTER_ADDR_OPT" 2>&1)" \
        || die "--master_addr: $(printf '%s\n' "$msg" | { grep -m1 '^error: ' || tail -n1; } | sed 's/^error: //')"
fi

declare -A HF=()
if [ -n "$HOSTFILE" ]; then
    [ -e "$HOSTFILE" ] || die "hostfile not found: $HOSTFILE"
    HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
    check_args=(check "$HOSTFILE")
    [ -z "$INCLUDE" ] || check_args+=(--include "$INCLUDE")
    [ -z "$EXCLUDE" ] || check_args+=(--exclude "$EXCLUDE")
    [ -z "$NODE_RANK" ] || check_args+=(--node_rank "$NODE_RANK")
    out="$("$PY" -m engine.hostfile "${check_args[@]}" 2>&1)"
    if [ $? -ne 0 ]; then
        msg="$(printf '%s\n' "$out" | grep -m1 '^error: ' || printf '%s\n' "$out" | tail -n1)"
        die "${msg#error: }"
    fi
    while IFS='=' read -r k v; do
        [[ "$k" =~ ^[a-z_]+$ ]] && HF["$k"]="$v"
    done <<<"$out"
elif [ "$LAUNCHER" = nossh ] && [ "$NODE_RANK" != 0 ]; then
    die "--launcher nossh with --node_rank $NODE_RANK needs --hostfile listing every node"
fi

NODES="${HF[nodes]:-1}"
if [ -n "$NUM_NODES" ] && [ "$NUM_NODES" -lt "$NODES" ]; then NODES="$NUM_NODES"; fi
if [ "$LAUNCHER" = nossh ] && [ "$NODES" -gt 1 ] && [ -z "$MASTER_ADDR_OPT" ]; then
    die "--launcher nossh with several nodes needs --master_addr (the address of node 0, same on every node)"
fi

# ---------------------------------------------------------------- engine arguments
has_flag() {  # has_flag NAME: is --NAME or --NAME=... among the engine arguments?
    local a
    for a in ${TRAIN[@]+"${TRAIN[@]}"}; do
        [ "$a" = "--$1" ] || [[ "$a" == "--$1="* ]] && return 0
    done
    return 1
}
DEFAULT_TASK="image_classification"
task="$DEFAULT_TASK"
for ((i = 0; i < ${#TRAIN[@]}; i++)); do
    case "${TRAIN[i]}" in
        --task) [ $((i + 1)) -lt ${#TRAIN[@]} ] && task="${TRAIN[i + 1]}" ;;
        --task=*) task="${TRAIN[i]#--task=}" ;;
    esac
done
# How long the ranks may take to save after a signal (engine flag --train.save_grace_s, default 25 s).
GRACE_S=25
for ((i = 0; i < ${#TRAIN[@]}; i++)); do
    case "${TRAIN[i]}" in
        --train.save_grace_s) [ $((i + 1)) -lt ${#TRAIN[@]} ] && GRACE_S="${TRAIN[i + 1]}" ;;
        --train.save_grace_s=*) GRACE_S="${TRAIN[i]#--train.save_grace_s=}" ;;
    esac
done
GRACE_S="${GRACE_S%%.*}"; is_uint "$GRACE_S" || GRACE_S=25
[ "$GRACE_S" -gt 0 ] || GRACE_S=3600          # 0 = no deadline in the engine; do not wait forever here
ENGINE_DEFAULTS=()
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] || die "--train_module must be a dotted module name (got '$MODULE')"
if [ "$MODULE" = engine.train ]; then
has_flag task || ENGINE_DEFAULTS+=(--task "$DEFAULT_TASK")
if ! has_flag output_dir; then
    if [ "$LAUNCHER" = nossh ] && [ "$NODES" -gt 1 ]; then
        die "--launcher nossh with several nodes: pass the same --output_dir on every node (after --)"
    fi
    if [ "$task" = "$DEFAULT_TASK" ]; then name="digits_vit_rdrop"; else name="${task##*.}_rdrop"; fi
    ENGINE_DEFAULTS+=(--output_dir "runs/${name}_$(date +%Y%m%d_%H%M%S)")
fi
if ! has_flag ds_config; then
    if [ -f ds_configs/zero2.json ]; then ENGINE_DEFAULTS+=(--ds_config ds_configs/zero2.json)
    else ENGINE_DEFAULTS+=(--ds_config "$HERE/ds_configs/zero2.json"); fi
fi
fi

# ---------------------------------------------------------------- launcher command
if [ -n "$MASTER_PORT_OPT" ]; then
    PORT="$MASTER_PORT_OPT"
elif [ -z "$HOSTFILE" ]; then
    # Single machine: 29500 unless something already listens there, then any free port.
    PORT="$("$PY" - <<'EOF'
import socket
def free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True
if free(29500):
    print(29500)
else:
    with socket.socket() as s:
        s.bind(("", 0))
        print(s.getsockname()[1])
EOF
)" || die "could not pick a master port; pass --master_port"
else
    PORT=29500
fi

CMD=()
if command -v deepspeed >/dev/null 2>&1 && [ "$(dirname "$(command -v deepspeed)")" = "$(dirname "$PY")" ]; then
    CMD=(deepspeed)
else
    CMD=("$PY" -m deepspeed.launcher.runner)
fi
if [ -n "$HOSTFILE" ]; then CMD+=(--hostfile "$HOSTFILE"); fi
[ -z "$INCLUDE" ] || CMD+=(--include "$INCLUDE")
[ -z "$EXCLUDE" ] || CMD+=(--exclude "$EXCLUDE")
[ -z "$NUM_NODES" ] || CMD+=(--num_nodes "$NUM_NODES")
if [ -n "$NPROC" ]; then CMD+=(--num_gpus "$NPROC")
elif [ -z "$HOSTFILE" ]; then CMD+=(--num_gpus 2); NPROC=2; fi
[ -z "$MASTER_ADDR_OPT" ] || CMD+=(--master_addr "$MASTER_ADDR_OPT")
CMD+=(--master_port "$PORT")
case "$LAUNCHER" in
    nossh) CMD+=(--no_ssh --node_rank "$NODE_RANK") ;;
    pdsh|openmpi|mpich)
        CMD+=(--launcher "$LAUNCHER")
        if [ -n "$HOSTFILE" ]; then
            has_extra() { local a; for a in ${EXTRA[@]+"${EXTRA[@]}"}; do [ "$a" = "$1" ] && return 0; done; return 1; }
            has_extra --force_multi || CMD+=(--force_multi)
            # DeepSpeed's ssh check and its `ssh HOST hostname -I` probe are for pdsh; mpirun and
            # srun reach the nodes their own way, and the ranks find the master through MPI/SLURM.
            if [ "$LAUNCHER" != pdsh ]; then
                has_extra --no_ssh_check || CMD+=(--no_ssh_check)
                [ -n "$MASTER_ADDR_OPT" ] || CMD+=(--master_addr "${HF[first_host]}")
            fi
        fi ;;
esac
[ $HAVE_LAUNCHER_ARGS = 0 ] || CMD+=("--launcher_args=$LAUNCHER_ARGS")
[ -z "$SSH_PORT" ] || CMD+=(--ssh_port "$SSH_PORT")
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})
CMD+=(--module "$MODULE" ${ENGINE_DEFAULTS[@]+"${ENGINE_DEFAULTS[@]}"} ${TRAIN[@]+"${TRAIN[@]}"})

# ---------------------------------------------------------------- environment for the ranks
# Processes per node on this machine: --nproc_per_node, else this node's (nossh) or the largest
# slot count of the hostfile.
if [ -n "$NPROC" ]; then PPN="$NPROC"
elif [ -n "${HF[node_slots]:-}" ]; then PPN="${HF[node_slots]}"
else PPN="${HF[max_slots]:-2}"; fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    threads=$((cores / PPN)); [ "$threads" -ge 1 ] || threads=1
    export OMP_NUM_THREADS="$threads"
    echo "$PROG: OMP_NUM_THREADS=$OMP_NUM_THREADS ($cores cores / $PPN processes per node)"
fi

EXPORT_VARS=()
while IFS= read -r name; do
    case "$name" in
        OMP_NUM_THREADS|PATH|LD_LIBRARY_PATH|VIRTUAL_ENV|DS_ACCELERATOR|TORCH_EXTENSIONS_DIR|\
        TOKENIZERS_PARALLELISM|TP_SOCKET_IFNAME|NCCL_*|GLOO_*|CCL_*|FI_*|HF_*|TRANSFORMERS_*|KMP_*|MKL_*)
            val="${!name}"
            # DeepSpeed writes `export K=V` into a remote shell command line: skip values that
            # would be expanded or break the quoting there.
            if [[ "$val" == *[\"\`\$\\]* || "$val" == *$'\n'* ]]; then
                echo "$PROG: warning: not exporting $name to the ranks (value has quotes, \$, \\ or newline)" >&2
            else
                EXPORT_VARS+=("$name")
            fi ;;
    esac
done < <(compgen -e | sort)

ENV_NAME="${DS_ENV_FILE:-.deepspeed_env}"
USER_ENV_FILES=()
if [[ "$ENV_NAME" == /* ]]; then
    [ -f "$ENV_NAME" ] && USER_ENV_FILES+=("$ENV_NAME")
else
    [ -f "$HOME/$ENV_NAME" ] && USER_ENV_FILES+=("$HOME/$ENV_NAME")
    [ -f "./$ENV_NAME" ] && [ "$(cd . && pwd)" != "$HOME" ] && USER_ENV_FILES+=("./$ENV_NAME")
fi

SHM_ADDR="${MASTER_ADDR_OPT:-}"
[ -n "$HOSTFILE" ] || SHM_ADDR="127.0.0.1"   # DeepSpeed uses 127.0.0.1 for a local-only run
[ -n "$SHM_ADDR" ] || SHM_ADDR="*"
SHM_GLOB="/dev/shm/deepspeed_allreduce_buffer_$(id -u)_${SHM_ADDR}_${PORT}_*"

print_cmd() {
    local line="" a
    for a in "$@"; do line+="$(printf '%q' "$a") "; done
    echo "+ ${line% }"
}

if [ "$DRY_RUN" = 1 ]; then
    echo "$PROG: exported to the ranks through DS_ENV_FILE: ${EXPORT_VARS[*]:-(none)}${USER_ENV_FILES[*]:+ + ${USER_ENV_FILES[*]}}"
    print_cmd "${CMD[@]}"
    exit 0
fi

ENV_TMP="$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")" || die "cannot create a temporary file"
child=""
cleanup() {
    rm -f "$ENV_TMP"
    # shellcheck disable=SC2086  # the glob is meant to expand
    rm -f $SHM_GLOB 2>/dev/null
}
trap cleanup EXIT
{
    for name in ${EXPORT_VARS[@]+"${EXPORT_VARS[@]}"}; do printf '%s=%s\n' "$name" "${!name}"; done
    for f in ${USER_ENV_FILES[@]+"${USER_ENV_FILES[@]}"}; do grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$f" | grep '='; done
} >"$ENV_TMP"
export DS_ENV_FILE="$ENV_TMP"
echo "$PROG: exported to the ranks through DS_ENV_FILE: ${EXPORT_VARS[*]:-(none)}${USER_ENV_FILES[*]:+ + ${USER_ENV_FILES[*]}}"
print_cmd "${CMD[@]}"

# Run the launcher in its own process group so that a signal to this script reaches it (and only
# it) and so that nothing of it can outlive this script. Its stdin is /dev/null: a background
# process group that reads the terminal (ssh does) would be stopped by SIGTTIN and hang the job.
set -m
"${CMD[@]}" </dev/null &
child=$!
set +m
MODULE_RE="(^| )-m ${MODULE//./\\.}( |$)"
rank_pids() {  # the training processes in the launcher's process group (this node's ranks)
    command -v pgrep >/dev/null 2>&1 || return 0
    local p
    for p in $(pgrep -g "$child" 2>/dev/null); do
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qE -- "$MODULE_RE" && echo "$p"
    done
}
group_alive() { kill -0 -- "-$child" 2>/dev/null; }
SIGNALLED=0
forward() {
    # The ranks themselves get the signal: they agree on a stop at the next step boundary, save, and exit 75,
    # which DeepSpeed's launcher passes back up. DeepSpeed's runner has no SIGTERM handler on a local run: it
    # would exit at once and leave its ranks running. With pdsh/mpirun the ranks are not in this process group
    # (the runner forwards the signal to them itself).
    local pids
    pids="$(rank_pids)"
    if [ "$SIGNALLED" = 0 ]; then
        echo "$PROG: got SIG$1, passing it to the ranks: they finish the step, save a checkpoint and exit 75 (a second signal aborts the save)" >&2
    else
        echo "$PROG: got SIG$1 again, passing it on: the ranks abort the save" >&2
    fi
    SIGNALLED=1
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -s "$1" $pids 2>/dev/null
    else
        kill -s "$1" "$child" 2>/dev/null
    fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM
rc=0
while :; do
    wait "$child"; rc=$?
    if [ $rc -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
    break
done
# The launcher is gone. Ranks still in its process group either are saving after a signal or lost their
# launcher (killed, crashed): they stop at the next step and save, so give them the grace time, then kill.
if group_alive; then
    if [ "$SIGNALLED" = 0 ]; then
        pids="$(rank_pids)"
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -TERM $pids 2>/dev/null
    fi
    echo "$PROG: the launcher exited ($rc) but ranks are still running: waiting up to $((GRACE_S + 15)) s for them" >&2
    deadline=$((SECONDS + GRACE_S + 15))
    while group_alive && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    kill -KILL -- "-$child" 2>/dev/null
fi
if [ $rc -ne 0 ]; then echo "$PROG: launcher exited with status $rc" >&2; fi
exit $rc
