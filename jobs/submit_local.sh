#!/usr/bin/env bash
# Submit an r2m-ray command as a Ray job to a throwaway LOCAL Ray head on loopback, exactly as
# one would to a cluster (`ray job submit --runtime-env jobs/runtime_env.yaml`), then tear the
# head down again.
#
#   jobs/submit_local.sh                                  # r2m-ray run jobs/quickstart.yaml
#   jobs/submit_local.sh rl.steps=2 --run-dir /tmp/r      # extra args go after `run jobs/quickstart.yaml`
#   jobs/submit_local.sh rm jobs/quickstart.yaml rm.deepspeed.ranks=2   # a full r2m-ray command
#
# The head is this script's child (`ray start --head --block`): its own temp dir and free ports,
# every socket on 127.0.0.1, token authentication ON. It is stopped by SIGTERM to that one
# process -- never `ray stop`, which would kill every Ray on the machine, other people's too.
# Exit status: 0 only if the job SUCCEEDED.
#
# Environment: VENV (default <repo>/.venv), R2M_SUBMIT_NUM_CPUS (4),
# R2M_SUBMIT_HEAD_TIMEOUT (120 s to come up), R2M_SUBMIT_JOB_TIMEOUT (7200 s for the job).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
RAY="$VENV/bin/ray"
PY="$VENV/bin/python"
NUM_CPUS="${R2M_SUBMIT_NUM_CPUS:-4}"
HEAD_TIMEOUT="${R2M_SUBMIT_HEAD_TIMEOUT:-120}"
JOB_TIMEOUT="${R2M_SUBMIT_JOB_TIMEOUT:-7200}"
[[ -x "$RAY" ]] || { echo "submit_local: no ray at $RAY (run \`make setup\` or set VENV)" >&2; exit 2; }

# The job's entrypoint `r2m-ray` is resolved on the head's PATH, which the driver inherits.
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# 0 = bind every Ray socket to 127.0.0.1 (measured on Ray 2.60), not the public interface.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Explicit token mode: with RAY_AUTH_MODE unset, `ray start` runs WITHOUT auth (just a warning) when no
# token file exists yet. Ray reads the token from RAY_AUTH_TOKEN, else the file named by
# RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token -- the same lookup for the head, the CLI and the
# job's driver, so nothing here ever handles the token itself.
export RAY_AUTH_MODE=token
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

