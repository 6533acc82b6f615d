//! The durability audit. Every record carries (run, producer, sequence) and a checksum; the
//! pair (producer, sequence) is the record's id.
//!
//! 1. Producers book each acknowledgement with the (partition, offset) it was acknowledged at
//!    ([`AckLog`], 8 bytes per record sent: one `u64` per producer and sequence).
//! 2. Every reader (tailing consumers during the run, the read-back after it) books the id it
//!    saw at each offset ([`OffsetMap`], 8 bytes per offset): an offset seen with two
//!    different ids is a conflict, whoever saw them and whenever.
//! 3. After the run the read-back reads every partition from its log start to its high
//!    watermark: the offsets it returns must be dense (a hole below the HW fails), an offset a
//!    tailing consumer saw must still be there (else it vanished), and every acknowledged id
//!    must sit at the offset it was acknowledged at: absent everywhere is `lost`, elsewhere is
//!    `moved`. One id at two offsets is a `duplicate`: the producer is idempotent (its own
//!    retries are written once), so a duplicate comes from the load generator sending a record
//!    again after its delivery failed (a new batch to the broker); the chaos suite fails a
//!    scenario on duplicates when nothing was sent again.
//!
//! Memory is bounded by the number of records audited: the load generator stops sending
//! once `--audit-records-max` records were sent (see `main.rs`).

use std::collections::HashMap;

/// Bytes of the header at the start of every record value.
pub const RECORD_HEADER_BYTES: usize = 28;

/// Fields of a record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Wall-clock send time, µs since the Unix epoch (for end-to-end latency).
    pub sent_us: u64,
    pub run_id: u32,
    pub producer: u32,
    pub sequence: u64,
}

/// Writes the header into `value` (at least [`RECORD_HEADER_BYTES`] long); the checksum covers
/// everything else in the value.
pub fn stamp(value: &mut [u8], stamp: Stamp) {
    stamp_ids(value, stamp);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&value[..24]), &value[28..]);
    value[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// Writes the ids and send time only (no checksum): for runs without the audit, where the
/// checksum would cost the client a pass over every byte.
pub fn stamp_ids(value: &mut [u8], stamp: Stamp) {
    value[0..8].copy_from_slice(&stamp.sent_us.to_le_bytes());
    value[8..12].copy_from_slice(&stamp.run_id.to_le_bytes());
    value[12..16].copy_from_slice(&stamp.producer.to_le_bytes());
    value[16..24].copy_from_slice(&stamp.sequence.to_le_bytes());
}

/// The send time, without checking the checksum (end-to-end latency of runs without the audit).
pub fn sent_us(value: &[u8]) -> Option<(u32, u64)> {
    if value.len() < RECORD_HEADER_BYTES {
        return None;
    }
    let run_id = u32::from_le_bytes(value[8..12].try_into().ok()?);
    let sent = u64::from_le_bytes(value[0..8].try_into().ok()?);
    Some((run_id, sent))
}

/// Reads a header; `Err` when the value is too short or its checksum does not match.
pub fn read_stamp(value: &[u8]) -> Result<Stamp, &'static str> {
    if value.len() < RECORD_HEADER_BYTES {
        return Err("record shorter than its header");
    }
    let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |at: usize| u32::from_le_bytes(value[at..at + 4].try_into().unwrap_or([0; 4]));
    let crc = crc32c::crc32c_append(crc32c::crc32c(&value[..24]), &value[28..]);
    if crc != u32_at(24) {
        return Err("record checksum mismatch");
    }
    Ok(Stamp {
        sent_us: u64_at(0),
        run_id: u32_at(8),
        producer: u32_at(12),
        sequence: u64_at(16),
    })
}

/// The id of a record: producer in the top 24 bits, sequence in the low 40.
pub type RecordId = u64;
const SEQUENCE_BITS: u32 = 40;
const PRODUCERS_MAX: u32 = 1 << 24;
/// Offsets above this are refused (an offset map allocates 8 bytes per offset below it).
pub const OFFSET_MAX: u64 = (1 << 47) - 1;
/// Examples of each kind of failure kept for the report.
const EXAMPLES_MAX: usize = 8;

pub fn record_id(producer: u32, sequence: u64) -> RecordId {
    assert!(producer < PRODUCERS_MAX, "producer {producer} out of range");
    assert!(
        sequence < 1 << SEQUENCE_BITS,
        "sequence {sequence} out of range"
    );
    (u64::from(producer) << SEQUENCE_BITS) | sequence
}

