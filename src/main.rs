//! The `errand` binary: the command line with the demo job kinds.

fn main() -> std::process::ExitCode {
    errand::cli::run(errand::Registry::new())
}
