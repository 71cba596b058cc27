//! `bitsnap`: the command line (see `bitsnap --help` and the `bitsnap_cli` crate).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    bitsnap_cli::run(std::env::args_os())
}
