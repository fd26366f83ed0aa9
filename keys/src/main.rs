//! `canopy-keys`: make a volume's key files and inspect them.

use canopy_keys::{inspect, write_new, KeyError, KeyFileKind, TrustedKeys};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Make and inspect canopy volume keys.
///
/// A volume has two key files. `<volume>.key` is the trusted key file: it
/// holds the data key, the signing key and the verifying key, and goes only to
/// trusted nodes (root, trusted proxies, writers). `<volume>.verify` is the
/// relay verify file: it holds only the public verifying key, and goes to the
/// operators of untrusted relays.
#[derive(Parser)]
#[command(name = "canopy-keys", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a new volume's keys and write both key files.
    ///
    /// Writes OUT/<volume>.key (mode 0600) and OUT/<volume>.verify (mode
    /// 0644), creating OUT with mode 0700 if it is missing. Refuses to
    /// overwrite either file: a volume's keys cannot be replaced without
    /// losing its data.
    New {
        /// Name of the volume: 1 to 64 characters from A-Z, a-z, 0-9, '.',
        /// '_' and '-'.
        #[arg(long, value_name = "NAME")]
        volume: String,
        /// Directory to write the two key files into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Check a key file and show what it is, without printing any secret.
    ///
    /// Prints the kind of file, the volume name, the volume id, the public
    /// verifying key and which keys the file holds. Exits non-zero if the file
    /// is damaged, of an unknown format, or (for a trusted key file) readable
    /// by users other than its owner.
    Inspect {
        /// The key file: <volume>.key or <volume>.verify.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Fail unless the file belongs to this volume.
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` keeps the whole cause chain on one line.
            eprintln!("canopy-keys: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::New { volume, out } => {
            let keys = TrustedKeys::generate(&volume)?;
            let (key_path, verify_path) = write_new(&out, &keys)?;
            println!("trusted key file:  {}", key_path.display());
            println!("relay verify file: {}", verify_path.display());
            println!("volume id:         {}", keys.id());
            println!(
                "Give {} only to trusted nodes (--keys); give {} to relay operators (--verify-key).",
                key_path.display(),
                verify_path.display()
            );
        }
        Command::Inspect { file, volume } => {
            let info = inspect(&file)?;
            if let Some(expected) = volume {
                if info.volume != expected {
                    return Err(KeyError::WrongVolume {
                        path: file,
                        found: info.volume,
                        expected,
                    }
                    .into());
                }
            }
            println!("file:          {}", file.display());
            println!("kind:          {}", info.kind);
            println!("volume:        {}", info.volume);
            println!("volume id:     {}", info.id);
            println!("verifying key: {}", hex::encode(info.verifying_key));
            println!("holds:         {}", info.kind.holds());
            if info.kind == KeyFileKind::Trusted {
                println!("use:           trusted nodes only (--keys); keep it mode 0600");
            } else {
                println!("use:           relays (--verify-key); it is public");
            }
        }
    }
    Ok(())
}
