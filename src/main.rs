//! The `edgehub` binary: parse arguments, run, turn the result into an exit code
//! (0 ok, 1 runtime failure, 2 usage or configuration error) with the cause chain on stderr.

use edgehub::cli;
use edgehub::ErrorKind;

fn main() {
    let args: cli::Args = argh::from_env();
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgehub: {e}");
            if e.kind() == ErrorKind::Config {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}
