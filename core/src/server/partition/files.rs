//! The small files of a partition directory besides the log: the leader-epoch history and the
//! last high watermark a leader knew. Both are written whole and atomically (temp file, fsync,
//! rename, fsync the directory) on glommio's blocking thread pool (`spawn_blocking`), never on
//! the reactor.

use std::io::Write;
use std::path::Path;

use wharf_storage::{Epoch, Offset};

/// Keeps the leader-epoch history: one `epoch start-offset` line per epoch.
pub const EPOCHS_FILE: &str = "leader-epochs";
/// Keeps the high watermark this broker last knew as the partition's leader (one number).
pub const HIGH_WATERMARK_FILE: &str = "high-watermark";

pub fn load_epochs(dir: &Path) -> Result<Option<Vec<(Epoch, Offset)>>, String> {
    let path = dir.join(EPOCHS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    let mut entries = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next(), fields.next()) {
            (Some(Ok(epoch)), Some(Ok(start)), None) if epoch <= u64::from(u32::MAX) => {
                entries.push((Epoch(epoch as u32), Offset(start)));
            }
            _ => return Err(format!("{}: malformed line {line:?}", path.display())),
        }
    }
    Ok(Some(entries))
}

/// Writes the epoch history durably. Blocking.
pub fn store_epochs(dir: &Path, entries: &[(Epoch, Offset)]) -> Result<(), String> {
    let text: String = entries
        .iter()
        .map(|(epoch, start)| format!("{epoch} {start}\n"))
        .collect();
    store_atomically(dir, EPOCHS_FILE, &text)
}

/// The high watermark last stored; `Offset::ZERO` when there is none or it cannot be read (a
/// lower high watermark is always safe: it only delays what consumers see). Blocking.
pub fn load_high_watermark(dir: &Path) -> Result<Offset, String> {
    let path = dir.join(HIGH_WATERMARK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Offset::ZERO),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    text.trim()
        .parse::<u64>()
        .map(Offset)
        .map_err(|_| format!("{}: malformed high watermark {text:?}", path.display()))
}

/// Stores a high watermark the leader computed (so at most what a quorum holds durably).
/// Blocking.
pub fn store_high_watermark(dir: &Path, high_watermark: Offset) -> Result<(), String> {
    store_atomically(dir, HIGH_WATERMARK_FILE, &format!("{high_watermark}\n"))
}

/// Replaces `name` with `text` so that a crash leaves the old or the new file whole.
fn store_atomically(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_data()?;
        std::fs::rename(&temp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_a_missing_or_bad_high_watermark_is_zero_or_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(load_epochs(dir.path()), Ok(None));
        assert_eq!(load_high_watermark(dir.path()), Ok(Offset::ZERO));
        let entries = vec![(Epoch(1), Offset(0)), (Epoch(4), Offset(17))];
        store_epochs(dir.path(), &entries).expect("store epochs");
        assert_eq!(load_epochs(dir.path()), Ok(Some(entries)));
        store_high_watermark(dir.path(), Offset(42)).expect("store HW");
        assert_eq!(load_high_watermark(dir.path()), Ok(Offset(42)));
        std::fs::write(dir.path().join(HIGH_WATERMARK_FILE), "4x2").expect("write");
        assert!(load_high_watermark(dir.path()).is_err());
    }
}
