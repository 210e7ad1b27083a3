//! The `carp` binary: daemon and CLI.

use carp::{
    cli::{self, Cli, Command, OnOff},
    config::{Config, ConfigError},
    control::Request,
};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, or under systemd to the journal with each event's fields (VHID, OLD,
/// NEW, REASON, ...) as journal fields.
fn init_logging() {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if carp::systemd::logs_to_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(journal)
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config: path } => {
            init_logging();
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(ConfigError::Invalid { problems }) => {
                    for problem in problems {
                        eprintln!("{}: {problem}", path.display());
                    }
                    std::process::exit(cli::EXIT_INVALID_CONFIG);
                }
                Err(e) => return Err(e.into()),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // `carp reload` reads the same file again, whatever the working directory.
            let path = std::path::absolute(&path)?;
            runtime.block_on(carp::daemon::run(config, path))?;
        }
        Command::Check { config } => std::process::exit(cli::check(&config)),
        Command::Status { json, target } => {
            let status = cli::request_status(&target, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", cli::format_status(&status));
            }
        }
        Command::Flows { json, target } => {
            let flows = cli::request_flows(&target)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                print!("{}", cli::format_flows(&flows));
            }
        }
        Command::GenerateDocs { dir } => cli::generate_docs(&dir)?,
        Command::Events { json, target } => {
            let socket = target.socket()?;
            carp::control::follow(&socket, |event| {
                let line = if json {
                    serde_json::to_string(&event).unwrap_or_default()
                } else {
                    carp::events::format(&event)
                };
                // A closed pipe (`carp events | head`) ends the stream.
                use std::io::Write;
                writeln!(std::io::stdout(), "{line}").is_ok()
            })?;
        }
        Command::Leases { json, target } => {
            let leases = cli::request_leases(&target)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&leases)?);
            } else {
                print!("{}", cli::format_leases(&leases));
            }
        }
        Command::Config {
            action:
                cli::ConfigAction::Push {
                    dry_run,
                    force,
                    target,
                },
        } => print!("{}", cli::config_push(&target, dry_run, force)?),
        Command::Config {
            action: cli::ConfigAction::Diff { target },
        } => print!("{}", cli::config_push(&target, true, false)?),
        Command::Config {
            action: cli::ConfigAction::Rollback { target },
        } => {
            let (message, status) = cli::config_rollback(&target)?;
            println!("{message}");
            print!("{}", cli::format_status(&status));
        }
        Command::Nat {
            action: cli::NatAction::Flush,
        } => {
            carp::nat::flush()?;
            println!("removed the `ip carp` NAT table");
        }
        Command::Reload { target } => match cli::reload(&target)? {
            Ok((message, status)) => {
                println!("{message}");
                print!("{}", cli::format_status(&status));
            }
            Err(problems) => {
                for problem in problems {
                    eprintln!("{problem}");
                }
                std::process::exit(cli::EXIT_INVALID_CONFIG);
            }
        },
        Command::Upgrade { target } => {
            let status = cli::upgrade(&target)?;
            println!("upgraded in place");
            print!("{}", cli::format_status(&status));
        }
        Command::Maintenance { mode, target } => {
            let enable = matches!(mode, OnOff::On);
            let status = cli::request_status(&target, &Request::Maintenance { enable })?;
            print!("{}", cli::format_status(&status));
        }
    }
    Ok(())
}
