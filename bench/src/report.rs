//! Summaries of a harness run and their renderings: `results.json`, `results.md`,
//! `iops.svg` and `ratios.svg`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::fio::Job;
use crate::harness::{Options, RunRecord};
use crate::plot::{Bar, COLORS, Chart};
use crate::servers::{Format, Kind};
use crate::stats::{Spread, fmt_iops};
use crate::sysinfo::Stamp;

/// One server's numbers for one case, over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSummary {
    pub iops: Option<Spread>,
    pub mib_s: Option<Spread>,
    pub lat_p50_us: Option<Spread>,
    pub lat_p99_us: Option<Spread>,
    pub lat_p999_us: Option<Spread>,
    /// Server CPU in cores (busy-polling servers read 1.0).
    pub cpu_cores: Option<Spread>,
    pub cpu_us_per_io: Option<Spread>,
    /// Requests in flight at the images' block device ([`RunRecord::disk_queue`]).
    pub disk_queue: Option<Spread>,
    /// Time a request spent at that device ([`RunRecord::disk_us_per_request`]).
    pub disk_us_per_request: Option<Spread>,
    /// IOPS of each round (`null` where the run failed).
    pub per_round_iops: Vec<Option<f64>>,
    pub failures: usize,
}

/// A ratio appliance/peer over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct RatioSummary {
    pub spread: Option<Spread>,
    pub per_round: Vec<Option<f64>>,
}

impl RatioSummary {
    fn of(per_round: Vec<Option<f64>>) -> RatioSummary {
        RatioSummary { spread: balanced(&per_round), per_round }
    }
}

/// The spread of per-round ratios taken over order-balanced pairs of rounds: rounds
/// 2k and 2k+1 run the targets in opposite orders (ABBA), so the geometric mean of
/// their two ratios cancels whatever running first or second does to a target (a disk
/// still writing back the previous run's data, its cache warm from it). Per round, a
/// ratio swings with that position: a 5-round run of 64k writes measured qcow2/raw
/// 0.62, 0.78 and 0.91 with raw first and 1.19, 1.15 with qcow2 first (0.62-1.19),
/// and its pairs 0.86, 0.95 and the odd round 0.91 (0.86-0.95). A trailing odd round,
/// or a pair with one round missing, counts as it is.
fn balanced(per_round: &[Option<f64>]) -> Option<Spread> {
    let pairs: Vec<f64> = per_round
        .chunks(2)
        .filter_map(|p| match p {
            [Some(a), Some(b)] => Some((a * b).sqrt()),
            [a, b] => a.or(*b),
            [a] => *a,
            _ => unreachable!("chunks of two"),
        })
        .collect();
    Spread::of(&pairs)
}

/// Round by round `a / b`, where both were measured.
fn divide(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<Option<f64>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) if *b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect()
}

/// Round by round `pick(a, b)` where both were measured, or whichever was.
fn combine(a: &[Option<f64>], b: &[Option<f64>], pick: fn(f64, f64) -> f64) -> Vec<Option<f64>> {
    a.iter()
        .zip(b)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => Some(pick(*a, *b)),
            (a, b) => a.or(*b),
        })
        .collect()
}

/// Round by round the limit of a job: the lower of the device (the better of its two
/// CPUs) and the `null` disk over NBD, or whichever of them was measured.
fn limits(
    device: &[Option<f64>],
    other_cpu: &[Option<f64>],
    null: &[Option<f64>],
) -> Vec<Option<f64>> {
    combine(&combine(device, other_cpu, f64::max), null, f64::min)
}

/// Round by round the limit of a job at queue depth 1, where a request crosses the
/// transport and then the disk in turn, so their latencies add: `1 / (1/device + 1/null)`,
/// the device the better of its two CPUs. Information beside [`limits`], which the aims
/// judge by: the lower of the two is what a transport with no latency of its own reaches.
fn serial_limits(
    device: &[Option<f64>],
    other_cpu: &[Option<f64>],
    null: &[Option<f64>],
) -> Vec<Option<f64>> {
    combine(device, other_cpu, f64::max)
        .into_iter()
        .zip(null)
        .map(|(d, n)| match (d, *n) {
            (Some(d), Some(n)) if d > 0.0 && n > 0.0 => Some(1.0 / (1.0 / d + 1.0 / n)),
            _ => None,
        })
        .collect()
}

