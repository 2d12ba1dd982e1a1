use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", Path::new("/"))
}

fn invalid(text: &str) -> (String, usize, String) {
    match parse(text) {
        Err(ConfigError::Invalid { key, line, message, .. }) => (key, line, message),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn minimal_file_backed_disk() {
    let c = parse("[[disk]]\nname = \"a\"\npath = \"/dev/null\"\n").unwrap_err();
    // /dev/null is a character device, not an image.
    assert!(c.to_string().contains("neither a regular file nor a block device"), "{c}");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, [0u8; 512]).unwrap();
    let text = format!("[[disk]]\nname = \"a\"\npath = \"{}\"\n", img.display());
    let c = parse(&text).unwrap();
    let d = &c.disks[0];
    assert_eq!(d.driver, Driver::IoUring);
    assert_eq!(d.format, Format::Raw);
    assert!(d.direct);
    assert!(!d.read_only);
    assert_eq!(d.allowed_backing_dirs, vec![dir.path().to_path_buf()]);
    assert_eq!(c.appliance.idle, IdlePolicy::Adaptive);
    assert_eq!(c.appliance.hugepages, Hugepages::Auto);
    assert!(!c.appliance.cores.is_empty());
}

#[test]
fn unknown_key_names_key_line_and_column() {
    let e = parse("[appliance]\nidle = \"busy\"\nturbo = true\n").unwrap_err();
    let m = e.to_string();
    assert!(m.contains("test.toml"), "{m}");
    assert!(m.contains("turbo"), "{m}");
    assert!(m.contains("line 3"), "{m}");
    assert!(m.contains("column 1"), "{m}");
    let e = parse("[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\ncolour = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour") && e.contains("line 5"), "{e}");
    let e = parse("[bogus]\n").unwrap_err().to_string();
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn wrong_types_are_reported() {
    let e = parse("[appliance]\ncores = \"all\"\n").unwrap_err().to_string();
    assert!(e.contains("cores") || e.contains("line 2"), "{e}");
    let e = parse("[[disk]]\nname = 5\n").unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn duplicate_disk_names() {
    let (key, line, msg) = invalid(
        "[[disk]]\nname = \"a\"\ndriver = \"null\"\nsize = \"1M\"\n\
         [[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = \"1M\"\n",
    );
    assert_eq!(key, "disk[1].name");
    assert_eq!(line, 6);
    assert!(msg.contains("already defined"), "{msg}");
}

#[test]
fn missing_image_file() {
    let (key, line, msg) = invalid("\n[[disk]]\nname = \"a\"\npath = \"/nonexistent/x.img\"\n");
    assert_eq!(key, "disk[0].path");
    assert_eq!(line, 4);
    assert!(msg.contains("/nonexistent/x.img"), "{msg}");
}

#[test]
fn unknown_and_duplicate_cores() {
    let (key, _, msg) = invalid("[appliance]\ncores = [100000]\n");
    assert_eq!(key, "appliance.cores");
    assert!(msg.contains("100000"), "{msg}");
    let first = allowed_cpus()[0];
    let (key, _, msg) = invalid(&format!("[appliance]\ncores = [{first}, {first}]\n"));
    assert_eq!(key, "appliance.cores");
    assert!(msg.contains("twice"), "{msg}");
    let (key, _, _) = invalid("[appliance]\ncores = []\n");
    assert_eq!(key, "appliance.cores");
}

#[test]
fn clashing_and_malformed_listeners() {
    let (key, line, msg) =
        invalid("[nbd]\nlisten = [\"tcp:127.0.0.1:10809\",\n \"tcp:127.0.0.1:10809\"]\n");
    assert_eq!(key, "nbd.listen");
    assert_eq!(line, 3);
    assert!(msg.contains("twice"), "{msg}");
    let (_, _, msg) = invalid("[nbd]\nlisten = [\"unix:/a.sock\", \"unix:/a.sock\"]\n");
    assert!(msg.contains("twice"), "{msg}");
    let (_, _, msg) = invalid("[nbd]\nlisten = [\"udp:1.2.3.4:5\"]\n");
    assert!(msg.contains("unix:") && msg.contains("tcp:"), "{msg}");
    let (_, _, msg) = invalid("[nbd]\nlisten = [\"tcp:localhost\"]\n");
    assert!(msg.contains("localhost"), "{msg}");
    let (key, _, _) = invalid("[nbd]\nlisten = []\n");
    assert_eq!(key, "nbd.listen");
}

#[test]
fn bad_enumerations() {
    let (key, _, msg) = invalid("[appliance]\nidle = \"sometimes\"\n");
    assert_eq!(key, "appliance.idle");
    assert!(msg.contains("sometimes"), "{msg}");
    let (key, _, _) = invalid("[appliance]\nhugepages = \"maybe\"\n");
    assert_eq!(key, "appliance.hugepages");
    let (key, _, msg) = invalid("[[disk]]\nname = \"a\"\ndriver = \"spdk\"\nsize = 4096\n");
    assert_eq!(key, "disk[0].driver");
    assert!(msg.contains("spdk"), "{msg}");
    let (key, _, _) =
        invalid("[[disk]]\nname = \"a\"\nformat = \"vmdk\"\ndriver = \"mem\"\nsize = 512\n");
    assert_eq!(key, "disk[0].format");
    let (key, line, msg) =
        invalid("[nbd]\nlisten = [\"unix:/tmp/x.sock\"]\nsocket_io = \"kqueue\"\n");
    assert_eq!((key.as_str(), line), ("nbd.socket_io", 3));
    assert!(msg.contains("kqueue") && msg.contains("io_uring"), "{msg}");
    for (text, want) in [
        ("", SocketIo::Auto),
        ("socket_io = \"epoll\"\n", SocketIo::Epoll),
        ("socket_io = \"io_uring\"\n", SocketIo::IoUring),
    ] {
        let c = parse(&format!("[nbd]\nlisten = [\"unix:/tmp/x.sock\"]\n{text}")).unwrap();
        assert_eq!(c.nbd.unwrap().socket_io, want);
    }
    let (key, line, msg) =
        invalid("[nbd]\nlisten = [\"unix:/tmp/x.sock\"]\nzero_copy_send = \"yes\"\n");
    assert_eq!((key.as_str(), line), ("nbd.zero_copy_send", 3));
    assert!(msg.contains("yes") && msg.contains("always"), "{msg}");
    for (text, want) in [
        ("", ZeroCopySend::Auto),
        ("zero_copy_send = \"always\"\n", ZeroCopySend::Always),
        ("zero_copy_send = \"off\"\n", ZeroCopySend::Off),
    ] {
        let c = parse(&format!("[nbd]\nlisten = [\"tcp:127.0.0.1:10809\"]\n{text}")).unwrap();
        assert_eq!(c.nbd.unwrap().zero_copy_send, want);
    }
    let (key, line, msg) =
        invalid("[nbd]\nlisten = [\"unix:/tmp/x.sock\"]\n\nmultishot_receive = \"yes\"\n");
    assert_eq!((key.as_str(), line), ("nbd.multishot_receive", 4));
    assert!(msg.contains("\"on\"") && msg.contains("yes"), "{msg}");
    for (text, want) in [("", false), ("multishot_receive = \"on\"\n", true)] {
        let c = parse(&format!("[nbd]\nlisten = [\"unix:/tmp/x.sock\"]\n{text}")).unwrap();
        assert_eq!(c.nbd.unwrap().multishot_receive, want);
    }
}

#[test]
fn memory_disks_need_a_size_and_no_path() {
    let (key, _, _) = invalid("[[disk]]\nname = \"a\"\ndriver = \"mem\"\n");
    assert_eq!(key, "disk[0].size");
    let (key, _, _) = invalid("[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 1000\n");
    assert_eq!(key, "disk[0].size");
    let (key, _, _) =
        invalid("[[disk]]\nname = \"a\"\ndriver = \"null\"\npath = \"/x\"\nsize = 512\n");
    assert_eq!(key, "disk[0].path");
    let (key, _, _) = invalid("[[disk]]\nname = \"\"\ndriver = \"null\"\nsize = 512\n");
    assert_eq!(key, "disk[0].name");
    let c = parse("[[disk]]\nname = \"r\"\ndriver = \"mem\"\nsize = \"64MiB\"\nread_only = true\n")
        .unwrap();
    assert_eq!(c.disks[0].size, Some(64 << 20));
    assert!(c.disks[0].read_only);
    assert!(!c.disks[0].direct);
    // O_DIRECT means nothing without a file: refused, naming the key and its line (it
    // was accepted, then lost when the config was rendered back).
    for d in ["mem", "null"] {
        let (key, line, m) = invalid(&format!(
            "[[disk]]\nname = \"a\"\ndriver = \"{d}\"\nsize = 512\ndirect = true\n"
        ));
        assert_eq!((key.as_str(), line), ("disk[0].direct", 5), "{m}");
        assert!(m.contains(d) && m.contains("opens no file"), "{m}");
    }
}

#[test]
fn byte_sizes() {
    assert_eq!(parse_byte_size("4096"), Ok(4096));
    assert_eq!(parse_byte_size("4k"), Ok(4096));
    assert_eq!(parse_byte_size("64KiB"), Ok(65536));
    assert_eq!(parse_byte_size("1.5G"), Ok(3 << 29));
    assert_eq!(parse_byte_size("2 TiB"), Ok(2 << 40));
    assert!(parse_byte_size("12 parsecs").is_err());
    assert!(parse_byte_size("MiB").is_err());
    assert!(parse_byte_size("99999999999999999999G").is_err());
}

#[test]
fn quick_start_parses_without_files() {
    let c = Config::quick_start(Path::new("/tmp/qs")).unwrap();
    assert_eq!(c.disks[0].name, "demo");
    assert_eq!(c.disks[0].path.as_deref(), Some(Path::new("/tmp/qs/appliance-data/demo.qcow2")));
    let nbd = c.nbd.unwrap();
    assert!(nbd.listen.contains(&ListenAddr::Unix("/tmp/qs/appliance-data/nbd.sock".into())));
}

#[test]
fn relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("v.img"), [0u8; 4096]).unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(&cfg, "[nbd]\nlisten=[\"unix:n.sock\"]\n[[disk]]\nname=\"v\"\npath=\"v.img\"\n")
        .unwrap();
    let c = Config::load(&cfg).unwrap();
    assert_eq!(c.disks[0].path.as_deref(), Some(dir.path().join("v.img").as_path()));
    assert_eq!(c.nbd.unwrap().listen[0], ListenAddr::Unix(dir.path().join("n.sock")));
    let e = Config::load(&dir.path().join("missing.toml")).unwrap_err().to_string();
    assert!(e.contains("missing.toml"), "{e}");
}

