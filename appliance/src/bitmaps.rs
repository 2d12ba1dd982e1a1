//! Dirty bitmaps over the control socket: `bitmap_add`, `bitmap_remove`,
//! `bitmap_clear`, `bitmap_enable`, `bitmap_disable`, `bitmap_merge`, `bitmap_list`
//! (QEMU's `block-dirty-bitmap-*`).
//!
//! A bitmap records which ranges of a disk changed (writes, zero writes, discards from
//! every export and reactor) since it was added or last cleared; NBD clients read it
//! as the `qemu:dirty-bitmap:NAME` metadata context. Adding, removing, enabling and
//! disabling quiesce the disk for an instant (see `drivers::api::bitmaps`), so a
//! bitmap starts or stops at a point no change straddles. Bitmaps live in memory for as
//! long as the disk is served, on raw and qcow2 disks alike; `persistent = true` ones
//! (qcow2 only) are also stored in the image when the disk closes, and those the image
//! stores are loaded when it opens. One found in use at open (the appliance or QEMU
//! died before storing it) is listed `inconsistent` and refused for reading, merging
//! and enabling until it is cleared or removed.

use std::sync::Arc;
use std::time::Duration;

use drivers::api::bitmaps::BitmapError;
use drivers::{Bdev, Quiesced};
use serde_json::{Value, json};

use crate::control::{Args, FAILED, Fail, Params, only};
use crate::serve::Appliance;

/// The methods this module answers.
pub const METHODS: &[&str] = &[
    "bitmap_add",
    "bitmap_remove",
    "bitmap_clear",
    "bitmap_enable",
    "bitmap_disable",
    "bitmap_merge",
    "bitmap_list",
];

/// A bitmap's granularity unless the request names one (QEMU's default for a disk
/// whose format says nothing).
const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// How long a bitmap change waits for the disk's requests in flight.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

impl From<BitmapError> for Fail {
    fn from(e: BitmapError) -> Fail {
        let data = match &e {
            BitmapError::NotFound(n) | BitmapError::Exists(n) | BitmapError::Inconsistent(n) => {
                Some(json!({"bitmap": n}))
            }
            BitmapError::Invalid(_) => None,
        };
        Fail(FAILED, e.to_string(), data)
    }
}

/// Answers a bitmap method.
pub(crate) fn call(app: &Arc<Appliance>, method: &str, params: &Params) -> Result<Value, Fail> {
    let a = Args { method, params };
    match method {
        "bitmap_add" => add(app, &a),
        "bitmap_list" => {
            only(params, method, &["disk"])?;
            Ok(list(&*disk(app, &a)?))
        }
        "bitmap_remove" => change(app, &a, |b, q, n| b.remove_bitmap(q, n)),
        "bitmap_enable" => change(app, &a, |b, q, n| b.enable_bitmap(q, n, true)),
        "bitmap_disable" => change(app, &a, |b, q, n| b.enable_bitmap(q, n, false)),
        "bitmap_clear" => {
            only(params, method, &["disk", "name"])?;
            let bdev = disk(app, &a)?;
            bdev.bitmaps().clear(a.str("name")?)?;
            Ok(list(&bdev))
        }
        "bitmap_merge" => merge(app, &a),
        _ => unreachable!("not a bitmap method: {method}"),
    }
}

/// The served disk named by `disk`.
pub(crate) fn disk(app: &Appliance, a: &Args<'_>) -> Result<Arc<Bdev>, Fail> {
    let name = a.str("disk")?;
    app.served_disk(name).map(|(b, _)| b).map_err(|e| {
        let mut f = Fail::from(e);
        f.2 = Some(json!({"key": "disk", "disk": name}));
        f
    })
}