/// One job on one image format.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub job: String,
    pub format: Format,
    pub description: String,
    /// By server name: appliance, qsd, qemu-nbd, device, device-client-core, null.
    pub servers: BTreeMap<String, ServerSummary>,
    /// `appliance/qsd`, `appliance/qemu-nbd`, `appliance/device`, `appliance/null`,
    /// `appliance/limit` and, for qcow2, `qcow2/raw`.
    pub ratios: BTreeMap<String, RatioSummary>,
}

/// A performance aim and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Aim {
    pub job: String,
    pub format: Format,
    pub ratio: String,
    pub aim: f64,
    pub measured: Option<f64>,
    pub met: Option<bool>,
    /// Why the aim is judged otherwise than by its ratio alone.
    pub note: Option<String>,
}

impl Aim {
    fn new(c: &Case, ratio: &str, aim: f64, measured: Option<f64>, note: Option<String>) -> Aim {
        Aim {
            job: c.job.clone(),
            format: c.format,
            ratio: ratio.into(),
            aim,
            measured,
            met: measured.map(|m| m >= aim),
            note,
        }
    }
}

/// Everything a harness run wrote into `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub stamp: Stamp,
    pub options: Options,
    pub elapsed_s: f64,
    pub jobs: Vec<Job>,
    pub cases: Vec<Case>,
    pub aims: Vec<Aim>,
    pub runs: Vec<RunRecord>,
}

const PEERS: [Kind; 5] =
    [Kind::Qsd, Kind::QemuNbd, Kind::Device, Kind::DeviceClientCore, Kind::Null];

/// The key of the ratio appliance / limit, the limit of a round being the lower of the
/// device (on the better of its two cores) and the `null` disk over NBD (the client's
/// ceiling) in that round.
const LIMIT_RATIO: &str = "appliance/limit";

/// The key of the ratio appliance / serial limit of a queue-depth-1 job
/// ([`serial_limits`]).
const SERIAL_RATIO: &str = "appliance/serial-limit";

fn ratio_key(k: Kind) -> String {
    format!("appliance/{}", k.name())
}

