//! `cloud-bridge serve | config | export`: see [`cloud_bridge::cli`].

fn main() -> anyhow::Result<()> {
    cloud_bridge::cli::main()
}
