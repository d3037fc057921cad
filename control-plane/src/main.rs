//! `stella`: the control plane server (`serve`, `dev`) and the CLI for its REST API.

mod cli;
mod dev;

fn main() -> std::process::ExitCode {
    cli::main()
}