fn id_parts(id: RecordId) -> (u32, u64) {
    (
        (id >> SEQUENCE_BITS) as u32,
        id & ((1 << SEQUENCE_BITS) - 1),
    )
}

/// (partition, offset) packed: partition in the top 16 bits, offset + 1 in the low 48 (0 =
/// nowhere).
fn location(partition: u32, offset: u64) -> u64 {
    assert!(partition < 1 << 16, "partition {partition} out of range");
    assert!(offset <= OFFSET_MAX, "offset {offset} out of range");
    (u64::from(partition) << 48) | (offset + 1)
}

fn location_parts(packed: u64) -> (u32, u64) {
    debug_assert!(packed != 0);
    ((packed >> 48) as u32, (packed & ((1 << 48) - 1)) - 1)
}

/// Producer side: where each acknowledged record was acknowledged.
#[derive(Default)]
pub struct AckLog {
    /// Per producer, per sequence: packed location of the first acknowledgement (0 = none).
    first: Vec<Vec<u64>>,
    /// Later acknowledgements of an id at another location (a resend that also succeeded).
    more: Vec<(RecordId, u64)>,
    pub acked: u64,
}

impl AckLog {
    pub fn acknowledged(&mut self, producer: u32, sequence: u64, partition: u32, offset: u64) {
        let packed = location(partition, offset);
        let slot = grow(&mut self.first, producer, sequence);
        if *slot == 0 {
            *slot = packed;
            self.acked += 1;
        } else if *slot != packed {
            self.more.push((record_id(producer, sequence), packed));
        }
    }

    pub fn merge(&mut self, other: AckLog) {
        for (producer, row) in other.first.into_iter().enumerate() {
            for (sequence, packed) in row.into_iter().enumerate() {
                if packed != 0 {
                    let (partition, offset) = location_parts(packed);
                    self.acknowledged(producer as u32, sequence as u64, partition, offset);
                }
            }
        }
        self.more.extend(other.more);
    }
}

/// What was seen at an offset: 0 = nothing yet, else one of these or `id + 1`.
const SEEN_FOREIGN: u64 = u64::MAX;
const SEEN_CORRUPT: u64 = u64::MAX - 1;

/// Reader side: the id seen at each offset of each partition.
#[derive(Default)]
pub struct OffsetMap {
    partitions: Vec<Vec<u64>>,
    pub observations: u64,
    pub conflicts: u64,
    pub corrupt: u64,
    pub out_of_range: u64,
    /// Offsets a tailing consumer was not shown: it read `from` then a record past it.
    pub skips: u64,
    pub examples: Vec<String>,
}

impl OffsetMap {
    /// Books the record `value` read at `partition`/`offset`.
    pub fn observe(&mut self, run_id: u32, partition: u32, offset: u64, value: &[u8]) {
        let seen = match read_stamp(value) {
            Ok(stamp) if stamp.run_id == run_id => record_id(stamp.producer, stamp.sequence) + 1,
            Ok(_) => SEEN_FOREIGN,
            Err(_) => SEEN_CORRUPT,
        };
        if seen == SEEN_CORRUPT {
            self.corrupt += 1;
            self.example(format!(
                "corrupt record at partition {partition} offset {offset}"
            ));
        }
        self.set(partition, offset, seen, "");
    }

    fn set(&mut self, partition: u32, offset: u64, seen: u64, by: &str) {
        if offset > OFFSET_MAX || partition >= 1 << 16 {
            self.out_of_range += 1;
            return;
        }
        self.observations += 1;
        let slot = grow(&mut self.partitions, partition, offset);
        if *slot == 0 {
            *slot = seen;
        } else if *slot != seen {
            self.conflicts += 1;
            let (old, new) = (describe_seen(*slot), describe_seen(seen));
            self.example(format!(
                "partition {partition} offset {offset} seen holding {old} and {new}{by}"
            ));
        }
    }

