//! The broker's persistent metadata: topics, their settings, and which shard owns each partition.
//!
//! Stored as `metadata.json` in the data directory, replaced atomically (write a temporary file,
//! fsync, rename, fsync the directory). Partition logs live in `topics/<name>-<topic_id>/<p>/`;
//! the topic id changes when a topic is deleted and created again, so a crash half-way through a
//! delete can never hand old records to a new topic of the same name. The functions here block:
//! shards call them through `spawn_blocking`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TopicConfig;

pub const METADATA_FILE_NAME: &str = "metadata.json";
pub const METADATA_FORMAT_VERSION: u32 = 1;
pub const TOPICS_DIR_NAME: &str = "topics";
pub const TOPIC_NAME_BYTES_MAX: usize = 200;
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerMetadata {
    pub format_version: u32,
    pub broker_id: u32,
    pub next_topic_id: u64,
    pub topics: BTreeMap<String, TopicMeta>,
    /// The topics come from the Raft controller (controller mode), not from a static
    /// cluster's two-phase create. A static cluster's data directory is not taken over by a
    /// controller (its topics would not match the controller's and would be removed).
    #[serde(default)]
    pub controller_managed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    pub topic_id: u64,
    pub replication_factor: u16,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// The shard of this broker that owns the partition.
    pub shard: u32,
    pub leader: u32,
    pub leader_epoch: u32,
    pub replicas: Vec<u32>,
    /// Controller mode: the ISR the controller committed (empty in a static cluster).
    #[serde(default)]
    pub isr: Vec<u32>,
}

impl BrokerMetadata {
    pub fn new(broker_id: u32) -> BrokerMetadata {
        BrokerMetadata {
            format_version: METADATA_FORMAT_VERSION,
            broker_id,
            next_topic_id: 1,
            topics: BTreeMap::new(),
            controller_managed: false,
        }
    }

    /// Moves partitions owned by shards that no longer exist (the broker restarted with fewer
    /// shards) to live ones. Returns whether anything moved.
    pub fn fit_to_shards(&mut self, shards: u32) -> bool {
        let mut moved = false;
        for (name, topic) in &mut self.topics {
            for (partition, meta) in topic.partitions.iter_mut().enumerate() {
                if meta.shard >= shards {
                    meta.shard = placement(name, partition as u32, shards);
                    moved = true;
                }
            }
        }
        moved
    }
}

/// The default owner of a partition: partitions of a topic go round-robin over the shards,
/// starting at a shard chosen by the topic name's hash, so any topic spreads evenly.
pub fn placement(topic: &str, partition: u32, shards: u32) -> u32 {
    assert!(shards > 0, "at least one shard");
    let start = crc32c::crc32c(topic.as_bytes()) % shards;
    (start + partition % shards) % shards
}

/// Topic names: 1..=200 bytes of ASCII letters, digits, `.`, `_` and `-`; not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic names are 1 to {TOPIC_NAME_BYTES_MAX} bytes long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

pub fn topic_dir(data_dir: &Path, name: &str, topic_id: u64) -> PathBuf {
    data_dir
        .join(TOPICS_DIR_NAME)
        .join(format!("{name}-{topic_id}"))
}

pub fn partition_dir(data_dir: &Path, name: &str, topic_id: u64, partition: u32) -> PathBuf {
    topic_dir(data_dir, name, topic_id).join(partition.to_string())
}

