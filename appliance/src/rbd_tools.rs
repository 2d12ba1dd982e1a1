//! The image tools on RBD images: `create -f raw`, `info` and `resize` take
//! `rbd:POOL[/NAMESPACE]/IMAGE`, with QEMU's options after it
//! (`:conf=PATH:id=ID:keyring=PATH`; the cluster's defaults otherwise), so one name
//! works with `qemu-img` and the appliance alike.

use serde_json::json;

use config::{RbdCluster, RbdImage};

/// Whether a tool's file argument names an RBD image.
pub fn is_rbd(file: &std::path::Path) -> bool {
    file.to_str().is_some_and(|s| s.starts_with("rbd:"))
}

/// Splits `rbd:POOL/IMAGE[:key=value...]` into the image and how to reach its cluster.
pub fn parse(spec: &str) -> Result<(String, RbdCluster), String> {
    let mut parts = spec.split(':');
    let (_, name) = (parts.next(), parts.next().unwrap_or(""));
    let image = format!("rbd:{name}");
    RbdImage::parse(&image)?;
    let mut how = RbdCluster::default();
    for opt in parts {
        match opt.split_once('=') {
            Some(("conf", v)) => how.conf = v.into(),
            Some(("id", v)) => how.id = Some(v.into()),
            Some(("keyring", v)) => how.keyring = Some(v.into()),
            Some(("timeout", v)) => {
                let s: f64 = v.parse().map_err(|_| format!("timeout `{v}` is not seconds"))?;
                how.timeout = std::time::Duration::from_secs_f64(s.clamp(1.0, 3600.0));
            }
            _ => return Err(format!("`{opt}`: RBD options are conf=, id=, keyring= and timeout=")),
        }
    }
    Ok((image, how))
}

/// `appliance create -f raw rbd:... SIZE`.
pub fn create(spec: &str, format: &str, size: Option<&str>) -> Result<(), String> {
    if format != "raw" {
        return Err(
            "an RBD image is created raw (-f raw); RBD keeps its own snapshots and clones".into()
        );
    }
    let (image, how) = parse(spec)?;
    let size = size.ok_or("a size is needed")?;
    let size = config::parse_byte_size(size).map_err(|e| format!("size: {e}"))?;
    drivers::io::rbd::create(&image, &how, size).map_err(|e| e.to_string())?;
    println!("Formatting '{image}', fmt=raw size={size}");
    Ok(())
}

/// `appliance info rbd:...`.
pub fn info(spec: &str, as_json: bool) -> Result<(), String> {
    let (image, how) = parse(spec)?;
    let (size, features) = drivers::io::rbd::describe(&image, &how).map_err(|e| e.to_string())?;
    let names = drivers::io::rbd::feature_names(features);
    if as_json {
        let v = json!({
            "filename": image,
            "format": "raw",
            "virtual-size": size,
            "format-specific": {"type": "rbd", "data": {"features": names}},
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("image: {image}");
    println!("file format: raw");
    println!("virtual size: {size} bytes");
    println!("rbd features: {}", names.join(", "));
    Ok(())
}

/// `appliance resize rbd:... SIZE` (grow only: shrinking an RBD image drops data).
pub fn resize(spec: &str, size: &str) -> Result<(), String> {
    let (image, how) = parse(spec)?;
    let storage = drivers::io::rbd::open(&image, &how, false).map_err(|e| e.to_string())?;
    let current = storage.size();
    let new_size = match size.strip_prefix('+') {
        Some(d) => current + config::parse_byte_size(d).map_err(|e| format!("size: {e}"))?,
        None => config::parse_byte_size(size).map_err(|e| format!("size: {e}"))?,
    };
    storage.resize_sync(new_size).map_err(|e| format!("{image}: {e}"))?;
    println!("Image resized.");
    Ok(())
}
