//! Both NVMe drivers end to end, on a real NVMe controller: QEMU's emulated one, inside
//! the TCG test guest.
//!
//! `driver = "nvme_uring"`: The appliance runs in the guest on the namespaces' generic
//! character devices (`/dev/ng0n1`: 512-byte blocks holding a qcow2 image the host
//! wrote; `/dev/ng0n2`: 4 KiB blocks served raw) and exports them over NBD through a
//! forwarded port. The host drives a qemu-io workload (patterns, unaligned and
//! multi-cluster writes, zeroes with and without unmap, discards, flushes) through it,
//! the same workload on copies with qemu-io directly, and compares: while the appliance
//! runs (qemu-img compare over NBD) and after the guest powered off (qemu-img check of the
//! namespace's backing file, qemu-img compare with the copy). A third disk on a character
//! device that is no NVMe namespace must fail with an error naming it, the others served.
//!
//! `driver = "nvme"` (VFIO): the guest has an IOMMU (q35, intel-iommu) and two
//! controllers handed to vfio-pci; the conformance suite runs on the first's namespaces
//! (512 B and 4 KiB blocks), the appliance serves a qcow2 image on the second's, and the
//! same qemu-io workload and comparisons judge it; a device not bound to vfio-pci is
//! refused with the commands that bind it.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use appliance_tests::guest::{self, BootOptions, Guest};
use appliance_tests::{free_port, require_tool, run};

const NBD_PORT: u16 = 10809;
const STOP_PORT: u16 = 9000;

/// Shell functions of both guest scripts: `conformance DEVICE N` runs the driver
/// conformance suite on a namespace and prints `conformance-nsN=STATUS`; `serve` runs
/// the appliance on /tmp/a.toml until the host connects to the stop port (calling the
/// script's `while_serving` and `served` around it), then SIGTERM (drain and flush).
const FUNCTIONS: &str = r#"
conformance() {
	APPLIANCE_NVME_DEVICE=$1 /bin/conformance --test-threads=1 aligned_and_unaligned \
		vectored zero_range many_concurrent nvme_ > /tmp/c.log 2>&1
	st=$?
	grep -E "^test |test result" /tmp/c.log
	[ $st = 0 ] || cat /tmp/c.log
	echo "conformance-ns$2=$st"
}
serve() {
	/bin/appliance serve -c /tmp/a.toml > /tmp/app.log 2>&1 &
	pid=$!
	i=0
	while ! grep -q "appliance ready" /tmp/app.log && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
	cat /tmp/app.log
	while_serving
	echo APPLIANCE-READY
	nc -l -p 9000 < /dev/null
	served
	kill -TERM $pid
	wait $pid
	echo "appliance-exit=$?"
	tail -n 3 /tmp/app.log
}
"#;

/// The guest: the driver conformance suite on namespaces 3 (512-byte blocks) and 4
/// (4 KiB), network, the appliance on namespaces 1, 2 and 5 and on /dev/null, serving
/// (while the controller is reset every 0.3 s) until the host connects to the stop
/// port; then SIGTERM (drain and flush) and report.
const SCRIPT: &str = r#"
for n in 3 4; do conformance /dev/ng0n$n $n; done
cat > /tmp/a.toml <<EOT
[nbd]
listen = ["tcp:0.0.0.0:10809"]
[[disk]]
name = "q"
driver = "nvme_uring"
path = "/dev/ng0n1"
format = "qcow2"
[[disk]]
name = "r"
driver = "nvme_uring"
path = "/dev/ng0n2"
[[disk]]
name = "small"
driver = "nvme_uring"
path = "/dev/ng0n5"
format = "qcow2"
[[disk]]
name = "notnvme"
driver = "nvme_uring"
path = "/dev/null"
EOT
ls -l /dev/ng0n1 /dev/ng0n2
touch /tmp/resets
while_serving() {
	(while :; do sleep 0.3; echo 1 > /sys/class/nvme/nvme0/reset_controller && echo reset >> /tmp/resets; done) &
	resetter=$!
}
served() {
	kill $resetter
	echo "controller-resets=$(wc -l < /tmp/resets)"
	echo "resubmitted=$(grep -c resubmitted /tmp/app.log)"
}
serve
"#;

/// The workload, as qemu-io commands: for the qcow2 disk (64 KiB clusters, 64 MiB) and
/// the raw one (4 KiB blocks).
const QCOW2_OPS: &[&str] = &[
    "write -P 0x21 0 4k",
    "write -P 0x22 70656 7680", // inside a cluster, 512-byte granular
    "write -P 0x23 1536k 3M",   // clusters allocated in one request, > MDTS
    "write -P 0x24 5M 192k",    // over the image's data at 5M
    "write -z 2M 128k",         // zeroes in allocated clusters
    "write -z -u 3M 64k",       // zeroes, unmapped
    "discard 4M 64k",           // discard of written clusters
    "write -P 0x25 60M 4M",     // the image's end
    "flush",
    "write -P 0x26 33280 512", // a single sector
];

