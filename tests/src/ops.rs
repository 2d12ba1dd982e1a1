//! Helpers for tests of the control plane: the control socket (`appliance ctl` and
//! raw JSON-RPC) and the Prometheus endpoint.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Appliance, bin, run_unchecked, stdout};

pub fn control_extra(metrics_port: Option<u16>) -> String {
    let mut s = "[control]\nsocket = \"{dir}/control.sock\"\n".to_string();
    if let Some(p) = metrics_port {
        s.push_str(&format!("[metrics]\nlisten = \"127.0.0.1:{p}\"\n"));
    }
    s
}

/// Runs `appliance ctl` against the appliance's control socket.
pub fn ctl(a: &Appliance, args: &[&str]) -> Output {
    let sock = a.path("control.sock");
    run_unchecked(
        Command::new(bin()).arg("ctl").arg("--socket").arg(&sock).args(args),
        Duration::from_secs(120),
    )
}

pub fn ctl_ok(a: &Appliance, args: &[&str]) -> String {
    let out = ctl(a, args);
    assert!(
        out.status.success(),
        "appliance ctl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.logs()
    );
    stdout(&out)
}

/// One raw JSON-RPC exchange: sends `line`, returns the parsed reply.
pub fn rpc_raw(a: &Appliance, line: &str) -> Value {
    let mut s = UnixStream::connect(a.path("control.sock")).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply)
        .unwrap_or_else(|e| panic!("reply to {line:?} is not JSON ({e}): {reply:?}"))
}

pub fn rpc(a: &Appliance, method: &str, params: Value) -> Value {
    rpc_raw(a, &json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string())
}

/// The NBD export counters of disk `disk` named `keys` (`ctl stats`), once the
/// reactors have published them (every 500 ms) and they stopped moving.
pub fn nbd_counters<const N: usize>(a: &Appliance, disk: &str, keys: [&str; N]) -> [u64; N] {
    let get = || {
        let s = rpc(a, "stats", json!({"name": disk}));
        let e = &s["result"]["disks"][disk]["nbd"];
        keys.map(|k| e[k].as_u64().unwrap_or(0))
    };
    let mut last = get();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(600));
        let now = get();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// A call that must succeed; its result.
pub fn rpc_ok(a: &Appliance, method: &str, params: Value) -> Value {
    let r = rpc(a, method, params);
    assert!(r["result"].is_object(), "{method}: {r}\n{}", a.logs());
    r["result"].clone()
}

pub fn rpc_error(a: &Appliance, method: &str, params: Value) -> (i64, String) {
    let r = rpc(a, method, params.clone());
    assert_eq!(r["id"], 7, "{r}");
    let e = &r["error"];
    assert!(e.is_object(), "{method} {params} should fail: {r}");
    (e["code"].as_i64().unwrap(), e["message"].as_str().unwrap().to_string())
}

/// GET /metrics.
pub fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of a sample whose labels include all of `labels`, summed over the rest.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (lab, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        let have: HashMap<&str, &str> = lab
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            total += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Scrapes until `ok` holds (publication is periodic), or fails with the last scrape.
pub fn scrape_until(port: u16, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(port);
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
