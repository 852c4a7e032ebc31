//! `berthd`: the berth CRI daemon. Parses the command line and configuration, sets up logging,
//! and hands over to the library. Errors become one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use berth::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_TOML};
use clap::{Parser, Subcommand};

/// The berth container runtime daemon: serves the Kubernetes CRI on a unix socket.
#[derive(Parser, Debug)]
#[command(name = "berthd", version, about)]
struct Cli {
    /// Configuration file (default /etc/berth/config.toml, used when it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Persistent data directory (overrides the file).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Runtime state directory (overrides the file).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// CRI socket path (overrides the file).
    #[arg(long, value_name = "PATH")]
    listen: Option<PathBuf>,
    /// Log level or filter (overrides the file).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the complete default configuration as commented TOML.
    Default,
}

/// Reads the configuration file (an explicit one must exist) and applies the flags.
fn effective_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None if std::path::Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG_PATH))?
        }
        None => Config::default(),
    };
    if let Some(root) = &cli.root {
        config.root = root.clone();
    }
    if let Some(state) = &cli.state {
        config.state = state.clone();
    }
    if let Some(listen) = &cli.listen {
        config.listen = listen.clone();
    }
    if let Some(level) = &cli.log_level {
        config.log_level = level.clone();
    }
    for p in [&config.root, &config.state, &config.listen] {
        anyhow::ensure!(p.is_absolute(), "{} must be an absolute path", p.display());
    }
    Ok(config)
}

/// A plain level applies to berth's own logs; the libraries below stay at warn, because their
/// debug output (every HTTP/2 frame) would drown ours. A full filter is taken as given.
fn log_filter(level: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    let directives = if level.contains('=') || level.contains(',') {
        level.to_string()
    } else {
        format!("warn,berth={level},berthd={level}")
    };
    tracing_subscriber::EnvFilter::try_new(&directives)
        .with_context(|| format!("invalid log level {level:?}"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Config {
        what: ConfigCommand::Default,
    }) = cli.command
    {
        print!("{DEFAULT_TOML}");
        return Ok(());
    }
    let config = effective_config(&cli)?;
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&config.log_level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(berth::daemon::run(config))?;
    Ok(())
}

fn main() -> ExitCode {
    if berth::zygote::is_zygote_invocation() {
        // Before any thread exists: the zygote forks. Its argv[0] is room for titles, not a
        // command line clap should see.
        berth::zygote::main();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berthd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
