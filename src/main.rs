//! The `zlayer-tunnel` command: thin glue over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Secure reverse tunnels for ZLayer nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Token utilities.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Prints the lowercase hex SHA-256 of TOKEN, what a server's config stores.
    Hash {
        /// The token to hash.
        token: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            command: TokenCommand::Hash { token },
        } => {
            #[allow(clippy::print_stdout)] // the hash on stdout is this command's output
            {
                println!("{}", zlayer_tunnel::hash_token(&token));
            }
        }
    }
    ExitCode::SUCCESS
}