impl Results {
    pub fn new(
        stamp: Stamp,
        options: Options,
        jobs: Vec<Job>,
        runs: Vec<RunRecord>,
        elapsed: Duration,
    ) -> Results {
        let rounds = options.rounds;
        let mut cases = Vec::new();
        for job in &jobs {
            for &format in &options.formats {
                let pick = |k: Kind| -> Vec<&RunRecord> {
                    runs.iter()
                        .filter(|r| {
                            r.job == job.name
                                && r.server == k
                                && (!k.per_format() || r.format == Some(format))
                        })
                        .collect()
                };
                let per_round = |k: Kind| -> Vec<Option<f64>> {
                    let rs = pick(k);
                    (0..rounds)
                        .map(|round| {
                            rs.iter()
                                .find(|r| r.round == round && r.error.is_none())
                                .map(|r| r.measure.iops)
                        })
                        .collect()
                };
                let mut servers = BTreeMap::new();
                for &k in &options.servers {
                    let rs = pick(k);
                    let ok: Vec<&&RunRecord> = rs.iter().filter(|r| r.error.is_none()).collect();
                    let sp = |f: &dyn Fn(&RunRecord) -> Option<f64>| {
                        Spread::of(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
                    };
                    servers.insert(
                        k.name().to_string(),
                        ServerSummary {
                            iops: sp(&|r| Some(r.measure.iops)),
                            mib_s: sp(&|r| Some(r.measure.mib_s)),
                            lat_p50_us: sp(&|r| Some(r.measure.lat_p50_us)),
                            lat_p99_us: sp(&|r| Some(r.measure.lat_p99_us)),
                            lat_p999_us: sp(&|r| Some(r.measure.lat_p999_us)),
                            cpu_cores: sp(&|r| r.server_cpu_cores),
                            cpu_us_per_io: sp(&|r| r.server_cpu_us_per_io),
                            disk_queue: sp(&|r| r.disk_queue),
                            disk_us_per_request: sp(&|r| r.disk_us_per_request),
                            per_round_iops: per_round(k),
                            failures: rs.len() - ok.len(),
                        },
                    );
                }
                let mut ratios = BTreeMap::new();
                if options.servers.contains(&Kind::Appliance) {
                    let a = per_round(Kind::Appliance);
                    for peer in PEERS {
                        if !options.servers.contains(&peer) {
                            continue;
                        }
                        let per = divide(&a, &per_round(peer));
                        ratios.insert(ratio_key(peer), RatioSummary::of(per));
                    }
                    let (device, other, null) = (
                        per_round(Kind::Device),
                        per_round(Kind::DeviceClientCore),
                        per_round(Kind::Null),
                    );
                    let limit = limits(&device, &other, &null);
                    if limit.iter().any(Option::is_some) {
                        ratios.insert(LIMIT_RATIO.into(), RatioSummary::of(divide(&a, &limit)));
                    }
                    let serial = serial_limits(&device, &other, &null);
                    if job.iodepth == 1 && serial.iter().any(Option::is_some) {
                        ratios.insert(SERIAL_RATIO.into(), RatioSummary::of(divide(&a, &serial)));
                    }
                }
                cases.push(Case {
                    job: job.name.to_string(),
                    format,
                    description: job.describe(),
                    servers,
                    ratios,
                });
            }
        }
        add_format_ratios(&mut cases);
        let aims = aims(&cases);
        Results { stamp, options, elapsed_s: elapsed.as_secs_f64(), jobs, cases, aims, runs }
    }

    /// The notes printed under plots and tables.
    fn notes(&self) -> Vec<String> {
        let o = &self.options;
        let mut v = vec![
            format!(
                "{} | {} CPUs: {} | Linux {} | {} RAM",
                self.stamp.date,
                self.stamp.nproc,
                self.stamp.cpu_model,
                self.stamp.kernel,
                self.stamp.memory
            ),
            format!(
                "{} | {} | appliance {}",
                self.stamp.fio, self.stamp.qemu, self.stamp.appliance_commit
            ),
            format!(
                "{} round(s) x {} s (+{} s ramp), servers on CPU {}, fio on CPU {} (device baseline: fio on CPU {}, and on CPU {} for device-client-core), appliance idle={}{}",
                o.rounds,
                o.runtime_s,
                o.ramp_s,
                o.server_core,
                o.fio_core,
                o.device_core,
                o.fio_core,
                o.appliance_idle,
                if o.smoke { ", SMOKE RUN (numbers meaningless)" } else { "" }
            ),
        ];
        if o.slow_appliance_us > 0 {
            v.push(format!(
                "APPLIANCE SLOWED ON PURPOSE: APPLIANCE_DEBUG_DELAY_US={} (benchmark self-test)",
                o.slow_appliance_us
            ));
        }
        v
    }

    fn case_label(c: &Case) -> String {
        format!("{} {}", c.job, c.format.name())
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let o = &self.options;
        let mut s = String::new();
        let _ = writeln!(s, "# Appliance vs qemu-storage-daemon, qemu-nbd and the raw device\n");
        for n in self.notes() {
            let _ = writeln!(s, "- {n}");
        }
        let _ = writeln!(
            s,
            "- images: raw {} filled with data; qcow2 (64k clusters) converted from it, fully allocated; empty images of {} for the write-to-empty job (at most {} written per run)",
            crate::fmt_size(o.image_size),
            crate::fmt_size(o.empty_size),
            crate::fmt_size(o.empty_io_size)
        );
        let _ = writeln!(s, "- total time {:.0} s\n", self.elapsed_s);
        let _ = writeln!(s, "## IOPS (median over rounds) and ratios\n");
        let _ = writeln!(
            s,
            "Ratios are appliance/peer per round, taken over pairs of rounds that ran the targets in opposite orders (the geometric mean of each pair, which cancels what running first or second does to a target): the median over the pairs, with their range in parentheses (results.json has every round's ratio). `device` is fio with io_uring and O_DIRECT on the raw file, no server, on the servers' CPU; `device-client-core` is the same on the client's CPU (where the disk's completion interrupt lands decides much of what it does for one core). `null` is the appliance serving a `null` disk (no storage) to the same fio client: the transport's ceiling on this machine. `limit` is, round by round, the lower of the better device figure and `null`. `qcow2/raw` is the appliance on qcow2 over the appliance on raw, same job and round. `serial-limit` (QD1 jobs only, information) is, round by round, `1 / (1/device + 1/null)`: at queue depth 1 a request crosses the transport and then the disk in turn, so their times add.\n"
        );
        let servers: Vec<Kind> = Kind::ALL.into_iter().filter(|k| o.servers.contains(k)).collect();
        let ratio_cols: Vec<Kind> = if o.servers.contains(&Kind::Appliance) {
            PEERS.into_iter().filter(|k| o.servers.contains(k)).collect()
        } else {
            Vec::new()
        };
        let mut ratio_names: Vec<String> = ratio_cols.iter().map(|k| ratio_key(*k)).collect();
        if self.cases.iter().any(|c| c.ratios.contains_key(LIMIT_RATIO)) {
            ratio_names.push(LIMIT_RATIO.into());
        }
        if self.cases.iter().any(|c| c.ratios.contains_key(SERIAL_RATIO)) {
            ratio_names.push(SERIAL_RATIO.into());
        }
        let both = o.formats.contains(&Format::Raw) && o.formats.contains(&Format::Qcow2);
        if both && o.servers.contains(&Kind::Appliance) {
            ratio_names.push(FORMAT_RATIO.into());
        }
        let mut head = String::from("| job | format |");
        let mut rule = String::from("|---|---|");
        for k in &servers {
            let _ = write!(head, " {} |", k.name());
            rule += "---:|";
        }
        for name in &ratio_names {
            let _ = write!(head, " {name} |");
            rule += "---:|";
        }
        let _ = writeln!(s, "{head}\n{rule}");
        for c in &self.cases {
            let mut row = format!("| {} | {} |", c.job, c.format.name());
            for k in &servers {
                let v = c
                    .servers
                    .get(k.name())
                    .and_then(|x| x.iops)
                    .map_or("–".into(), |x| fmt_iops(x.median));
                let _ = write!(row, " {v} |");
            }
            for name in &ratio_names {
                let v = c
                    .ratios
                    .get(name)
                    .and_then(|r| r.spread)
                    .map_or("–".into(), |x| x.ratio_text());
                let _ = write!(row, " {v} |");
            }
            let _ = writeln!(s, "{row}");
        }
        let _ = writeln!(s, "\n## Bandwidth, latency and server CPU (medians)\n");
        let _ = writeln!(
            s,
            "Latency is fio's completion latency of reads (of writes for write-only jobs). Server CPU is the server process's CPU time over the fio run, in cores; a busy-polling appliance always reads about 1.0. Disk queue is the average number of requests in flight at the block device holding the images over the fio run (the kernel's time-in-queue counter): of the job's queue depth, what the storage sees; the rest is in the client, the transport or the server. Disk µs/req is the time each of those requests took at the device on average (the kernel's per-request time counters): with the disk queue, whether a target made the storage slower per request or gave it fewer requests.\n"
        );
        let _ = writeln!(
            s,
            "| job | format | server | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | server CPU (cores) | CPU µs/IO | disk queue | disk µs/req |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in &self.cases {
            for k in &servers {
                let Some(x) = c.servers.get(k.name()) else { continue };
                let m = |sp: Option<Spread>, d: usize| {
                    sp.map_or("–".into(), |v| format!("{:.*}", d, v.median))
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    c.job,
                    target_format(*k, c.format),
                    k.name(),
                    x.iops.map_or("–".into(), |v| fmt_iops(v.median)),
                    m(x.mib_s, 1),
                    m(x.lat_p50_us, 1),
                    m(x.lat_p99_us, 1),
                    m(x.lat_p999_us, 1),
                    m(x.cpu_cores, 2),
                    m(x.cpu_us_per_io, 1),
                    m(x.disk_queue, 1),
                    m(x.disk_us_per_request, 0)
                );
            }
        }
        if !self.aims.is_empty() {
            let _ = writeln!(s, "\n## Aims\n");
            let _ = writeln!(
                s,
                "On raw, every job at least 0.95 of its limit; allocating qcow2 writes (the empty-image job) at least 0.85 of it; every job at least 1.5x qemu-storage-daemon where the limit leaves room for that (0.95 of the limit meets it when 1.5x lies above); qcow2 on an allocated image at least 0.95 of raw.\n"
            );
            let _ = writeln!(
                s,
                "| job | format | ratio | aim | measured | met | note |\n|---|---|---|---:|---:|---|---|"
            );
            for a in &self.aims {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | ≥ {:.2} | {} | {} | {} |",
                    a.job,
                    a.format.name(),
                    a.ratio,
                    a.aim,
                    a.measured.map_or("–".into(), |v| format!("{v:.2}")),
                    match a.met {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        None => "–",
                    },
                    a.note.as_deref().unwrap_or("")
                );
            }
        }
        let failed: Vec<&RunRecord> = self.runs.iter().filter(|r| r.error.is_some()).collect();
        if !failed.is_empty() {
            let _ = writeln!(s, "\n## Failed runs\n");
            for r in failed {
                let _ = writeln!(
                    s,
                    "- round {} {} {} {}: {}",
                    r.round + 1,
                    r.job,
                    r.format.map_or("–", Format::name),
                    r.server.name(),
                    r.error.as_deref().unwrap_or("")
                );
            }
        }
        let _ = writeln!(
            s,
            "\nPlots: [IOPS](iops.svg), [ratios](ratios.svg). Raw fio output per run: `logs/`."
        );
        s
    }

