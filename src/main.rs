//! The `zlayer-tunnel` command: thin glue over the library. Logs go to stderr;
//! stdout carries only what a command is asked for (a hash, a token).
//!
//! `main/cli.rs` holds the flags, `main/specs.rs` parses their specs,
//! `main/options.rs` merges them over a config file, and `main/commands.rs`
//! runs each command.

#![allow(clippy::print_stdout, clippy::print_stderr)] // this is the program's voice

use std::process::ExitCode;

#[path = "main/allocator.rs"]
mod allocator;
#[path = "main/check.rs"]
mod check;
#[path = "main/cli.rs"]
mod cli;
#[path = "main/cluster.rs"]
mod cluster;
#[path = "main/commands.rs"]
mod commands;
#[path = "main/demo.rs"]
mod demo;
#[path = "main/options.rs"]
mod options;
#[path = "main/specs.rs"]
mod specs;

use clap::Parser;

use cli::{Cli, Command, TokenCommand};

fn main() -> ExitCode {
    allocator::settle();
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Demo { mib } => demo::run(mib),
        Command::Server(args) => commands::run_server(args),
        Command::Agent(args) => commands::run_agent(args),
        Command::Access(args) => commands::run_access(args),
        Command::Token(TokenCommand::Hash { token }) => commands::print_hash(&token),
        Command::Token(TokenCommand::Generate) => commands::generate_token(),
        Command::Token(TokenCommand::Add {
            store,
            which,
            register,
            access,
            ports,
            visitors_allow,
            visitors_deny,
        }) => {
            let visitors = zlayer_tunnel::visitor_rules::VisitorRules {
                allow: visitors_allow,
                deny: visitors_deny,
            };
            cluster::add_token(&store, &which, (register, access, ports), visitors)
        }
        Command::Token(TokenCommand::Revoke { store, which }) => {
            cluster::revoke_token(&store, &which)
        }
        Command::Token(TokenCommand::List { store }) => cluster::list_tokens(&store),
        Command::CheckConfig { file, kind } => check::check_config(&file, kind),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "zlayer-tunnel", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(dir.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the man pages to `dir` (one per command), or the main page to stdout.
fn man_pages(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let command = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(command, dir)?;
            Ok(())
        }
        None => Ok(clap_mangen::Man::new(command).render(&mut std::io::stdout())?),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (`info`, `zlayer_tunnel=debug,warn`:
/// a default level and per-target levels), `info` without it. `Targets`, not
/// `EnvFilter`: no regex engine compiled at startup and carried in every process.
fn init_logs(format: cli::LogFormat) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let wanted = std::env::var("RUST_LOG").ok();
    let parsed = wanted.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(filter)) => filter.clone(),
        _ => Targets::new().with_default(tracing::Level::INFO),
    };
    let stderr = std::io::stderr;
    let layer = tracing_subscriber::fmt::layer().with_writer(stderr);
    match format {
        cli::LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&stderr());
            let layer = layer.with_ansi(ansi);
            tracing_subscriber::registry()
                .with(layer.with_filter(filter))
                .init();
        }
        cli::LogFormat::Json => {
            // the event's fields at the top level, its spans' in `spans`
            let layer = layer.json().flatten_event(true).with_span_list(true);
            tracing_subscriber::registry()
                .with(layer.with_filter(filter))
                .init();
        }
    }
    if let (Some(wanted), Some(Err(e))) = (wanted, parsed) {
        tracing::warn!(RUST_LOG = %wanted, error = %e, "RUST_LOG not understood; logging at info");
    }
}