#[test]
fn vhost_user_blk_sockets() {
    let c = parse(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.vhost_user_blk]\nsocket = \"/run/a.sock\"\nqueues = 4\n",
    )
    .unwrap();
    let v = c.disks[0].vhost_user_blk.as_ref().unwrap();
    assert_eq!((v.socket.as_path(), v.queues), (Path::new("/run/a.sock"), 4));
    let (key, _, msg) = invalid(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.vhost_user_blk]\nsocket = \"/s\"\nqueues = 0\n",
    );
    assert_eq!(key, "disk[0].vhost_user_blk.queues");
    assert!(msg.contains("1 to 64"), "{msg}");
    let (key, _, msg) = invalid(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.vhost_user_blk]\nsocket = \"/s\"\n\
         [[disk]]\nname = \"b\"\ndriver = \"mem\"\nsize = 4096\n[disk.vhost_user_blk]\nsocket = \"/s\"\n",
    );
    assert_eq!(key, "disk[1].vhost_user_blk.socket");
    assert!(msg.contains("already"), "{msg}");
    let (key, _, _) = invalid(
        "[nbd]\nlisten = [\"unix:/s\"]\n[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.vhost_user_blk]\nsocket = \"/s\"\n",
    );
    assert_eq!(key, "disk[0].vhost_user_blk.socket");
    let e = parse("[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.vhost_user_blk]\nsockte = \"/s\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sockte"), "{e}");
}