    /// The IOPS chart: one group per case, one bar per server.
    pub fn iops_chart(&self) -> String {
        let servers: Vec<Kind> =
            Kind::ALL.into_iter().filter(|k| self.options.servers.contains(k)).collect();
        let chart = Chart {
            title: &format!(
                "IOPS per job and server (median, bars show min-max over {} rounds)",
                self.options.rounds
            ),
            notes: self.notes(),
            y_label: "IOPS",
            categories: self.cases.iter().map(Self::case_label).collect(),
            series: servers
                .iter()
                .enumerate()
                .map(|(i, k)| (k.name().to_string(), COLORS[i % COLORS.len()]))
                .collect(),
            values: self
                .cases
                .iter()
                .map(|c| {
                    servers
                        .iter()
                        .map(|k| {
                            c.servers.get(k.name()).and_then(|x| x.iops).map(|sp| Bar {
                                value: sp.median,
                                min: sp.min,
                                max: sp.max,
                            })
                        })
                        .collect()
                })
                .collect(),
            reference: Vec::new(),
            label_bars: false,
        };
        chart.svg()
    }

    /// The ratio chart: one group per case, one bar per peer (and the limit).
    pub fn ratio_chart(&self) -> String {
        let mut keys: Vec<String> =
            PEERS.into_iter().filter(|k| self.options.servers.contains(k)).map(ratio_key).collect();
        if self.cases.iter().any(|c| c.ratios.contains_key(LIMIT_RATIO)) {
            keys.push(LIMIT_RATIO.into());
        }
        let chart = Chart {
            title: "Appliance / peer IOPS ratio (median of per-round ratios, min-max bars)",
            notes: self.notes(),
            y_label: "ratio (higher: appliance faster)",
            categories: self.cases.iter().map(Self::case_label).collect(),
            series: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), COLORS[(i + 1) % COLORS.len()]))
                .collect(),
            values: self
                .cases
                .iter()
                .map(|c| {
                    keys.iter()
                        .map(|k| {
                            c.ratios.get(k).and_then(|r| r.spread).map(|sp| Bar {
                                value: sp.median,
                                min: sp.min,
                                max: sp.max,
                            })
                        })
                        .collect()
                })
                .collect(),
            reference: vec![(1.0, "1.0 (parity)".into()), (1.5, "1.5".into()), (2.0, "2.0".into())],
            label_bars: true,
        };
        chart.svg()
    }
}

