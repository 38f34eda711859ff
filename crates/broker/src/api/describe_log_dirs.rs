//! DescribeLogDirs: the one log directory of this broker (`data_dir`), with the size
//! on disk of each partition asked for (all when the request names none), and from
//! v4 the file system's total and usable bytes. What `kafka-log-dirs.sh` and the
//! consoles (the web console's topic sizes among them) read.

use protocol::kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use protocol::kafka_protocol::messages::{
    DescribeLogDirsRequest, DescribeLogDirsResponse, TopicName,
};

use super::text;
use crate::Broker;

pub fn handle(broker: &Broker, request: DescribeLogDirsRequest) -> DescribeLogDirsResponse {
    // Each asked topic with the partitions it has of those asked; an unknown topic or
    // partition is left out, as Kafka does.
    let asked: Vec<(std::sync::Arc<crate::topics::Topic>, Option<Vec<i32>>)> = match request.topics
    {
        None => broker.topics.all().into_iter().map(|t| (t, None)).collect(),
        Some(topics) => topics
            .into_iter()
            .filter_map(|t| Some((broker.topics.get(&t.topic.0)?, Some(t.partitions))))
            .collect(),
    };
    let mut topics = Vec::with_capacity(asked.len());
    for (topic, wanted) in asked {
        let partitions: Vec<_> = topic
            .partitions()
            .into_iter()
            .filter(|p| wanted.as_ref().is_none_or(|w| w.contains(&p.index)))
            .map(|p| {
                DescribeLogDirsPartition::default()
                    .with_partition_index(p.index)
                    .with_partition_size(i64::try_from(p.lock().size_bytes()).unwrap_or(i64::MAX))
                    .with_offset_lag(0)
                    .with_is_future_key(false)
            })
            .collect();
        if !partitions.is_empty() {
            topics.push(
                DescribeLogDirsTopic::default()
                    .with_name(TopicName(text(topic.name.clone())))
                    .with_partitions(partitions),
            );
        }
    }
    let dir = &broker.config.data_dir;
    let (total, usable) = disk_bytes(dir).unwrap_or((-1, -1));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
    DescribeLogDirsResponse::default().with_results(vec![DescribeLogDirsResult::default()
        .with_log_dir(text(dir.display().to_string()))
        .with_topics(topics)
        .with_total_bytes(total)
        .with_usable_bytes(usable)])
}

/// The file system's size and the bytes an unprivileged writer may still use.
fn disk_bytes(dir: &std::path::Path) -> Option<(i64, i64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the struct we pass; path is NUL-terminated.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return None;
        }
        stat
    };
    let block = stat.f_frsize as i64;
    Some((
        (stat.f_blocks as i64).saturating_mul(block),
        (stat.f_bavail as i64).saturating_mul(block),
    ))
}
