//! The state layout before the scheduler's indexes (layout 1): one hash per
//! job and a set of every job key. Upgrade tests write it, then check that
//! a current store or coordinator takes it over.

/// Write one job as layout 1 did: its hash (feed, partition, stage `bulk`
/// and `fields`) under `prefix`, and its key in the set of job keys.
pub async fn write_job(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
    feed: &str,
    partition: &str,
    fields: &[(&str, &str)],
) -> redis::RedisResult<()> {
    let key = format!("{prefix}job:{feed}:{}", tidemark_state::member(partition));
    let mut cmd = redis::cmd("HSET");
    cmd.arg(&key)
        .arg("feed")
        .arg(feed)
        .arg("partition")
        .arg(partition)
        .arg("stage")
        .arg("bulk");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: i64 = cmd.query_async(conn).await?;
    let _: i64 = redis::cmd("SADD")
        .arg(format!("{prefix}jobs"))
        .arg(&key)
        .query_async(conn)
        .await?;
    Ok(())
}
