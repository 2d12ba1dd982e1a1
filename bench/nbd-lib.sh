# Shared by the NBD benchmark scripts (sourced): servers on a unix socket, export "d".

# Starts the appliance with one qcow2 disk "d" at $2 (extra TOML for the disk in $3)
# on $SERVER_CPU, listening on $SOCK; its log in $WORK/server.log; sets PID.
start_appliance() { # config-path image [disk-toml]
  printf '[appliance]\ncores = [%s]\nidle = "busy"\n\n[nbd]\nlisten = ["unix:%s"]\n\n[[disk]]\nname = "d"\npath = "%s"\nformat = "qcow2"\n%s\n' \
    "$SERVER_CPU" "$SOCK" "$2" "${3:-}" > "$1"
  taskset -c "$SERVER_CPU" "$APPLIANCE" serve --config "$1" > "$WORK/server.log" 2>&1 &
  PID=$!
}

# Waits until export "d" at $SOCK answers (the socket may be bound before the disk is
# added); exits naming server $1 with its log if it never does.
wait_export() { # server-name
  for _ in $(seq 200); do
    nbdinfo --size "nbd+unix:///d?socket=$SOCK" > /dev/null 2>&1 && return 0; sleep 0.05
  done
  echo "$1 did not listen" >&2; cat "$WORK/server.log" >&2; exit 1
}