const RAW_OPS: &[&str] = &[
    "write -P 0x31 0 4k",
    "write -P 0x32 12k 1M",
    "write -P 0x33 2M 2M",
    "write -z 2560k 256k",
    "write -z -u 3M 64k",
    "discard 3200k 64k",
    "flush",
    "write -P 0x34 8188k 4k",
];

/// 120 writes of 64 KiB, each its own pattern, over the qcow2 image's middle.
fn many_writes() -> Vec<String> {
    (0..120).map(|i| format!("write -P {} {}k 64k", 0x50 + i % 32, 6144 + i * 448)).collect()
}

fn qemu_io(target: &[&str], ops: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(target);
    for op in ops {
        cmd.arg("-c").arg(op);
    }
    let out = run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("error") && !text.contains("failed"),
        "qemu-io {target:?} reported a failure:\n{text}"
    );
}

fn compare(a: &[&str], b: &Path, b_format: &str) {
    let out = run(Command::new("qemu-img").arg("compare").args(a).arg("-F").arg(b_format).arg(b));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("identical"),
        "{a:?} and {} differ",
        b.display()
    );
}

/// Writes the namespaces' backing files and their oracle copies.
fn prepare(dir: &Path) {
    let ns1 = dir.join("ns1.img");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&ns1)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c"])
        .arg("write -P 0x12 5M 512k")
        .arg(&ns1));
    // The namespace is larger than the image, which grows into it.
    run(Command::new("truncate").args(["-s", "128M"]).arg(&ns1));
    std::fs::copy(&ns1, dir.join("oracle1.qcow2")).unwrap();
    let ns2 = dir.join("ns2.img");
    run(Command::new("truncate").args(["-s", "8M"]).arg(&ns2));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x13 0 8M"]).arg(&ns2));
    std::fs::copy(&ns2, dir.join("oracle2.img")).unwrap();
    // The conformance suite's namespaces.
    for n in [3, 4] {
        run(Command::new("truncate").args(["-s", "8M"]).arg(dir.join(format!("ns{n}.img"))));
    }
    // A namespace too small for what its image is asked to hold.
    let ns5 = dir.join("ns5.img");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&ns5).arg("64M"));
    run(Command::new("truncate").args(["-s", "2M"]).arg(&ns5));
}

/// QEMU arguments for NVMe controllers, each (serial, namespaces as (N of the backing
/// file nsN.img, 4 KiB blocks)), namespace IDs from 1 in order.
fn nvme_args(dir: &Path, controllers: &[(&str, &[(u32, bool)])]) -> Vec<String> {
    let mut args = Vec::new();
    for (c, (serial, namespaces)) in controllers.iter().enumerate() {
        args.extend(["-device".into(), format!("nvme,id=nvme{c},serial={serial}")]);
        for (k, &(n, big)) in namespaces.iter().enumerate() {
            let file = dir.join(format!("ns{n}.img"));
            let mut ns = format!("nvme-ns,drive=nv{n},bus=nvme{c},nsid={}", k + 1);
            if big {
                ns.push_str(",logical_block_size=4096,physical_block_size=4096");
            }
            args.extend([
                "-drive".into(),
                format!("file={},if=none,id=nv{n},format=raw,discard=unmap", file.display()),
                "-device".into(),
                ns,
            ]);
        }
    }
    args
}

/// Boots the guest with the appliance, the conformance suite, the network (NBD and the
/// stop port forwarded) and `controllers`, running [`FUNCTIONS`] and `script`; with
/// `vfio`, an IOMMU and the VFIO modules too.
fn spawn(
    dir: &Path,
    (port, stop): (u16, u16),
    vfio: bool,
    controllers: &[(&str, &[(u32, bool)])],
    script: &str,
) -> Guest {
    let image = guest::ensure_built();
    let mut files = guest::appliance_files(dir);
    let conformance = guest::test_binary("drivers", "conformance");
    guest::add_binary(&mut files, &conformance, "/bin/conformance", dir);
    files.extend(guest::net_module_files());
    let mut extra = guest::user_net_args(&[(port, NBD_PORT), (stop, STOP_PORT)]);
    let mut setup = guest::NET_SETUP.to_string();
    let (mut machine, mut kernel_args) = ("q35".to_string(), String::new());
    if vfio {
        files.extend(guest::vfio_module_files());
        extra.extend(["-device".into(), "intel-iommu,intremap=on".into()]);
        setup.push_str(guest::VFIO_SETUP);
        machine.push_str(",kernel-irqchip=split");
        kernel_args.push_str("intel_iommu=on");
    }
    extra.extend(nvme_args(dir, controllers));
    let options = BootOptions {
        memory_mib: 1024,
        machine,
        kernel_args,
        vhost: false,
        files,
        extra_args: extra,
        timeout: Duration::from_secs(600),
        ..BootOptions::default()
    };
    Guest::spawn(&image, Path::new(""), &format!("{setup}{FUNCTIONS}{script}"), &options)
}

