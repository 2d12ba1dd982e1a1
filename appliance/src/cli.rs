//! The command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// A storage appliance that serves qcow2 and raw disk images to virtual machines over
/// NBD, built on pinned polling reactors and io_uring.
#[derive(Parser, Debug)]
#[command(name = "appliance", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the disks of a config file (or, without one, a quick-start demo disk).
    Serve {
        /// The TOML config file. Without it, a demo image under ./appliance-data/ is
        /// created if absent and served on ./appliance-data/nbd.sock and
        /// 127.0.0.1:10809.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Refuse to start if any disk fails to open (by default such a disk is
        /// reported, listed as `failed`, and every other disk is served).
        #[arg(long)]
        strict: bool,
    },
    /// Operate a running appliance through its control socket.
    Ctl {
        /// The control socket (default: the `[control]` socket of --config, else
        /// ./appliance-data/control.sock, the quick-start's).
        #[arg(short, long, global = true)]
        socket: Option<PathBuf>,
        /// Read the control socket's path from this config file.
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: crate::ctl::CtlCommand,
    },
    /// Check a config file and print the configuration it describes.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Create a qcow2 image (v3 by default), or a raw RBD image
    /// (`-f raw rbd:POOL/IMAGE[:conf=PATH:id=ID:keyring=PATH] SIZE`).
    Create {
        /// Options: cluster_size, refcount_bits, compat (0.10 or 1.1), lazy_refcounts,
        /// extended_l2 (32 subclusters per cluster; clusters of 16k or more), preallocation (off or metadata), compression_type (zlib or zstd),
        /// backing_file, backing_fmt, data_file (an external data file, relative to the
        /// image), data_file_raw (keep it readable as a raw image), encrypt.format=luks
        /// with encrypt.key-file (the file holding the key) and encrypt.iter-time (ms).
        #[arg(short = 'o', long)]
        options: Option<String>,
        /// Backing file (name stored as given; relative names are relative to the image).
        #[arg(short = 'b', long)]
        backing: Option<String>,
        /// Backing file format (qcow2 or raw); probed when omitted.
        #[arg(short = 'F', long)]
        backing_format: Option<String>,
        /// Format of the new image (qcow2; raw for an RBD image).
        #[arg(short = 'f', long, default_value = "qcow2")]
        format: String,
        /// The image to create.
        file: PathBuf,
        /// Virtual size (such as 10G); defaults to the backing file's size.
        size: Option<String>,
    },
    /// Describe an image.
    Info {
        #[arg(long)]
        json: bool,
        file: PathBuf,
    },
    /// Check a qcow2 image's consistency (exit 0 clean, 2 corrupt, 3 leaks).
    Check {
        /// Repair leaked clusters, or everything.
        #[arg(short = 'r', long, value_parser = ["leaks", "all"])]
        repair: Option<String>,
        #[arg(long)]
        json: bool,
        file: PathBuf,
    },
    /// Grow an image that is not in use (qcow2: the L1 table grows as needed), or shrink
    /// it when nothing past the new end is allocated; qcow2 images with a backing file
    /// are refused.
    Resize {
        file: PathBuf,
        /// New virtual size (such as 20G), or `+10G` to add to it.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// List, create, apply or delete internal snapshots of a qcow2 image that is not in
    /// use (qemu-img snapshot's flags).
    Snapshot {
        /// List the snapshots.
        #[arg(short = 'l', conflicts_with_all = ["create", "apply", "delete"])]
        list: bool,
        /// Create a snapshot named NAME.
        #[arg(short = 'c', value_name = "NAME")]
        create: Option<String>,
        /// Revert the image to snapshot NAME (name or id).
        #[arg(short = 'a', value_name = "NAME", conflicts_with_all = ["create", "delete"])]
        apply: Option<String>,
        /// Delete snapshot NAME (name or id).
        #[arg(short = 'd', value_name = "NAME", conflicts_with_all = ["create"])]
        delete: Option<String>,
        file: PathBuf,
    },
    /// Show where each range of an image lives, through its backing chain.
    Map {
        #[arg(long)]
        json: bool,
        /// Directories backing files may be in (default: the image's directory).
        #[arg(long = "allowed-backing-dir")]
        allowed_backing_dirs: Vec<PathBuf>,
        file: PathBuf,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("APPLIANCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never in files or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A panic is a bug, wherever it happens: it must not leave a process that serves some
/// disks while a dead reactor hangs others. The hook prints the message (and location)
/// as Rust's default hook does, logs it, then aborts the whole process at once, so the
/// exit status is non-zero (SIGABRT), systemd restarts the appliance, and
/// vhost-user-blk guests reconnect and resubmit what was in flight from the inflight
/// region. Nothing unwinds: no destructor runs half-way through a request.
pub fn install_panic_policy() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("?"),
            "panic: {info}; aborting the process (a panic is a bug: please report it)"
        );
        std::process::abort();
    }));
}

pub fn main() -> ExitCode {
    install_panic_policy();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // Tools writing to a closed pipe (`appliance map x | head`) end quietly, as
        // command-line tools do; `serve` keeps SIGPIPE ignored for its sockets.
        // SAFETY: restoring the default disposition of a signal, before any thread.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Serve { config, log_format, strict } => {
            init_logging(log_format);
            crate::debug::init();
            match crate::serve::run(config.as_deref(), strict) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("appliance: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Create { format, file, size, .. } if crate::rbd_tools::is_rbd(&file) => {
            let r = crate::rbd_tools::create(&file.to_string_lossy(), &format, size.as_deref());
            report(r.map(|()| 0), &file)
        }
        Command::Info { json, file } if crate::rbd_tools::is_rbd(&file) => {
            report(crate::rbd_tools::info(&file.to_string_lossy(), json).map(|()| 0), &file)
        }
        Command::Resize { file, size } if crate::rbd_tools::is_rbd(&file) => {
            report(crate::rbd_tools::resize(&file.to_string_lossy(), &size).map(|()| 0), &file)
        }
        Command::Create { options, backing, backing_format, format, file, size } => {
            if format != "qcow2" {
                eprintln!(
                    "appliance: create makes qcow2 images and raw RBD images (use truncate for raw files)"
                );
                return ExitCode::FAILURE;
            }
            let r = crate::tools::create_image(
                &file,
                size.as_deref(),
                options.as_deref(),
                backing.as_deref(),
                backing_format.as_deref(),
            );
            report(r.map(|()| 0), &file)
        }
        Command::Info { json, file } => report(crate::tools::info(&file, json).map(|()| 0), &file),
        Command::Check { repair, json, file } => {
            report(crate::tools::check(&file, repair.as_deref(), json), &file)
        }
        Command::Resize { file, size } => {
            report(crate::tools::resize(&file, &size).map(|()| 0), &file)
        }
        Command::Snapshot { list, create, apply, delete, file } => {
            let r = crate::tools::snapshot(&file, list, create, apply, delete);
            report(r.map(|()| 0), &file)
        }
        Command::Map { json, allowed_backing_dirs, file } => {
            report(crate::tools::map(&file, &allowed_backing_dirs, json).map(|()| 0), &file)
        }
        Command::Ctl { socket, config, command } => {
            let r = crate::ctl::socket_path(socket, config.as_deref())
                .and_then(|s| crate::ctl::run(&s, command));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("appliance ctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match config::Config::load(&config) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("appliance: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn report(r: Result<i32, String>, file: &std::path::Path) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let f = file.display().to_string();
            if e.contains(&f) {
                eprintln!("appliance: {e}");
            } else {
                eprintln!("appliance: {f}: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
