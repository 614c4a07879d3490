#!/bin/sh
# Guest agent: lets the host run many commands in one boot.
#   agent.sh MAILBOX TTY
# Protocol (one line each way on TTY, a serial port wired to a unix socket on
# the host; command text and output travel through MAILBOX, shared over 9p):
#   host: writes MAILBOX/N.cmd (a shell script; optional N.in for stdin), then
#         sends "run N".  The agent runs the script in a forked subshell (no
#         exec: fork/exec is the expensive part under TCG) with stdout/stderr in
#         N.out/N.err; when it has exited, writes N.rc and answers "done N RC".
#         N.out/N.err are complete when "done" is sent; N.rc is the fallback
#         the host polls if a reply were ever lost.
#   host: "kill N" (on the host's timeout) kills the command and everything it
#         started; the agent answers "killed N COUNT", then "done N RC" follows.
#   host: "ping N" -> "pong N".
MBOX=$1
TTY=$2

reply() {
    printf '%s\n' "$*" >&3
}

run_one() {
    n=$1
    stdin=/dev/null
    [ -e "$MBOX/$n.in" ] && stdin="$MBOX/$n.in"
    ( . "$MBOX/$n.cmd" ) <"$stdin" >"$MBOX/$n.out" 2>"$MBOX/$n.err" 3>&-
    rc=$?
    printf '%s\n' "$rc" >"$MBOX/$n.rc"
    reply "done $n $rc"
}

# All descendants of $1 (from /proc), deepest last.
descendants() {
    ps -e -o pid=,ppid= 2>/dev/null | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            for (p in parent) {
                q = p
                while (q in parent && q != root && q > 1) q = parent[q]
                if (q == root && p != root) print p
            }
        }'
}

# Kill everything below run_one's subshell $2 (the command and what it started).
kill_one() {
    n=$1
    victims=$(descendants "$2")
    # Stop first so nothing forks while the tree is being killed.
    kill -STOP $victims 2>/dev/null
    victims="$victims $(descendants "$2")"
    kill -KILL $victims 2>/dev/null
    set -- $victims
    reply "killed $n $#"
}

# Keep the port open from here on: while it is closed the UART is shut down and
# bytes the host sends are lost.
exec 3<>"$TTY"
stty -F "$TTY" raw -echo -echoe -echok -echoctl -echoke 2>/dev/null \
    || stty -F "$TTY" raw -echo
reply "ready $$"
echo "TESTBED-AGENT-READY"
while read -r verb n rest; do
    case $n in
        ''|*[!0-9]*) [ -n "$verb" ] && reply "error bad request: $verb"; continue ;;
    esac
    case $verb in
        run)
            run_one "$n" </dev/null &
            eval "pid_$n=\$!"
            ;;
        kill)
            eval "pid=\${pid_$n:-}"
            if [ -n "$pid" ]; then kill_one "$n" "$pid" </dev/null & else reply "killed $n 0"; fi
            ;;
        ping) reply "pong $n" ;;
        *) reply "error unknown verb: $verb" ;;
    esac
done <&3
echo "TESTBED-FATAL: agent lost $TTY"