/// What a target serves in a case's row: the image format, or the raw file the device
/// baseline reads, or the `null` disk.
fn target_format(k: Kind, f: Format) -> &'static str {
    match k {
        Kind::Device | Kind::DeviceClientCore => "file",
        Kind::Null => "null",
        _ => f.name(),
    }
}

/// The key of the per-round ratio appliance-on-qcow2 / appliance-on-raw.
const FORMAT_RATIO: &str = "qcow2/raw";

/// For every qcow2 case, the appliance's qcow2 IOPS over its raw IOPS on the same job in
/// the same round: the two runs are minutes apart at most, so a swing of the shared
/// machine or of the virtual disk (whose write cache makes the same job vary by 1.5x
/// from one minute to the next) hits both alike, where two separate runs would compare
/// two different disks.
fn add_format_ratios(cases: &mut [Case]) {
    let raw: BTreeMap<String, Vec<Option<f64>>> = cases
        .iter()
        .filter(|c| c.format == Format::Raw)
        .filter_map(|c| {
            c.servers.get(Kind::Appliance.name()).map(|s| (c.job.clone(), s.per_round_iops.clone()))
        })
        .collect();
    for c in cases.iter_mut().filter(|c| c.format == Format::Qcow2) {
        let (Some(q), Some(r)) = (c.servers.get(Kind::Appliance.name()), raw.get(&c.job)) else {
            continue;
        };
        let per: Vec<Option<f64>> = q
            .per_round_iops
            .iter()
            .zip(r)
            .map(|(q, r)| match (q, r) {
                (Some(q), Some(r)) if *r > 0.0 => Some(q / r),
                _ => None,
            })
            .collect();
        c.ratios.insert(FORMAT_RATIO.into(), RatioSummary::of(per));
    }
}

