//! The `vlm-convert` binary: parse flags, run, map errors to documented exit codes.

use clap::Parser;
use vlm_convert::cli::{run, Cli};

fn main() {
    // Die quietly on a closed pipe (`vlm-convert --dry-run | head`), like any Unix filter.
    // SAFETY: resetting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // A file size limit must surface as a write error (EFBIG) we can clean up after, not a kill.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let err = anyhow::Error::from(e);
            // Our messages already hold their causes (`cannot read X: <io error>`): the top level
            // only, or `{:#}` would print each cause twice.
            eprintln!("error: {err}");
            err.downcast_ref::<vlm_convert::Error>()
                .map(|e| e.exit_code())
                .unwrap_or(2)
        }
    };
    std::process::exit(code);
}