    /// A reader expected `expected` next and was shown `offset` (above it).
    pub fn skipped(&mut self, partition: u32, expected: u64, offset: u64) {
        self.skips += offset - expected;
        self.example(format!(
            "partition {partition}: a tailing consumer read offset {offset} after {}, skipping {}",
            expected.saturating_sub(1),
            offset - expected
        ));
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(text);
        }
    }

    fn get(&self, partition: u32, offset: u64) -> u64 {
        self.partitions
            .get(partition as usize)
            .and_then(|p| p.get(offset as usize))
            .copied()
            .unwrap_or(0)
    }

    /// Books everything `other` saw into `self` (conflicts between them counted).
    pub fn merge(&mut self, other: &OffsetMap, by: &str) {
        for (partition, row) in other.partitions.iter().enumerate() {
            for (offset, seen) in row.iter().enumerate() {
                if *seen != 0 {
                    self.set(partition as u32, offset as u64, *seen, by);
                }
            }
        }
        self.corrupt += other.corrupt;
        self.out_of_range += other.out_of_range;
        self.conflicts += other.conflicts;
        self.skips += other.skips;
        for example in &other.examples {
            self.example(example.clone());
        }
    }
}

fn describe_seen(seen: u64) -> String {
    match seen {
        SEEN_FOREIGN => "a record of another run".to_string(),
        SEEN_CORRUPT => "a corrupt record".to_string(),
        id => {
            let (producer, sequence) = id_parts(id - 1);
            format!("record {producer}/{sequence}")
        }
    }
}

/// How far the read-back got in one partition.
#[derive(Clone, Copy, Debug, Default)]
pub struct PartitionRead {
    pub log_start: u64,
    pub high_watermark: u64,
    /// The read reached the high watermark.
    pub complete: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Records acknowledged (distinct ids).
    pub acked: u64,
    /// Records of this run found by the read-back (offsets holding one).
    pub found: u64,
    /// Acknowledged, found nowhere.
    pub lost: u64,
    /// Acknowledged, not at the offset of its acknowledgement, but at another.
    pub moved: u64,
    /// Ids found at more than one offset (resends; not a failure without idempotence).
    pub duplicated: u64,
    /// Found out of sequence order within (producer, partition) (resends; not a failure).
    pub reordered: u64,
    pub corrupt: u64,
    /// Offsets seen holding two different records (by any readers, at any time).
    pub conflicts: u64,
    /// Offsets below the high watermark the read-back did not return.
    pub holes: u64,
    /// Offsets a tailing consumer saw that the read-back no longer returns.
    pub vanished: u64,
    /// Partitions the read-back could not read to their high watermark in time.
    pub unreadable_partitions: u64,
    /// Offsets booked by tailing consumers during the run.
    pub tail_observations: u64,
    /// The producers stopped early: the audit's record limit was reached.
    pub truncated: bool,
    pub examples: Vec<String>,
}

impl VerifyReport {
    /// A failure of the broker's guarantees (duplicates and reordering are not, yet).
    pub fn failed(&self) -> bool {
        self.lost
            + self.moved
            + self.corrupt
            + self.conflicts
            + self.holes
            + self.vanished
            + self.unreadable_partitions
            > 0
    }

    pub fn human(&self) -> String {
        format!(
            "verify: {} | acked {} found {} lost {} moved {} duplicated {} reordered {} corrupt {} conflicts {} holes {} vanished {} unreadable_partitions {} tail_observations {}{}",
            if self.failed() { "FAILED" } else { "ok" },
            self.acked, self.found, self.lost, self.moved, self.duplicated, self.reordered,
            self.corrupt, self.conflicts, self.holes, self.vanished, self.unreadable_partitions,
            self.tail_observations,
            if self.truncated { " (audit limit reached: producers stopped early)" } else { "" },
        )
    }
}