/// Reads the metadata, `None` if the directory has none yet.
pub fn load(data_dir: &Path) -> Result<Option<BrokerMetadata>, String> {
    let path = data_dir.join(METADATA_FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let metadata: BrokerMetadata = serde_json::from_str(&text)
        .map_err(|e| format!("corrupt metadata {}: {e}", path.display()))?;
    if metadata.format_version != METADATA_FORMAT_VERSION {
        return Err(format!(
            "{} has format version {}, this build reads {METADATA_FORMAT_VERSION}",
            path.display(),
            metadata.format_version
        ));
    }
    for name in metadata.topics.keys() {
        validate_topic_name(name)
            .map_err(|e| format!("corrupt metadata {}: {e}", path.display()))?;
    }
    Ok(Some(metadata))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces the metadata atomically and durably.
pub fn store(data_dir: &Path, metadata: &BrokerMetadata) -> Result<(), String> {
    let path = data_dir.join(METADATA_FILE_NAME);
    let temporary = data_dir.join(format!("{METADATA_FILE_NAME}.tmp"));
    let text =
        serde_json::to_vec_pretty(metadata).map_err(|e| format!("cannot encode metadata: {e}"))?;
    (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        sync_dir(data_dir)
    })()
    .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The data directory's file holding the next producer-id block (`server::producer_ids`).
pub const PRODUCER_ID_BLOCK_FILE_NAME: &str = "producer-id-block";

/// Reserves this run's producer-id block: returns the block the file names (0 when there is
/// none) after durably storing the next one, so no two runs of this broker share a block.
pub fn reserve_producer_id_block(data_dir: &Path) -> Result<u64, String> {
    let path = data_dir.join(PRODUCER_ID_BLOCK_FILE_NAME);
    let block = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{} is not a block number: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let next = block
        .checked_add(1)
        .ok_or_else(|| format!("{} is exhausted", path.display()))?;
    let temporary = data_dir.join(format!("{PRODUCER_ID_BLOCK_FILE_NAME}.tmp"));
    (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(format!("{next}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        sync_dir(data_dir)
    })()
    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(block)
}

/// Removes topic directories that no metadata entry names: left by a delete that crashed after
/// the metadata was written (creates write metadata first, so nothing else can leave them).
pub fn remove_orphans(data_dir: &Path, metadata: &BrokerMetadata) -> Result<Vec<PathBuf>, String> {
    let topics = data_dir.join(TOPICS_DIR_NAME);
    let entries = match std::fs::read_dir(&topics) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", topics.display())),
    };
    let known: Vec<String> = metadata
        .topics
        .iter()
        .map(|(name, topic)| format!("{name}-{}", topic.topic_id))
        .collect();
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", topics.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !known.contains(&name) {
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| format!("cannot remove {}: {e}", entry.path().display()))?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        sync_dir(&topics).map_err(|e| format!("cannot sync {}: {e}", topics.display()))?;
    }
    Ok(removed)
}

/// Removes a deleted topic's directory (after the metadata no longer names it).
pub fn remove_topic_dir(data_dir: &Path, name: &str, topic_id: u64) -> Result<(), String> {
    let dir = topic_dir(data_dir, name, topic_id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", dir.display())),
    }
    let parent = data_dir.join(TOPICS_DIR_NAME);
    sync_dir(&parent).map_err(|e| format!("cannot sync {}: {e}", parent.display()))
}

/// An exclusive lock on the data directory for the broker's lifetime: a second broker on the
/// same directory would corrupt both.
pub struct DataDirLock {
    _file: std::fs::File,
}

pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, String> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(data_dir.join(TOPICS_DIR_NAME))
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let path = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data directory {} is in use by another wharf process ({})",
            data_dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_spreads_partitions_evenly_and_stays_in_range() {
        for shards in 1..=8u32 {
            for topic in ["a", "orders", "x.y-z"] {
                let mut counts = vec![0u32; shards as usize];
                for p in 0..shards * 3 {
                    let shard = placement(topic, p, shards);
                    assert!(shard < shards);
                    counts[shard as usize] += 1;
                }
                assert!(
                    counts.iter().all(|c| *c == 3),
                    "{topic} {shards}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn topic_names_are_checked() {
        for good in ["a", "orders.v1", "A_b-9"] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(TOPIC_NAME_BYTES_MAX + 1);
        for bad in ["", ".", "..", "a/b", "a b", "é", long.as_str()] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn store_load_and_orphans() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("empty"), None);
        let _lock = lock_data_dir(dir.path()).expect("lock");
        assert!(lock_data_dir(dir.path()).is_err(), "second lock must fail");
        let mut metadata = BrokerMetadata::new(1);
        metadata.topics.insert(
            "t".to_string(),
            TopicMeta {
                topic_id: 4,
                replication_factor: 1,
                config: TopicConfig::default(),
                partitions: vec![PartitionMeta {
                    shard: 5,
                    leader: 1,
                    leader_epoch: 0,
                    replicas: vec![1],
                    isr: Vec::new(),
                }],
            },
        );
        store(dir.path(), &metadata).expect("store");
        assert_eq!(load(dir.path()).expect("load"), Some(metadata.clone()));
        std::fs::create_dir_all(partition_dir(dir.path(), "t", 4, 0)).expect("mkdir");
        std::fs::create_dir_all(partition_dir(dir.path(), "t", 3, 0)).expect("mkdir");
        let removed = remove_orphans(dir.path(), &metadata).expect("orphans");
        assert_eq!(removed, vec![topic_dir(dir.path(), "t", 3)]);
        assert!(partition_dir(dir.path(), "t", 4, 0).exists());
        assert!(metadata.fit_to_shards(2));
        assert!(metadata.topics["t"].partitions[0].shard < 2);
        std::fs::write(dir.path().join(METADATA_FILE_NAME), b"{not json").expect("write");
        assert!(load(dir.path())
            .expect_err("corrupt")
            .contains("corrupt metadata"));
    }
}
