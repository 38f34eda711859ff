//! `freshet produce` (stub).

#[derive(clap::Args)]
pub struct ProduceArgs {}

pub fn run(_args: ProduceArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