#[test]
fn metrics_control_and_qos() {
    let c = parse(
        "[metrics]\nlisten = \"127.0.0.1:9100\"\n[control]\nsocket = \"/run/c.sock\"\n\
         [[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.qos]\niops = 500\nbandwidth = \"200MiB/s\"\n",
    )
    .unwrap();
    assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(c.control.as_ref().map(|c| c.socket.as_path()), Some(Path::new("/run/c.sock")));
    assert_eq!(c.control.as_ref().map(|c| c.perms.mode), Some(0o600));
    assert_eq!(
        c.disks[0].qos,
        Some(Qos { iops: 500, bandwidth: 200 << 20, burst: DEFAULT_QOS_BURST })
    );
    let (key, _, _) = invalid("[metrics]\nlisten = \"localhost\"\n");
    assert_eq!(key, "metrics.listen");
    let (key, _, msg) = invalid(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.qos]\nbandwidth = \"fast\"\n",
    );
    assert_eq!(key, "disk[0].qos.bandwidth");
    assert!(msg.contains("fast"), "{msg}");
    let (key, _, _) = invalid(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.qos]\nburst = 1000.0\n",
    );
    assert_eq!(key, "disk[0].qos.burst");
    let e = parse(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n[disk.qos]\niops = \"lots\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("iops"), "{e}");
    assert_eq!(parse_bandwidth("1GiB/s"), Ok(1 << 30));
    assert_eq!(parse_bandwidth("100M"), Ok(100 << 20));
}