/// Runs `f` with the disk quiesced on every reactor.
pub(crate) fn quiesced<R, E: Into<Fail>>(
    app: &Appliance,
    bdev: &Arc<Bdev>,
    f: impl FnOnce(&Quiesced) -> Result<R, E>,
) -> Result<R, Fail> {
    let reactors = app.job_reactors();
    let (b, rs) = (bdev.clone(), reactors.clone());
    let q = reactors[0]
        .block_on(move || async move { b.quiesce(&rs, QUIESCE_TIMEOUT).await })
        .map_err(|e| {
            Fail(FAILED, format!("disk {}: requests did not finish: {e}", bdev.name()), None)
        })?;
    let r = f(&q);
    drop(q);
    r.map_err(Into::into)
}

fn add(app: &Appliance, a: &Args<'_>) -> Result<Value, Fail> {
    only(a.params, a.method, &["disk", "name", "granularity", "persistent", "disabled"])?;
    let bdev = disk(app, a)?;
    let name = a.str("name")?;
    let granularity = a.opt_u64("granularity")?.unwrap_or(DEFAULT_GRANULARITY);
    let persistent = a.opt_bool("persistent")?.unwrap_or(false);
    if persistent && let Some(why) = bdev.driver().bitmap_store_refusal() {
        return Err(a.bad("persistent", &format!("is refused for disk {}: {why}", bdev.name())));
    }
    let enabled = !a.opt_bool("disabled")?.unwrap_or(false);
    bdev.bitmaps().check_new(name, granularity, bdev.info().size).map_err(|e| match e {
        BitmapError::Invalid(m) if m.starts_with("granularity") => a.bad("granularity", &m),
        BitmapError::Invalid(m) => a.bad("name", &m),
        e => e.into(),
    })?;
    quiesced(app, &bdev, |q| bdev.add_bitmap(q, name, granularity, enabled, persistent))?;
    tracing::info!(
        disk = bdev.name(),
        bitmap = name,
        granularity,
        enabled,
        persistent,
        "bitmap added"
    );
    Ok(list(&bdev))
}

/// Removes, enables or disables the bitmap `name`.
fn change(
    app: &Appliance,
    a: &Args<'_>,
    f: impl FnOnce(&Bdev, &Quiesced, &str) -> Result<(), BitmapError>,
) -> Result<Value, Fail> {
    only(a.params, a.method, &["disk", "name"])?;
    let bdev = disk(app, a)?;
    let name = a.str("name")?;
    bdev.bitmaps().get(name)?;
    quiesced(app, &bdev, |q| f(&bdev, q, name))?;
    tracing::info!(disk = bdev.name(), bitmap = name, "{}", a.method);
    Ok(list(&bdev))
}

/// Sets in `target` every range any of `sources` has set.
fn merge(app: &Appliance, a: &Args<'_>) -> Result<Value, Fail> {
    only(a.params, a.method, &["disk", "target", "sources"])?;
    let bdev = disk(app, a)?;
    let target = bdev.bitmaps().get(a.str("target")?)?;
    target.usable()?;
    let names = match a.params.get("sources") {
        Some(Value::Array(v)) if !v.is_empty() => v,
        _ => return Err(a.bad("sources", "must be a non-empty list of bitmap names")),
    };
    let mut sources = Vec::with_capacity(names.len());
    for n in names {
        let n = n.as_str().ok_or_else(|| a.bad("sources", "must list bitmap names"))?;
        let s = bdev.bitmaps().get(n)?;
        s.usable()?;
        sources.push(s);
    }
    for s in &sources {
        target.map.merge_from(&s.map);
    }
    Ok(list(&bdev))
}

/// The disk's bitmaps, as `qemu-img info` and `query-block` describe them.
fn list(bdev: &Bdev) -> Value {
    let v: Vec<Value> = bdev
        .bitmaps()
        .all()
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "granularity": b.map.granularity(),
                "count": b.map.dirty_bytes(),
                "recording": b.enabled,
                "persistent": b.persistent,
                "inconsistent": b.inconsistent,
            })
        })
        .collect();
    json!({"disk": bdev.name(), "bitmaps": v})
}