/// The aims of the per-core efficiency work, as the harness can judge them:
/// - on raw, every job at least 0.95 of its limit (the lower of the device and the
///   transport's ceiling);
/// - allocating qcow2 writes (the empty-image job) at least 0.85 of the limit;
/// - every job at least 1.5x qemu-storage-daemon, where the limit leaves room for it
///   (0.95 of the limit meets the aim when 1.5x lies above it);
/// - qcow2 on an allocated image at least 0.95 of raw on the same server.
fn aims(cases: &[Case]) -> Vec<Aim> {
    let mut v = format_aims(cases);
    let median = |c: &Case, key: &str| c.ratios.get(key).and_then(|r| r.spread).map(|s| s.median);
    for c in cases {
        let of_limit = match (c.format, c.job.ends_with("-empty")) {
            (Format::Raw, false) => Some(0.95),
            (Format::Qcow2, true) => Some(0.85),
            _ => None,
        };
        let at_limit = median(c, LIMIT_RATIO);
        if let Some(aim) = of_limit
            && c.ratios.contains_key(LIMIT_RATIO)
        {
            let serial = median(c, SERIAL_RATIO)
                .map(|s| format!("{s:.2} of the serial limit (device and transport in turn)"));
            v.push(Aim::new(c, LIMIT_RATIO, aim, at_limit, serial));
        }
        let qsd = ratio_key(Kind::Qsd);
        if !c.ratios.contains_key(&qsd) {
            continue;
        }
        let vs_qsd = median(c, &qsd);
        // limit/qsd = (appliance/qsd) / (appliance/limit), round by round.
        let room = c
            .ratios
            .get(&qsd)
            .zip(c.ratios.get(LIMIT_RATIO))
            .and_then(|(q, l)| balanced(&divide(&q.per_round, &l.per_round)).map(|s| s.median));
        let mut aim = Aim::new(c, &qsd, 1.5, vs_qsd, None);
        // Where 1.5x qsd lies above 0.95 of the limit, 0.95 of the limit is all a server
        // can be asked for.
        if aim.met == Some(false)
            && let (Some(l), Some(room)) = (at_limit.filter(|l| *l >= 0.95), room)
        {
            aim.met = Some(true);
            aim.note = Some(format!("{l:.2} of the limit, which is {room:.2}x qsd"));
        }
        v.push(aim);
    }
    v
}