/// Checks the read-back (`read`, with `reads[p]` how far it got in partition `p`) against
/// the acknowledgements and what the tailing consumers saw.
pub fn check(
    acks: &AckLog,
    mut read: OffsetMap,
    reads: &[PartitionRead],
    tails: &[OffsetMap],
) -> VerifyReport {
    let mut report = VerifyReport {
        acked: acks.acked,
        ..VerifyReport::default()
    };
    let mut examples = Vec::new();
    let mut example = |text: String| {
        if examples.len() < EXAMPLES_MAX {
            examples.push(text);
        }
    };
    // Prefix: the read-back returned every offset from the log start to the HW.
    for (partition, r) in reads.iter().enumerate() {
        if !r.complete {
            report.unreadable_partitions += 1;
            example(format!(
                "partition {partition} not read to its high watermark"
            ));
            continue;
        }
        for offset in r.log_start..r.high_watermark {
            if read.get(partition as u32, offset) == 0 {
                report.holes += 1;
                example(format!(
                    "partition {partition}: hole at offset {offset} below HW {}",
                    r.high_watermark
                ));
            }
        }
    }
    // What tailing consumers saw must still be there (and the same record).
    for tail in tails {
        report.tail_observations += tail.observations;
        for (partition, row) in tail.partitions.iter().enumerate() {
            let complete = reads.get(partition).is_some_and(|r| r.complete);
            for (offset, seen) in row.iter().enumerate() {
                if *seen != 0 && complete && read.get(partition as u32, offset as u64) == 0 {
                    report.vanished += 1;
                    example(format!(
                        "partition {partition} offset {offset}: a tailing consumer saw {}, the read-back has nothing",
                        describe_seen(*seen)
                    ));
                }
            }
        }
        read.merge(tail, " (tailing consumer vs read-back)");
    }
    // Where each id was found, in offset order per partition.
    let mut found_at: HashMap<RecordId, Vec<u64>> = HashMap::new();
    let mut last: HashMap<(u32, u32), u64> = HashMap::new();
    for (partition, row) in read.partitions.iter().enumerate() {
        for (offset, seen) in row.iter().enumerate() {
            if *seen == 0 || *seen == SEEN_FOREIGN || *seen == SEEN_CORRUPT {
                continue;
            }
            report.found += 1;
            let id = *seen - 1;
            let at = location(partition as u32, offset as u64);
            let places = found_at.entry(id).or_default();
            places.push(at);
            if places.len() == 2 {
                report.duplicated += 1;
            }
            let (producer, sequence) = id_parts(id);
            let last = last.entry((producer, partition as u32)).or_insert(sequence);
            if sequence < *last {
                report.reordered += 1;
            } else {
                *last = sequence;
            }
        }
    }
    let mut more: HashMap<RecordId, Vec<u64>> = HashMap::new();
    for (id, at) in &acks.more {
        more.entry(*id).or_default().push(*at);
    }
    for (producer, row) in acks.first.iter().enumerate() {
        for (sequence, first) in row.iter().enumerate() {
            if *first == 0 {
                continue;
            }
            let id = record_id(producer as u32, sequence as u64);
            let places = found_at.get(&id).map(Vec::as_slice).unwrap_or(&[]);
            let acked_at =
                std::iter::once(*first).chain(more.get(&id).into_iter().flatten().copied());
            let (partition, offset) = location_parts(*first);
            if places.is_empty() {
                report.lost += 1;
                example(format!("record {producer}/{sequence} acknowledged at partition {partition} offset {offset}: lost"));
            } else if !acked_at.into_iter().any(|a| places.contains(&a)) {
                report.moved += 1;
                let (p, o) = location_parts(places[0]);
                example(format!("record {producer}/{sequence} acknowledged at partition {partition} offset {offset}: found at partition {p} offset {o}"));
            }
        }
    }
    report.holes += read.skips;
    report.corrupt = read.corrupt;
    report.conflicts = read.conflicts;
    report.examples = read.examples.clone();
    report.examples.extend(examples);
    report.examples.truncate(2 * EXAMPLES_MAX);
    report
}

