//! The `orchestrator` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// fleetcache orchestrator: builds a NixOS fleet's hardware variants and publishes them to its
/// binary cache.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a signing key pair in Nix's format (as `nix-store --generate-binary-cache-key`).
    ///
    /// The secret key goes to the cache-server (never to builders); the public key goes into
    /// every fleet machine's `trusted-public-keys`.
    Keygen {
        /// Key name, conventionally the cache's host name and a generation: `cache.example.org-1`.
        #[arg(long)]
        name: String,
        /// Where to write the secret key (created with mode 0600).
        #[arg(long)]
        secret_key_file: PathBuf,
        /// Where to write the public key.
        #[arg(long)]
        public_key_file: PathBuf,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen { name, secret_key_file, public_key_file, force } => {
            orchestrator::keys::write_key_pair(&name, &secret_key_file, &public_key_file, force).map(|pk| {
                println!("{pk}");
                eprintln!(
                    "wrote secret key {} and public key {}",
                    secret_key_file.display(),
                    public_key_file.display()
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