#[test]
fn rendered_config_parses_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    std::fs::write(&img, [0u8; 512]).unwrap();
    let raw = dir.path().join("b.img");
    std::fs::write(&raw, [0u8; 512]).unwrap();
    let text = format!(
        r#"
[appliance]
idle = "busy"
hugepages = false
buffer_pool = "64MiB"

[nbd]
listen = ["unix:{d}/nbd.sock", "tcp:127.0.0.1:10809"]

[metrics]
listen = "127.0.0.1:9100"

[control]
socket = "{d}/control.sock"

[[disk]]
name = "a"
path = "{a}"
format = "qcow2"
l2_cache = "2MiB"
[disk.vhost_user_blk]
socket = "{d}/a.sock"
queues = 2
[disk.qos]
iops = 1000
bandwidth = "100MiB/s"
burst = 0.5

[[disk]]
name = "b"
path = "{b}"
driver = "aio"
direct = false
read_only = true

[[disk]]
name = "m"
driver = "mem"
size = "1GiB"
"#,
        d = dir.path().display(),
        a = img.display(),
        b = raw.display()
    );
    let c = parse(&text).unwrap();
    let rendered = c.to_toml();
    let back = Config::parse(&rendered, "rendered.toml", Path::new("/elsewhere")).unwrap();
    assert_eq!(back, c, "{rendered}");
}

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("base")).unwrap();
    std::fs::write(images.join("vm1.qcow2"), [0u8; 512]).unwrap();
    std::fs::write(dir.path().join("ceph.conf"), "").unwrap();
    std::fs::write(dir.path().join("ceph.client.appliance.keyring"), "").unwrap();
    let example = include_str!("../../examples/appliance.toml")
        .replace("/var/lib/images", &images.display().to_string())
        .replace("/run/appliance", &dir.path().display().to_string())
        .replace("/etc/ceph", &dir.path().display().to_string());
    let c = parse(&example).unwrap();
    assert_eq!(c.disks.len(), 3);
    assert_eq!(c.disks[2].driver, Driver::Rbd);
    assert_eq!(c.disks[2].rbd.as_ref().unwrap().id.as_deref(), Some("appliance"));
    let vm1 = &c.disks[0];
    assert_eq!(vm1.format, Format::Qcow2);
    assert_eq!(vm1.vhost_user_blk.as_ref().unwrap().queues, 2);
    assert_eq!(vm1.qos.unwrap().bandwidth, 200 << 20);
    assert!(c.metrics.is_some() && c.control.is_some());
    let nbd = c.nbd.as_ref().unwrap();
    assert!(nbd.tls.as_ref().unwrap().ca.is_some() && nbd.client_tls.is_some());
    assert_eq!(vm1.nbd_allow.as_deref(), Some(&["host-a".into(), "backup-server".into()][..]));
    assert_eq!(c.control.as_ref().unwrap().allowed_target_dirs, vec![images]);
}

