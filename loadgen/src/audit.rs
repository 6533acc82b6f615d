//! The durability audit: every record carries (run, producer, sequence) and a checksum; after
//! the run the partitions are read back and every acknowledged record must be found exactly
//! once, in sequence order per producer and partition.

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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub acked: u64,
    pub found: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupt: u64,
}

/// Collects acknowledgements during the run and records read back after it.
#[derive(Default)]
pub struct Audit {
    run_id: u32,
    /// Per producer, per sequence: acknowledged?
    acked: Vec<Vec<bool>>,
    /// Per producer, per sequence: times found.
    found: Vec<Vec<u8>>,
    /// Last sequence seen per (producer, partition), in offset order.
    last: HashMap<(u32, u32), u64>,
    report: VerifyReport,
}

impl Audit {
    pub fn new(run_id: u32) -> Audit {
        Audit {
            run_id,
            ..Audit::default()
        }
    }

    pub fn acknowledged(&mut self, producer: u32, sequence: u64) {
        let acked = grow(&mut self.acked, producer, sequence);
        if !*acked {
            *acked = true;
            self.report.acked += 1;
        }
    }

    /// A record read back from `partition`, in offset order per partition.
    pub fn found(&mut self, partition: u32, value: &[u8]) {
        let stamp = match read_stamp(value) {
            Ok(stamp) => stamp,
            Err(_) => {
                self.report.corrupt += 1;
                return;
            }
        };
        if stamp.run_id != self.run_id {
            return; // an earlier run's record
        }
        self.report.found += 1;
        let count = grow(&mut self.found, stamp.producer, stamp.sequence);
        *count = count.saturating_add(1);
        if *count > 1 {
            self.report.duplicated += 1;
            return;
        }
        let last = self
            .last
            .entry((stamp.producer, partition))
            .or_insert(stamp.sequence);
        if stamp.sequence < *last {
            self.report.reordered += 1;
        } else {
            *last = stamp.sequence;
        }
    }

    pub fn finish(mut self) -> VerifyReport {
        for (producer, acked) in self.acked.iter().enumerate() {
            let found = self.found.get(producer);
            for (sequence, was_acked) in acked.iter().enumerate() {
                if *was_acked && found.and_then(|f| f.get(sequence)).copied().unwrap_or(0) == 0 {
                    self.report.lost += 1;
                }
            }
        }
        self.report
    }
}

fn grow<T: Default + Clone>(table: &mut Vec<Vec<T>>, producer: u32, sequence: u64) -> &mut T {
    let producer = producer as usize;
    if table.len() <= producer {
        table.resize(producer + 1, Vec::new());
    }
    let row = &mut table[producer];
    let sequence = sequence as usize;
    if row.len() <= sequence {
        row.resize(sequence + 1, T::default());
    }
    &mut row[sequence]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(producer: u32, sequence: u64) -> Vec<u8> {
        let mut value = vec![0x5au8; 64];
        stamp(
            &mut value,
            Stamp {
                sent_us: 1,
                run_id: 7,
                producer,
                sequence,
            },
        );
        value
    }

    /// A fake source: producer 0 sends 0..10 to partition 0; the test edits what is "read".
    fn audit_of(read: &[(u32, Vec<u8>)]) -> VerifyReport {
        let mut audit = Audit::new(7);
        for sequence in 0..10 {
            audit.acknowledged(0, sequence);
        }
        for (partition, value) in read {
            audit.found(*partition, value);
        }
        audit.finish()
    }

    fn read_all() -> Vec<(u32, Vec<u8>)> {
        (0..10).map(|s| (0, value(0, s))).collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let report = audit_of(&read_all());
        assert_eq!(
            report,
            VerifyReport {
                acked: 10,
                found: 10,
                ..VerifyReport::default()
            }
        );
    }

    #[test]
    fn a_dropped_record_is_lost() {
        let mut read = read_all();
        read.remove(4);
        let report = audit_of(&read);
        assert_eq!((report.lost, report.found), (1, 9));
    }

    #[test]
    fn a_duplicated_record_is_counted() {
        let mut read = read_all();
        read.insert(5, (0, value(0, 2)));
        let report = audit_of(&read);
        assert_eq!(
            (report.duplicated, report.lost, report.reordered),
            (1, 0, 0)
        );
    }

    #[test]
    fn a_reordered_record_is_counted() {
        let mut read = read_all();
        read.swap(3, 6);
        let report = audit_of(&read);
        assert!(report.reordered >= 1, "{report:?}");
        assert_eq!(report.lost, 0);
    }

    #[test]
    fn corrupt_and_foreign_records_are_told_apart() {
        let mut read = read_all();
        read[2].1[40] ^= 1;
        let mut foreign = value(0, 3);
        foreign[8] = 9; // another run id (and so another checksum input)
        stamp(
            &mut foreign,
            Stamp {
                sent_us: 1,
                run_id: 9,
                producer: 0,
                sequence: 3,
            },
        );
        read.push((0, foreign));
        let report = audit_of(&read);
        assert_eq!((report.corrupt, report.lost, report.found), (1, 1, 9));
    }

    #[test]
    fn unacknowledged_records_are_not_lost() {
        let mut audit = Audit::new(7);
        audit.acknowledged(0, 0);
        audit.found(0, &value(0, 0));
        // Sequence 1 was sent but never acknowledged and never found: not a loss.
        let report = audit.finish();
        assert_eq!(report.lost, 0);
    }
}
