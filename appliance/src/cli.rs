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
    },
    /// Check a config file and print the configuration it describes.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, log_format } => {
            init_logging(log_format);
            match crate::serve::run(config.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("appliance: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match config::Config::load(&config) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("appliance: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