#[test]
fn shards_are_for_qcow2_and_bounded() {
    let (key, _, msg) =
        invalid("[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 512\nshards = 2\n");
    assert_eq!(key, "disk[0].shards");
    assert!(msg.contains("qcow2"), "{msg}");
    for n in [0, 65] {
        let text = format!(
            "[[disk]]\nname = \"q\"\npath = \"/etc/hostname\"\nformat = \"qcow2\"\nshards = {n}\n"
        );
        let (key, _, msg) = invalid(&text);
        assert_eq!(key, "disk[0].shards");
        assert!(msg.contains("1 to 64"), "{msg}");
    }
    let c =
        parse("[[disk]]\nname = \"q\"\npath = \"/etc/hostname\"\nformat = \"qcow2\"\nshards = 3\n")
            .unwrap();
    assert_eq!(c.disks[0].shards, Some(3));
}

const TLS_NBD: &str = "[nbd]\nlisten = [\"tcp:127.0.0.1:10809\"]\n";

#[test]
fn nbd_tls_keys() {
    let c = parse(&format!(
        "{TLS_NBD}[nbd.tls]\ncert = \"s.pem\"\nkey = \"k.pem\"\nca = \"/etc/ca.pem\"\n\
         [nbd.client_tls]\ncert = \"c.pem\"\nkey = \"ck.pem\"\nca = \"ca.pem\"\n"
    ))
    .unwrap();
    let n = c.nbd.unwrap();
    let t = n.tls.unwrap();
    assert_eq!(t.cert, Path::new("/s.pem"));
    assert_eq!(t.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
    assert_eq!(n.client_tls.unwrap().key, Path::new("/ck.pem"));
    assert_eq!(n.socket_perms, SocketPerms::default());
    // Without `ca` the server takes clients without certificates.
    let c = parse(&format!("{TLS_NBD}[nbd.tls]\ncert = \"s.pem\"\nkey = \"k.pem\"\n")).unwrap();
    assert_eq!(c.nbd.unwrap().tls.unwrap().ca, None);
}

#[test]
fn bad_tls_keys_are_named() {
    let (k, line, m) = invalid(&format!(
        "{TLS_NBD}[nbd.tls]\ncert = \"s.pem\"\nkey = \"k.pem\"\npsk_file = \"keys.psk\"\n"
    ));
    assert_eq!((k.as_str(), line), ("nbd.tls.psk_file", 6));
    assert!(m.contains("PSK"), "{m}");
    let (k, _, m) =
        invalid(&format!("{TLS_NBD}[nbd.client_tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"));
    assert_eq!(k, "nbd.client_tls");
    assert!(m.contains("ca"), "{m}");
    let (k, _, _) = invalid(&format!("{TLS_NBD}[nbd.tls]\ncert = \"\"\nkey = \"k.pem\"\n"));
    assert_eq!(k, "nbd.tls.cert");
    let e = parse(&format!("{TLS_NBD}[nbd.tls]\ncert = \"s.pem\"\n")).unwrap_err().to_string();
    assert!(e.contains("key"), "{e}");
    let e = parse(&format!("{TLS_NBD}[nbd.tls]\ncert = \"s\"\nkey = \"k\"\nverify = 1\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("verify"), "{e}");
}

#[test]
fn allow_lists() {
    let disk = "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n";
    let tls = "[nbd.tls]\ncert = \"s.pem\"\nkey = \"k.pem\"\nca = \"ca.pem\"\n";
    let c =
        parse(&format!("{TLS_NBD}{tls}{disk}[disk.nbd]\nallow = [\"CN=host-a\", \"CN=host b\"]\n"))
            .unwrap();
    assert_eq!(c.disks[0].nbd_allow, Some(vec!["host-a".to_string(), "host b".to_string()]));
    let (k, line, m) =
        invalid(&format!("{TLS_NBD}{tls}{disk}[disk.nbd]\nallow = [\"CN=a\", \"O=corp\"]\n"));
    assert_eq!((k.as_str(), line), ("disk[0].nbd.allow", 12));
    assert!(m.contains("O=corp") && m.contains("CN="), "{m}");
    let (k, _, m) = invalid(&format!("{TLS_NBD}{tls}{disk}[disk.nbd]\nallow = [\"CN=\"]\n"));
    assert_eq!(k, "disk[0].nbd.allow");
    assert!(m.contains("common name"), "{m}");
    // No client certificates, nobody to name.
    let no_ca = "[nbd.tls]\ncert = \"s.pem\"\nkey = \"k.pem\"\n";
    let (k, _, m) = invalid(&format!("{TLS_NBD}{no_ca}{disk}[disk.nbd]\nallow = [\"CN=a\"]\n"));
    assert_eq!(k, "disk[0].nbd.allow");
    assert!(m.contains("ca"), "{m}");
    let (k, _, _) = invalid(&format!("{TLS_NBD}{disk}[disk.nbd]\nallow = [\"CN=a\"]\n"));
    assert_eq!(k, "disk[0].nbd.allow");
}

#[test]
fn socket_owners_and_modes() {
    let c = parse(
        "[nbd]\nlisten = [\"unix:/run/n.sock\"]\nsocket_mode = 0o660\nsocket_group = 0\n\
         [control]\nsocket = \"/run/c.sock\"\nowner = \"root\"\nmode = 0o600\n\
         [[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n\
         [disk.vhost_user_blk]\nsocket = \"/run/v.sock\"\nmode = 0o666\ngroup = \"root\"\n",
    )
    .unwrap();
    let n = c.nbd.unwrap();
    assert_eq!(n.socket_perms, SocketPerms { owner: None, group: Some(0), mode: 0o660 });
    let ctl = c.control.unwrap();
    assert_eq!(ctl.perms, SocketPerms { owner: Some(0), group: None, mode: 0o600 });
    let v = c.disks[0].vhost_user_blk.as_ref().unwrap();
    assert_eq!(v.perms, SocketPerms { owner: None, group: Some(0), mode: 0o666 });
    let (k, line, m) = invalid("[control]\nsocket = \"/c\"\nmode = 0o1777\n");
    assert_eq!((k.as_str(), line), ("control.mode", 3));
    assert!(m.contains("0o1777"), "{m}");
    let (k, _, _) = invalid("[control]\nsocket = \"/c\"\nmode = 0o066\n");
    assert_eq!(k, "control.mode");
    let (k, _, m) = invalid("[nbd]\nlisten = [\"unix:/n\"]\nsocket_owner = \"no-such-user-x\"\n");
    assert_eq!(k, "nbd.socket_owner");
    assert!(m.contains("no-such-user-x"), "{m}");
    let (k, _, _) = invalid(
        "[[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n\
         [disk.vhost_user_blk]\nsocket = \"/v\"\ngroup = \"no-such-group-x\"\n",
    );
    assert_eq!(k, "disk[0].vhost_user_blk.group");
}

#[test]
fn allowed_target_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[control]\nsocket = \"/c\"\nallowed_target_dirs = [\"{}\", \"rel\"]\n",
        dir.path().display()
    );
    let c = Config::parse_lenient(&text, "t.toml", Path::new("/base")).unwrap();
    let dirs = c.control.unwrap().allowed_target_dirs;
    assert_eq!(dirs, vec![dir.path().to_path_buf(), PathBuf::from("/base/rel")]);
    let (k, line, m) = invalid(&format!(
        "[control]\nsocket = \"/c\"\nallowed_target_dirs = [\"{}/missing\"]\n",
        dir.path().display()
    ));
    assert_eq!((k.as_str(), line), ("control.allowed_target_dirs", 3));
    assert!(m.contains("not a directory"), "{m}");
}

#[test]
fn security_keys_render_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[nbd]\nlisten = [\"unix:/run/n.sock\"]\nsocket_mode = 0o660\nsocket_group = 5\n\
         [nbd.tls]\ncert = \"/s.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\n\
         [nbd.client_tls]\ncert = \"/c.pem\"\nkey = \"/ck.pem\"\nca = \"/ca.pem\"\n\
         [control]\nsocket = \"/c.sock\"\nowner = 7\nallowed_target_dirs = [\"{}\"]\n\
         [[disk]]\nname = \"a\"\ndriver = \"mem\"\nsize = 4096\n\
         [disk.nbd]\nallow = [\"CN=h\"]\n\
         [disk.vhost_user_blk]\nsocket = \"/v.sock\"\nmode = 0o666\n",
        dir.path().display()
    );
    let c = parse(&text).unwrap();
    let again = parse(&c.to_toml()).unwrap();
    assert_eq!(c, again);
}

