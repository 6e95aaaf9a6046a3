//! The `cloud-bridge` command line, built inside this package so the end-to-end tests can start
//! it as a child process (and kill it).

fn main() -> anyhow::Result<()> {
    cloud_bridge::cli::main()
}
