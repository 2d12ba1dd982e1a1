//! The NBD export against real clients — fio's nbd engine, qemu-io, qemu-img, nbdinfo,
//! nbdcopy — over both I/O drivers, judged against the bytes of the image file itself.

use std::process::Command;

use appliance_tests::{
    Appliance, Setup, fio_verify, pattern, require_tool, run, sparse_file, stdout,
};

const DRIVERS: [&str; 2] = ["io_uring", "aio"];
const MIB: u64 = 1 << 20;

fn disk(driver: &str, name: &str, extra: &str) -> String {
    format!(
        "[[disk]]\nname = \"{name}\"\npath = \"{{dir}}/{name}.img\"\ndriver = \"{driver}\"\n{extra}\n"
    )
}

fn start(driver: &str, size: u64) -> Appliance {
    Appliance::start(Setup { disks: disk(driver, "d", ""), ..Setup::default() }, |dir| {
        sparse_file(&dir.join("d.img"), size)
    })
}

#[test]
fn fio_random_writes_verify_crc32c() {
    require_tool("fio", "fio");
    for driver in DRIVERS {
        let mut a = start(driver, 64 * MIB);
        for (uri, depth) in [(a.uri("d"), 32), (a.tcp_uri("d"), 8)] {
            let job = fio_verify(&uri, "32M", "512-64k", depth);
            assert!(
                job["write"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
                "{driver}: wrote everything"
            );
            assert!(
                job["read"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
                "{driver}: verified everything"
            );
        }
        assert!(a.stop().success());
    }
}

#[test]
fn qemu_io_patterns_zero_writes_and_discards() {
    require_tool("qemu-io", "qemu-utils");
    for driver in DRIVERS {
        let mut a = start(driver, 16 * MIB);
        let uri = a.uri("d");
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1000 3000",
            "-c",
            "write -P 0xef 4095 2",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 0x11 3M 1M",
            "-c",
            "write -z -u 3M 64k",
            "-c",
            "discard 8M 1M",
            "-c",
            "write -P 0x22 15M 1M",
            "-c",
            "flush",
            &uri,
        ]));
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1000",
            "-c",
            "read -P 0xcd 1000 3000",
            "-c",
            "read -P 0xab 4000 95",
            "-c",
            "read -P 0xef 4095 2",
            "-c",
            "read -P 0xab 4097 1044479",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "read -P 0x11 3136k 960k",
            "-c",
            "read -P 0x22 15M 1M",
            &uri,
        ]));
        assert!(
            !stdout(&out).contains("Pattern verification failed"),
            "{driver}: {}",
            stdout(&out)
        );
        assert!(a.stop().success());
        // The image file holds exactly what the client wrote.
        let img = std::fs::read(a.path("d.img")).unwrap();
        let mut want = vec![0u8; 16 * MIB as usize];
        want[..MIB as usize].fill(0xab);
        want[1000..4000].fill(0xcd);
        want[4095..4097].fill(0xef);
        want[3 * MIB as usize + 64 * 1024..4 * MIB as usize].fill(0x11);
        want[15 * MIB as usize..].fill(0x22);
        assert!(img[..8 * MIB as usize] == want[..8 * MIB as usize], "{driver}: image content");
        assert!(img[9 * MIB as usize..] == want[9 * MIB as usize..], "{driver}: image tail");
    }
}

#[test]
fn qemu_img_convert_into_and_out_of_the_export() {
    require_tool("qemu-img", "qemu-utils");
    for driver in DRIVERS {
        let mut a = start(driver, 8 * MIB);
        let src = a.path("src.img");
        let mut data = pattern(7, 8 * MIB as usize);
        data[2 * MIB as usize..3 * MIB as usize].fill(0);
        std::fs::write(&src, &data).unwrap();
        let uri = a.uri("d");
        run(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri));
        let back = a.path("back.img");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back));
        assert!(std::fs::read(&back).unwrap() == data, "{driver}: converted image differs");
        assert!(a.stop().success());
        assert!(std::fs::read(a.path("d.img")).unwrap() == data, "{driver}: image differs");
    }
}