#[test]
fn encryption_key_files() {
    let disk = "[[disk]]\nname = \"e\"\ndriver = \"mem\"\nsize = 4096\n";
    let c = parse(&format!("{disk}[disk.encryption]\nkey_file = \"keys/e.key\"\n")).unwrap();
    let k = c.disks[0].encryption_key_file.as_deref().unwrap();
    assert!(k.ends_with("keys/e.key") && k.is_absolute(), "{}", k.display());
    // The key itself never goes in the TOML.
    let e = parse(&format!("{disk}[disk.encryption]\nkey = \"hunter2\"\n")).unwrap_err();
    assert!(e.to_string().contains("unknown field `key`, expected `key_file`"), "{e}");
    let e = parse(&format!("{disk}[disk.encryption]\n")).unwrap_err();
    assert!(e.to_string().contains("key_file"), "{e}");
}

#[test]
fn nvme_uring_takes_a_character_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, [0u8; 512]).unwrap();
    let disk = |path: &str| {
        format!(
            "[[disk]]\nname = \"n\"\ndriver = \"nvme_uring\"\nformat = \"qcow2\"\npath = \"{path}\"\n"
        )
    };
    let (key, line, message) = invalid(&disk(&img.to_string_lossy()));
    assert_eq!((key.as_str(), line), ("disk[0].path", 5));
    assert!(message.contains("not an NVMe generic character device"), "{message}");
    assert!(message.contains("a.img"), "{message}");
    // A character device passes the config check; whether it is an NVMe namespace is
    // found when the disk opens.
    let c = parse(&disk("/dev/null")).unwrap();
    assert_eq!(c.disks[0].driver, Driver::NvmeUring);
    assert_eq!(c.disks[0].format, Format::Qcow2);
    let (_, _, message) = invalid("[[disk]]\nname = \"n\"\ndriver = \"nvmex\"\n");
    assert!(message.contains("\"nvme_uring\", \"nvme\" or \"rbd\""), "{message}");
}

