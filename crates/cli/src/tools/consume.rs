//! `freshet consume` (stub).

#[derive(clap::Args)]
pub struct ConsumeArgs {}

pub fn run(_args: ConsumeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
