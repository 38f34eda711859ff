//! `freshet topic` (stub).

#[derive(clap::Args)]
pub struct TopicArgs {}

pub fn run(_args: TopicArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