#[test]
fn nvme_takes_a_pci_address() {
    let disk =
        |path: &str| format!("[[disk]]\nname = \"n\"\ndriver = \"nvme\"\npath = \"{path}\"\n");
    let c = parse(&disk("pci:0000:00:04.0/ns=2")).unwrap();
    assert_eq!(c.disks[0].driver, Driver::Nvme);
    assert_eq!(c.disks[0].path.as_deref(), Some(Path::new("pci:0000:00:04.0/ns=2")));
    assert!(c.disks[0].allowed_backing_dirs.is_empty());
    for bad in ["/dev/null", "pci:0000:00:04.0/ns=0", "pci:00:04.0", "pci:0000:00:04.0/ns=x"] {
        let (key, _, message) = invalid(&disk(bad));
        assert_eq!(key, "disk[0].path");
        assert!(message.contains("is not pci:DOMAIN:BUS:DEVICE.FUNCTION"), "{bad}: {message}");
    }
    let (_, _, message) = invalid("[[disk]]\nname = \"n\"\ndriver = \"nvme\"\n");
    assert!(message.contains("driver nvme needs `path`"), "{message}");
}

#[test]
fn rbd_takes_an_image_name_and_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    let keyring = dir.path().join("k.keyring");
    std::fs::write(&conf, "[global]\n").unwrap();
    std::fs::write(&keyring, "").unwrap();
    let disk = |path: &str, rbd: &str| {
        format!("[[disk]]\nname = \"r\"\ndriver = \"rbd\"\npath = \"{path}\"\n{rbd}")
    };
    let section = format!(
        "[disk.rbd]\nconf = \"{}\"\nid = \"appliance\"\nkeyring = \"{}\"\ntimeout = 7.5\n",
        conf.display(),
        keyring.display()
    );
    let c = parse(&disk("rbd:pool/ns/img", &section)).unwrap();
    let d = &c.disks[0];
    assert_eq!(d.driver, Driver::Rbd);
    assert_eq!(d.format, Format::Raw);
    assert!(!d.direct && d.allowed_backing_dirs.is_empty());
    let r = d.rbd.as_ref().unwrap();
    assert_eq!((r.conf.as_path(), r.id.as_deref()), (conf.as_path(), Some("appliance")));
    assert_eq!(r.keyring.as_deref(), Some(keyring.as_path()));
    assert_eq!(r.timeout, std::time::Duration::from_millis(7500));
    // It renders back to the same configuration.
    assert_eq!(parse(&c.to_toml()).unwrap().disks, c.disks);
    // Without [disk.rbd]: the cluster's defaults.
    let c = parse(&disk("rbd:pool/img", "format = \"qcow2\"\n")).unwrap();
    assert_eq!(c.disks[0].rbd, Some(RbdCluster::default()));
    assert_eq!(c.disks[0].format, Format::Qcow2);
    for bad in ["pool/img", "rbd:pool", "rbd:/img", "rbd:a/b/c/d", "rbd:pool/img@snap"] {
        let (key, line, message) = invalid(&disk(bad, ""));
        assert_eq!((key.as_str(), line), ("disk[0].path", 4), "{bad}");
        assert!(message.contains("is not rbd:POOL/IMAGE"), "{bad}: {message}");
    }
    let (_, _, message) = invalid("[[disk]]\nname = \"r\"\ndriver = \"rbd\"\n");
    assert!(message.contains("driver rbd needs `path`"), "{message}");
    let (key, _, message) = invalid(&disk("rbd:p/i", "size = \"1GiB\"\n"));
    assert_eq!(key, "disk[0].size", "{message}");
    let cases = [
        ("[disk.rbd]\ntimeout = 0.5\n", "disk[0].rbd.timeout", "1 to 3600 seconds"),
        ("[disk.rbd]\nid = \"client.x\"\n", "disk[0].rbd.id", "without `client.`"),
        ("[disk.rbd]\nconf = \"/nonexistent/ceph.conf\"\n", "disk[0].rbd.conf", "no such file"),
        ("[disk.rbd]\nkeyring = \"/nonexistent/k\"\n", "disk[0].rbd.keyring", "no such file"),
        ("[disk.rbd]\npool = \"x\"\n", "", "unknown field `pool`"),
    ];
    for (rbd, want_key, want) in cases {
        match parse(&disk("rbd:p/i", rbd)) {
            Err(ConfigError::Invalid { key, message, .. }) => {
                assert_eq!(key, want_key, "{rbd}");
                assert!(message.contains(want), "{rbd}: {message}");
            }
            Err(e) => assert!(want_key.is_empty() && e.to_string().contains(want), "{rbd}: {e}"),
            Ok(_) => panic!("{rbd} accepted"),
        }
    }
    // [disk.rbd] belongs to RBD disks only.
    let (key, _, message) =
        invalid("[[disk]]\nname = \"m\"\ndriver = \"mem\"\nsize = 4096\n[disk.rbd]\nid = \"a\"\n");
    assert_eq!(key, "disk[0].rbd");
    assert!(message.contains("driver \"rbd\" only"), "{message}");
}