#[test]
fn nbdinfo_reports_size_and_block_sizes() {
    require_tool("nbdinfo", "libnbd-bin");
    for driver in DRIVERS {
        let mut a = start(driver, 12 * MIB + 4096);
        let out = run(Command::new("nbdinfo").args(["--json", &a.uri("d")]));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
        let e = &json["exports"][0];
        assert_eq!(e["export-size"], 12 * MIB + 4096, "{driver}");
        let min = e["block_size_minimum"].as_u64().unwrap();
        let pref = e["block_size_preferred"].as_u64().unwrap();
        let max = e["block_size_maximum"].as_u64().unwrap();
        // O_DIRECT on this file system: the probed alignment, 512 or 4096.
        assert!(min == 512 || min == 4096, "{driver}: minimum block size {min}");
        assert!(pref >= min && pref.is_power_of_two(), "{driver}: preferred {pref}");
        assert_eq!(max, 16 * MIB, "{driver}: maximum is a quarter of the 64 MiB buffer pool");
        assert_eq!(e["can_multi_conn"], true);
        assert_eq!(e["can_flush"], true);
        assert_eq!(e["can_fua"], true);
        assert_eq!(e["can_trim"], true);
        assert_eq!(e["can_zero"], true);
        assert_eq!(e["is_read_only"], false);
        let contexts = e["contexts"].as_array().unwrap();
        assert!(contexts.iter().any(|c| c == "base:allocation"));
        assert!(a.stop().success());
    }
}

#[test]
fn nbdcopy_with_several_connections() {
    require_tool("nbdcopy", "libnbd-bin");
    for driver in DRIVERS {
        let mut a = start(driver, 32 * MIB);
        let src = a.path("src.img");
        let data = pattern(11, 32 * MIB as usize);
        std::fs::write(&src, &data).unwrap();
        let uri = a.uri("d");
        run(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(&src).arg(&uri));
        let back = a.path("back.img");
        run(Command::new("nbdcopy").args(["--connections=4"]).arg(&uri).arg(&back));
        assert!(std::fs::read(&back).unwrap() == data, "{driver}: nbdcopy round trip differs");
        assert!(a.stop().success());
        assert!(std::fs::read(a.path("d.img")).unwrap() == data);
    }
}

#[test]
fn qemu_img_map_shows_the_holes_of_a_sparse_file() {
    require_tool("qemu-img", "qemu-utils");
    for driver in DRIVERS {
        let mut a =
            Appliance::start(Setup { disks: disk(driver, "d", ""), ..Setup::default() }, |dir| {
                let p = dir.join("d.img");
                sparse_file(&p, 16 * MIB);
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.write_all_at(&pattern(1, MIB as usize), 4 * MIB).unwrap();
                f.write_all_at(&pattern(2, 2 * MIB as usize), 10 * MIB).unwrap();
            });
        let out = run(Command::new("qemu-img").args(["map", "--output=json", &a.uri("d")]));
        let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map json");
        let data: Vec<(u64, u64)> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect();
        assert_eq!(data, vec![(4 * MIB, MIB), (10 * MIB, 2 * MIB)], "{driver}: {map}");
        let holes: u64 = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == false && e["zero"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(holes, 13 * MIB, "{driver}: holes read as zero");
        assert!(a.stop().success());
    }
}

#[test]
fn buffered_mode_and_read_only_disks() {
    require_tool("qemu-io", "qemu-utils");
    let disks = disk("io_uring", "buf", "direct = false") + &disk("aio", "ro", "read_only = true");
    let mut a = Appliance::start(Setup { disks, ..Setup::default() }, |dir| {
        sparse_file(&dir.join("buf.img"), 4 * MIB);
        std::fs::write(dir.join("ro.img"), pattern(3, 4 * MIB as usize)).unwrap();
    });
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 123 4567", &a.uri("buf")]));
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 123 4567",
        &a.uri("buf"),
    ]));
    assert!(!stdout(&out).contains("verification failed"));
    let out = appliance_tests::run_unchecked(
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4096", &a.uri("ro")]),
        std::time::Duration::from_secs(60),
    );
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("read-only") || text.contains("Permission denied"),
        "writing a read-only export must fail: {text}"
    );
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &a.uri("ro")])
        .arg(a.path("ro.img")));
    assert!(out.status.success());
    assert!(a.stop().success());
}