#[test]
fn nvme_passthrough_in_a_guest_against_qemu_io() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    prepare(dir);
    let (port, stop) = (free_port(), free_port());
    let namespaces: &[(u32, bool)] = &[(1, false), (2, true), (3, false), (4, true), (5, false)];
    let mut g = spawn(dir, (port, stop), false, &[("appliance-nvme", namespaces)], SCRIPT);
    if !g.wait_for("APPLIANCE-READY", Duration::from_secs(400)) {
        panic!("the guest never served:\n{}", g.kill());
    }
    let console = g.output();
    for n in [3, 4] {
        assert!(
            console.contains(&format!("conformance-ns{n}=0")),
            "the driver conformance suite failed on namespace {n}:\n{console}"
        );
    }
    assert!(console.contains("disk added disk=\"q\""), "qcow2 disk not served:\n{console}");
    assert!(console.contains("disk added disk=\"r\""), "raw disk not served:\n{console}");
    assert!(
        console.contains("/dev/null: not an NVMe generic character device"),
        "the disk on /dev/null got no clear error:\n{console}"
    );

    let q = format!("nbd://127.0.0.1:{port}/q");
    let r = format!("nbd://127.0.0.1:{port}/r");
    let (oracle1, oracle2) = (dir.join("oracle1.qcow2"), dir.join("oracle2.img"));
    qemu_io(&["-f", "raw", &q], QCOW2_OPS);
    qemu_io(&["-f", "qcow2", oracle1.to_str().unwrap()], QCOW2_OPS);
    qemu_io(&["-f", "raw", &r], RAW_OPS);
    qemu_io(&["-f", "raw", oracle2.to_str().unwrap()], RAW_OPS);
    // A longer run of writes, through several controller resets.
    let many = many_writes();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    qemu_io(&["-f", "raw", &q], &many);
    qemu_io(&["-f", "qcow2", oracle1.to_str().unwrap()], &many);
    // What the appliance serves, while it runs.
    compare(&["-f", "raw", &q], &oracle1, "qcow2");
    compare(&["-f", "raw", &r], &oracle2, "raw");
    // A namespace too small for the image's allocations: an error, not a hang.
    let small = format!("nbd://127.0.0.1:{port}/small");
    let out = appliance_tests::run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x41 0 8M", &small]),
        Duration::from_secs(120),
    );
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("No space left") || text.contains("Input/output error"),
        "a write beyond a full namespace did not fail clearly:\n{text}"
    );
    // ... and the other disks are still served.
    qemu_io(&["-f", "raw", &r], &["read -P 0x34 8188k 4k"]);

    drop(TcpStream::connect(("127.0.0.1", stop)).expect("connect to the guest's stop port"));
    let run_ = g.wait();
    run_.assert_success();
    assert_eq!(run_.value("appliance-exit"), Some("0"), "{run_}");
    let resets: u32 = run_.expect_value("controller-resets").trim().parse().unwrap_or(0);
    assert!(resets >= 1, "the controller was never reset while serving:\n{run_}");
    eprintln!(
        "controller resets while serving: {resets}; commands resubmitted: {}",
        run_.value("resubmitted").unwrap_or("?")
    );

    // What the namespaces hold after the guest powered off.
    let ns1 = dir.join("ns1.img");
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&ns1));
    compare(&["-f", "qcow2", ns1.to_str().unwrap()], &oracle1, "qcow2");
    compare(&["-f", "raw", dir.join("ns2.img").to_str().unwrap()], &oracle2, "raw");
}

/// The VFIO guest: both controllers to vfio-pci, the conformance suite on the first,
/// the appliance on the second, serving until the host connects to the stop port.
const VFIO_SCRIPT: &str = r#"
for c in /sys/class/nvme/nvme*; do
	s=$(cat $c/serial | tr -d ' ')
	a=$(basename $(readlink -f $c/device))
	[ "$s" = conformance ] && conf=$a
	[ "$s" = appliance ] && data=$a