/// qcow2 on an allocated image at least 0.95 of raw on the same server.
fn format_aims(cases: &[Case]) -> Vec<Aim> {
    cases
        .iter()
        .filter(|c| !c.job.ends_with("-empty"))
        .filter_map(|c| {
            let r = c.ratios.get(FORMAT_RATIO)?;
            Some(Aim::new(c, FORMAT_RATIO, 0.95, r.spread.map(|s| s.median), None))
        })
        .collect()
}

/// Writes `results.json`, `results.md`, `iops.svg` and `ratios.svg` into `dir`.
pub fn write_all(r: &Results, dir: &Path) -> Result<(), String> {
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    w("results.json", serde_json::to_string_pretty(r).map_err(|e| e.to_string())? + "\n")?;
    w("results.md", r.markdown())?;
    w("iops.svg", r.iops_chart())?;
    w("ratios.svg", r.ratio_chart())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_the_better_device_figure_or_the_ceiling_whichever_is_lower() {
        let device = [Some(100.0), Some(100.0), None, None];
        let other_cpu = [Some(150.0), Some(90.0), Some(80.0), None];
        let null = [Some(120.0), Some(200.0), None, Some(70.0)];
        assert_eq!(
            limits(&device, &other_cpu, &null),
            vec![Some(120.0), Some(100.0), Some(80.0), Some(70.0)]
        );
    }

    #[test]
    fn the_serial_limit_adds_the_device_and_transport_times() {
        let device = [Some(20_000.0), Some(10_000.0), None, Some(0.0)];
        let other_cpu = [Some(10_000.0), None, Some(5_000.0), None];
        let null = [Some(20_000.0), None, Some(5_000.0), Some(40_000.0)];
        let s = serial_limits(&device, &other_cpu, &null);
        // 50 µs on the better device and 50 µs over the transport: 100 µs a request.
        assert_eq!(s[0], Some(10_000.0));
        assert_eq!(s[1], None, "no transport figure: no serial limit");
        assert_eq!(s[2], Some(2_500.0));
        assert_eq!(s[3], None, "a device that did nothing gives no limit");
    }

    #[test]
    fn ratios_are_taken_over_pairs_of_rounds_in_opposite_orders() {
        // Whatever runs first gains 20 %; the targets are equal.
        let per = [Some(1.2), Some(1.0 / 1.2), Some(1.2), Some(1.0 / 1.2), Some(1.2)];
        let s = balanced(&per).unwrap();
        assert_eq!(s.n, 3, "two pairs and the odd round");
        assert!((s.median - 1.0).abs() < 1e-9, "the pairs cancel the order: {s:?}");
        assert!((s.max - 1.2).abs() < 1e-9, "the odd round counts as it is");
        // The plain median of the rounds would have said 1.2.
        let missing = balanced(&[None, Some(0.9), Some(1.0), None]).unwrap();
        assert_eq!((missing.n, missing.min, missing.max), (2, 0.9, 1.0));
        assert!(balanced(&[None, None]).is_none());
    }
}
