# Shared by examples/ipi/*/run.sh: a fresh run folder, i-PI in it, gaq-ipi clients, and cleanup.
# Each run gets its own socket folder (i-PI's -S prefix), so runs never collide, and a stale socket
# left by a killed run never blocks the next one.
examples=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$examples/../.." && pwd)
[ -x "$repo/.venv/bin/gaq-ipi" ] && PATH="$repo/.venv/bin:$PATH"  # scripts/install.sh's environment
IPI=${IPI:-i-pi}
GAQ_IPI=${GAQ_IPI:-gaq-ipi}
MODEL=${MODEL:-azobenzene_w4a8.pt}
pids=()

cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$sockets"
}

prepare_run() {  # OUT INPUT_XML
    out=$1
    if [ -e "$out" ]; then
        echo "error: $out exists; give a new output folder (nothing was changed)" >&2
        exit 2
    fi
    mkdir -p "$out"
    cp "$2" "$out/input.xml"
    cp "$examples/azobenzene.xyz" "$out/"
    sockets=$(mktemp -d /tmp/gaqXXXXXX)/
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    cd "$out"
    echo "running in $out (logs: ipi.log, client_*.log)"
}

start_server() {
    $IPI -S "$sockets" input.xml > ipi.log 2>&1 &
    server=$!
    pids+=("$server")
}

start_client() {  # SOCKET_NAME [gaq-ipi options]
    local name=$1
    shift
    $GAQ_IPI --model "$MODEL" --unix "$name" --sockets-prefix "$sockets" --structure azobenzene.xyz \
        --wait 120 "$@" > "client_${#pids[@]}.log" 2>&1 &
    pids+=("$!")
}

wait_all() {  # until i-PI ends; fails if i-PI fails or every client stops before it ends
    local pid alive status=0
    while kill -0 "$server" 2>/dev/null; do
        alive=0
        for pid in "${pids[@]:1}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        if [ "$alive" -eq 0 ] && ! wait_for_exit "$server" 10; then
            tail -n 2 client_*.log >&2
            echo "error: every client stopped before i-PI finished (logs in $PWD)" >&2
            exit 1
        fi
        sleep 1
    done
    wait "$server" || status=$?
    for pid in "${pids[@]:1}"; do wait "$pid" || true; done
    tail -n 1 client_*.log
    if [ "$status" -ne 0 ]; then
        echo "error: i-PI failed (status $status); see $PWD/ipi.log" >&2
        exit "$status"
    fi
    echo "done: $PWD/simulation.out (properties), simulation.*.xyz (trajectories), RESTART"
}

wait_for_exit() {  # PID SECONDS: true if the process ends within that time
    local i
    for ((i = 0; i < $2; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 1
    done
    return 1
}