done
echo "controllers: conformance=$conf appliance=$data"
vfio_bind $conf
vfio_bind $data
ls -l /dev/vfio
for n in 1 2; do conformance pci:$conf/ns=$n $n; done
APPLIANCE_NVME_RESET_EVERY=499 conformance pci:$conf/ns=3 3-resets
cat > /tmp/a.toml <<EOT
[nbd]
listen = ["tcp:0.0.0.0:10809"]
[[disk]]
name = "q"
driver = "nvme"
path = "pci:$data"
format = "qcow2"
[[disk]]
name = "notvfio"
driver = "nvme"
path = "pci:0000:00:1f.0"
EOT
export APPLIANCE_NVME_RESET_EVERY=50
while_serving() { :; }
served() {
	echo "controller-resets=$(grep -c 'NVMe controller reset' /tmp/app.log)"
	echo "queue-recoveries=$(grep -c 'recovered after a reset' /tmp/app.log)"
}
serve
"#;

#[test]
fn nvme_vfio_in_a_guest_against_qemu_io() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("qemu-io", "qemu-utils");
    // The conformance controller: namespaces 3 (512 B), 4 (4 KiB) and 6 (512 B, fresh,
    // for the suite under controller resets every 499 commands); the appliance's:
    // namespace 1 holding the qcow2 image.
    let controllers: &[(&str, &[(u32, bool)])] =
        &[("conformance", &[(3, false), (4, true), (6, false)]), ("appliance", &[(1, false)])];
    // QEMU 7.2 (the host's emulator, not the appliance in the guest) has been seen to
    // die of SIGSEGV while its emulated NVMe controller is reset behind its emulated
    // IOMMU (one run in several): then the run is repeated once, from fresh images,
    // saying so. Any other failure fails the test.
    let mut attempt = 0;
    let (tmp, (port, stop), g) = loop {
        attempt += 1;
        let tmp = tempfile::tempdir().unwrap();
        prepare(tmp.path());
        run(Command::new("truncate").args(["-s", "8M"]).arg(tmp.path().join("ns6.img")));
        let ports = (free_port(), free_port());
        let mut g = spawn(tmp.path(), ports, true, controllers, VFIO_SCRIPT);
        if g.wait_for("APPLIANCE-READY", Duration::from_secs(400)) {
            break (tmp, ports, g);
        }
        let r = g.kill();
        let qemu_crashed = r.qemu_status.is_some_and(|s| {
            std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGSEGV)
        });
        if attempt == 1 && qemu_crashed {
            eprintln!("QEMU itself crashed (SIGSEGV); booting once more:\n{r}");
            continue;
        }
        panic!("the guest never served:\n{r}");
    };
    let dir = tmp.path();
    let console = g.output();
    for l in console.lines().filter(|l| l.starts_with("test ") || l.contains("conformance")) {
        eprintln!("guest: {l}");
    }
    for n in ["1", "2", "3-resets"] {
        assert!(
            console.contains(&format!("conformance-ns{n}=0")),
            "the conformance suite failed over VFIO on namespace {n}:\n{console}"
        );
    }
    assert!(console.contains("disk added disk=\"q\""), "qcow2 disk not served:\n{console}");
    assert!(
        console.contains("not vfio-pci; bind it with"),
        "a device not bound to vfio-pci got no clear error:\n{console}"
    );

    // The appliance resets the controller after every 50 commands (fault injection):
    // the workload runs through resets, commands in flight resubmitted.
    let q = format!("nbd://127.0.0.1:{port}/q");
    let oracle1 = dir.join("oracle1.qcow2");
    qemu_io(&["-f", "raw", &q], QCOW2_OPS);
    qemu_io(&["-f", "qcow2", oracle1.to_str().unwrap()], QCOW2_OPS);
    let many = many_writes();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    qemu_io(&["-f", "raw", &q], &many);
    qemu_io(&["-f", "qcow2", oracle1.to_str().unwrap()], &many);
    compare(&["-f", "raw", &q], &oracle1, "qcow2");
    drop(TcpStream::connect(("127.0.0.1", stop)).expect("connect to the guest's stop port"));
    let run_ = g.wait();
    run_.assert_success();
    assert_eq!(run_.value("appliance-exit"), Some("0"), "{run_}");
    let resets: u32 = run_.expect_value("controller-resets").trim().parse().unwrap_or(0);
    let recovered: u32 = run_.expect_value("queue-recoveries").trim().parse().unwrap_or(0);
    eprintln!("controller resets while serving: {resets}; queue recoveries: {recovered}");
    assert!(resets >= 3 && recovered >= 3, "too few resets under load:\n{run_}");
    let ns1 = dir.join("ns1.img");
    run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&ns1));
    compare(&["-f", "qcow2", ns1.to_str().unwrap()], &oracle1, "qcow2");
}