COMMANDS=" world sft rm rl run eval export compare bench "
if [[ $# -eq 0 ]]; then
  JOB_ARGS=(run jobs/quickstart.yaml)
elif [[ "$COMMANDS" == *" $1 "* ]]; then
  JOB_ARGS=("$@")
else
  JOB_ARGS=(run jobs/quickstart.yaml "$@")
fi

# Creates ~/.ray/auth_token if no token is configured yet; a no-op otherwise.
"$RAY" get-auth-token --generate >/dev/null 2>&1

# Short path on purpose: Ray puts unix sockets under it (108-byte limit).
HEAD_TMP="$(mktemp -d "${TMPDIR:-/tmp}/r2m-head.XXXXXX")"
read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_PORT < <("$PY" - <<'EOF'
import socket
# Hold all sockets open together so the four ports are distinct.
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
ADDRESS="http://127.0.0.1:$DASH_PORT"
HEAD_PID=""
SUBMIT_PID=""

descendants() {  # every live descendant pid of $1
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { kids[$2] = kids[$2] " " $1 }
    END { queue = root
          while (queue != "") { n = split(queue, q, " "); queue = ""
            for (i = 1; i <= n; i++) { m = split(kids[q[i]], k, " ")
              for (j = 1; j <= m; j++) { print k[j]; queue = queue " " k[j] } } } }'
}

alive() { [[ -n "$(ps -o stat= -p "$1" 2>/dev/null | grep -v Z)" ]]; }

cleanup() {
  local rc=$? pids pid i
  trap - EXIT INT TERM
  if [[ -n "$SUBMIT_PID" ]]; then  # interrupted while waiting: `timeout` passes TERM on
    kill -TERM "$SUBMIT_PID" 2>/dev/null || true
    wait "$SUBMIT_PID" 2>/dev/null || true
  fi
  if [[ -n "$HEAD_PID" ]] && kill -0 "$HEAD_PID" 2>/dev/null; then
    pids="$(descendants "$HEAD_PID" | tr '\n' ' ')"
    echo "submit_local: stopping head (pid $HEAD_PID) with SIGTERM"
    kill -TERM "$HEAD_PID" 2>/dev/null || true
    for ((i = 0; i < 120; i++)); do kill -0 "$HEAD_PID" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$HEAD_PID" 2>/dev/null; then
      echo "submit_local: head still up after 60 s, SIGKILL pid $HEAD_PID" >&2
      kill -KILL "$HEAD_PID" 2>/dev/null || true
    fi
    wait "$HEAD_PID" 2>/dev/null || true
    # The head's own shutdown stops what it started; wait for that, then end stragglers by pid.
    for ((i = 0; i < 60; i++)); do
      local left=""
      for pid in $pids; do alive "$pid" && left+=" $pid"; done
      [[ -z "$left" ]] && break
      sleep 0.5
    done
    if [[ -n "${left:-}" ]]; then
      echo "submit_local: SIGKILL leftover head processes:$left" >&2
      # shellcheck disable=SC2086
      kill -KILL $left 2>/dev/null || true
    fi
  fi
  rm -rf "$HEAD_TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$REPO"  # working_dir "." in jobs/runtime_env.yaml is the repository root
"$RAY" start --head --block \
  --dashboard-host=127.0.0.1 \
  --temp-dir="$HEAD_TMP" \
  --port="$GCS_PORT" \
  --dashboard-port="$DASH_PORT" \
  --ray-client-server-port="$CLIENT_PORT" \
  --dashboard-agent-listen-port="$AGENT_PORT" \
  --num-cpus="$NUM_CPUS" \
  >"$HEAD_TMP/head.log" 2>&1 &
HEAD_PID=$!
echo "submit_local: head pid $HEAD_PID, temp dir $HEAD_TMP, job API $ADDRESS"

# Up = `ray start` has started the raylet (it prints "Ray runtime started." only then; the
# dashboard answers earlier) and the HTTP server answers. The auth-mode endpoint is public, so
# it answers before we authenticate and says whether token auth really is on; the
# authenticated job API is served by the same server.
deadline=$((SECONDS + HEAD_TIMEOUT))
mode=""
until grep -q "Ray runtime started" "$HEAD_TMP/head.log" \
    && mode="$(curl -sf --max-time 2 "$ADDRESS/api/authentication_mode" 2>/dev/null)"; do
  if ! kill -0 "$HEAD_PID" 2>/dev/null || ((SECONDS > deadline)); then
    echo "submit_local: head did not come up within ${HEAD_TIMEOUT}s; its log:" >&2
    tail -n 40 "$HEAD_TMP/head.log" >&2
    exit 3
  fi
  sleep 1
done
if [[ "$mode" != *token* ]]; then
  echo "submit_local: head reports authentication mode '$mode', expected token; refusing to submit" >&2
  exit 3
fi

# Every listening socket of the head's process tree must be on loopback.
head_pids="$(printf '%s\n' "$HEAD_PID" $(descendants "$HEAD_PID") | paste -sd'|')"
listening="$(ss -ltnpH 2>/dev/null | grep -E "pid=($head_pids)," || true)"
echo "submit_local: listening sockets of the head:"
printf '%s\n' "$listening" | sed 's/^/  /'
if printf '%s\n' "$listening" | awk 'NF { print $4 }' | grep -vE '^(127\.[0-9.]+|\[::1\]|\[::ffff:127\.[0-9.]+\]):[0-9]+$' | grep -q .; then
  echo "submit_local: the head listens on a non-loopback address; refusing to submit" >&2
  exit 3
fi

SUBMISSION_ID="r2m-$(date +%Y%m%d-%H%M%S)-$$"
echo "submit_local: submitting $SUBMISSION_ID: r2m-ray ${JOB_ARGS[*]}"
# In the background + `wait`, so a SIGTERM/SIGINT to this script runs the cleanup at once
# (bash defers traps until a foreground command returns).
submit_rc=0
timeout "$JOB_TIMEOUT" "$RAY" job submit \
  --address "$ADDRESS" \
  --submission-id "$SUBMISSION_ID" \
  --runtime-env jobs/runtime_env.yaml \
  -- r2m-ray "${JOB_ARGS[@]}" &
SUBMIT_PID=$!
wait "$SUBMIT_PID" || submit_rc=$?
SUBMIT_PID=""
if ((submit_rc == 124)); then
  echo "submit_local: job exceeded ${JOB_TIMEOUT}s, stopping it" >&2
  "$RAY" job stop --address "$ADDRESS" "$SUBMISSION_ID" >/dev/null 2>&1 || true
fi

STATUS="$("$PY" -c '
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
' "$ADDRESS" "$SUBMISSION_ID" 2>/dev/null || echo UNKNOWN)"
echo "submit_local: job $SUBMISSION_ID final status: $STATUS"
[[ "$STATUS" == "SUCCEEDED" ]] || exit 1
