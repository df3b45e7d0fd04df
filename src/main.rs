//! The `ltxfs` command.

fn main() {
    std::process::exit(ltxfs::cli::run(std::env::args_os()));
}
