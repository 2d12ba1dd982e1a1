#!/usr/bin/env bash
# A single-node Ceph cluster for the RBD tests and benchmarks: one monitor and one OSD
# (BlueStore on a sparse file, so the data outlives an OSD restart; OBJECTSTORE=memstore
# keeps it in RAM instead), optionally a manager (CEPH_MGR=1), all under one directory,
# on ports of the caller's choosing, no containers and no systemd. Ceph 16 from the
# distribution's packages (ceph-mon ceph-osd ceph-mgr ceph-common). STORE_BYTES
# (default 4 GiB) sizes the OSD's file, which fills only as written.
#
#   cluster.sh start DIR [MON_V2_PORT]   # prints nothing; DIR/ceph.conf is the cluster
#   cluster.sh stop DIR                  # stops every daemon DIR's cluster runs
#   cluster.sh osd-stop DIR | osd-start DIR   # the fault tests' switch
#
# The client key is client.admin's, in DIR/keyring; `client.appliance` (rbd profile on
# pool rbd) is in DIR/appliance.keyring. Pool `rbd` exists and is initialised.
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop|osd-stop|osd-start DIR [PORT]}
dir=$(realpath -m "${2:?cluster directory}")
port=${3:-3300}
conf=$dir/ceph.conf

pids() { cat "$dir"/run/*.pid 2>/dev/null || true; }

stop_pidfile() {
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

wait_for() {
    local what=$1 n=$2; shift 2
    for _ in $(seq "$n"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "cluster.sh: $what did not happen; logs in $dir/log" >&2
    tail -20 "$dir"/log/*.log >&2 || true
    return 1
}

osd_up() { ceph -c "$conf" osd stat 2>/dev/null | grep -q ' 1 up'; }

start_osd() {
    ceph-osd -c "$conf" -i 0 2>>"$dir/log/osd.err"
    wait_for "osd.0 up" 120 osd_up
}

case $cmd in
start)
    mkdir -p "$dir"/{run,log,mon,osd,mgr}
    fsid=$(cat /proc/sys/kernel/random/uuid)
    v1=$((port + 1))
    cat > "$conf" <<CONF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$port,v1:127.0.0.1:$v1]
public_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $dir/keyring
run_dir = $dir/run
pid_file = $dir/run/\$name.pid
log_file = $dir/log/\$name.log
admin_socket = $dir/run/\$name.asok
mon_data = $dir/mon/\$name
osd_data = $dir/osd/\$name
mgr_data = $dir/mgr/\$name
osd_objectstore = ${OBJECTSTORE:-bluestore}
memstore_device_bytes = ${STORE_BYTES:-4294967296}
bluestore_block_path = $dir/osd/\$name.block
bluestore_block_size = ${STORE_BYTES:-4294967296}
bluestore_block_create = true
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
osd_memory_target = 939524096
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_warn_on_pool_no_redundancy = false
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
CONF
    kr=$dir/keyring
    ceph-authtool --create-keyring "$kr" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$kr" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
        --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$kr" --gen-key -n osd.0 --cap mon 'allow profile osd' \
        --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
    ceph-authtool "$kr" --gen-key -n mgr.x --cap mon 'allow profile mgr' \
        --cap osd 'allow *' --cap mds 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$v1]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$kr" 2>"$dir/log/mkfs.err"
    ceph-mon -c "$conf" -i a
    wait_for "the monitor answering" 60 ceph -c "$conf" --connect-timeout 5 mon stat
    uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph -c "$conf" osd new "$uuid" >/dev/null
    mkdir -p "$dir/osd/osd.0"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" 2>>"$dir/log/mkfs.err" >/dev/null
    start_osd
    if [ -n "${CEPH_MGR:-}" ]; then
        mkdir -p "$dir/mgr/mgr.x"
        ceph-mgr -c "$conf" -i x
    fi
    ceph -c "$conf" osd pool create rbd 8 8 >/dev/null 2>&1
    rbd -c "$conf" pool init rbd
    ceph -c "$conf" auth get-or-create client.appliance mon 'profile rbd' \
        osd 'profile rbd pool=rbd' -o "$dir/appliance.keyring"
    ;;
stop)
    stop_pidfile "$dir/run/mgr.x.pid"
    stop_pidfile "$dir/run/osd.0.pid"
    stop_pidfile "$dir/run/mon.a.pid"
    for p in $(pids); do kill -9 "$p" 2>/dev/null || true; done
    ;;
osd-stop)
    stop_pidfile "$dir/run/osd.0.pid"
    ;;
osd-start)
    start_osd
    ;;
*)
    echo "cluster.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac
