pub fn load(_i: &str) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