fn grow<T: Default + Clone>(table: &mut Vec<Vec<T>>, row: u32, column: u64) -> &mut T {
    let row = row as usize;
    if table.len() <= row {
        table.resize(row + 1, Vec::new());
    }
    let row = &mut table[row];
    let column = column as usize;
    if row.len() <= column {
        row.resize(column + 1, T::default());
    }
    &mut row[column]
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u32 = 7;

    fn value(producer: u32, sequence: u64) -> Vec<u8> {
        value_of_run(RUN, producer, sequence)
    }

    fn value_of_run(run_id: u32, producer: u32, sequence: u64) -> Vec<u8> {
        let mut value = vec![0x5au8; 64];
        stamp(
            &mut value,
            Stamp {
                sent_us: 1,
                run_id,
                producer,
                sequence,
            },
        );
        value
    }

    /// Producer 0 sends sequences 0..10 to partition 0, acknowledged at offsets 0..10.
    fn acks() -> AckLog {
        let mut acks = AckLog::default();
        for sequence in 0..10 {
            acks.acknowledged(0, sequence, 0, sequence);
        }
        acks
    }

    /// Reads `records` (offset, value) of partition 0 and checks them with the HW at `hw`.
    fn check_read(records: &[(u64, Vec<u8>)], hw: u64, tails: &[OffsetMap]) -> VerifyReport {
        let mut read = OffsetMap::default();
        for (offset, value) in records {
            read.observe(RUN, 0, *offset, value);
        }
        let reads = [PartitionRead {
            log_start: 0,
            high_watermark: hw,
            complete: true,
        }];
        check(&acks(), read, &reads, tails)
    }

    fn all() -> Vec<(u64, Vec<u8>)> {
        (0..10).map(|s| (s, value(0, s))).collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let report = check_read(&all(), 10, &[]);
        assert!(!report.failed(), "{report:?}");
        assert_eq!((report.acked, report.found, report.duplicated), (10, 10, 0));
    }

    #[test]
    fn a_truncated_log_loses_records() {
        let records = all()[..8].to_vec();
        let report = check_read(&records, 8, &[]);
        assert!(report.failed());
        assert_eq!((report.lost, report.holes), (2, 0));
    }

    #[test]
    fn a_hole_below_the_high_watermark_fails() {
        let mut records = all();
        records.remove(4);
        let report = check_read(&records, 10, &[]);
        assert_eq!((report.holes, report.lost), (1, 1), "{report:?}");
    }

    #[test]
    fn a_record_at_another_offset_is_moved_not_lost() {
        let mut records = all();
        // Sequence 3 moved to offset 10; another run's record fills offset 3.
        records[3].1 = value_of_run(9, 0, 0);
        records.push((10, value(0, 3)));
        let report = check_read(&records, 11, &[]);
        assert_eq!(
            (report.moved, report.lost, report.holes),
            (1, 0, 0),
            "{report:?}"
        );
        assert!(report.failed());
    }

    #[test]
    fn a_resend_is_a_duplicate_not_a_failure() {
        let mut records = all();
        records.push((10, value(0, 5)));
        let report = check_read(&records, 11, &[]);
        assert_eq!((report.duplicated, report.reordered), (1, 1), "{report:?}");
        assert!(!report.failed(), "{report:?}");
    }

    #[test]
    fn two_records_at_one_offset_conflict() {
        // A tailing consumer saw sequence 42 at offset 2 before a failover; the read-back sees 2.
        let mut tail = OffsetMap::default();
        tail.observe(RUN, 0, 2, &value(0, 42));
        let report = check_read(&all(), 10, &[tail]);
        assert_eq!(report.conflicts, 1, "{report:?}");
        assert!(report.failed());
        // Within one reader too.
        let mut map = OffsetMap::default();
        map.observe(RUN, 0, 2, &value(0, 2));
        map.observe(RUN, 0, 2, &value(0, 3));
        map.observe(RUN, 0, 2, &value(0, 2));
        assert_eq!(
            map.conflicts, 1,
            "counted against the first record seen there"
        );
    }

    #[test]
    fn an_offset_a_tail_saw_must_stay() {
        let mut tail = OffsetMap::default();
        tail.observe(RUN, 0, 10, &value(0, 10)); // seen, never acknowledged, then truncated
        let report = check_read(&all(), 10, &[tail]);
        assert_eq!(report.vanished, 1, "{report:?}");
    }

    #[test]
    fn corrupt_and_foreign_records_are_told_apart() {
        let mut records = all();
        records[2].1[40] ^= 1;
        records.push((10, value_of_run(9, 0, 3)));
        let report = check_read(&records, 11, &[]);
        assert_eq!((report.corrupt, report.lost, report.found), (1, 1, 9));
    }

    #[test]
    fn unacknowledged_records_are_not_lost() {
        let mut acks = AckLog::default();
        acks.acknowledged(0, 0, 0, 0);
        let mut read = OffsetMap::default();
        read.observe(RUN, 0, 0, &value(0, 0));
        let reads = [PartitionRead {
            log_start: 0,
            high_watermark: 1,
            complete: true,
        }];
        let report = check(&acks, read, &reads, &[]);
        assert!(!report.failed(), "{report:?}");
    }

    #[test]
    fn an_unread_partition_fails() {
        let reads = [PartitionRead::default()];
        let report = check(&acks(), OffsetMap::default(), &reads, &[]);
        assert_eq!(report.unreadable_partitions, 1);
        assert!(report.failed());
    }

    #[test]
    fn ids_and_locations_round_trip() {
        assert_eq!(id_parts(record_id(5, 1 << 39)), (5, 1 << 39));
        assert_eq!(
            location_parts(location(65535, OFFSET_MAX)),
            (65535, OFFSET_MAX)
        );
        assert_eq!(location_parts(location(0, 0)), (0, 0));
    }
}
