//! `powernode-controller`: parses the command line and runs it (see `cli`).

fn main() -> std::process::ExitCode {
    powernode_controller::cli::main_with_args(std::env::args_os())
}
