//! Durable records of the standalone witness: one JSON file per volume, `DIR/<volume>.json`.
//!
//! A record is replaced atomically (write `DIR/.<volume>.json.tmp`, fsync it, rename over the
//! record, fsync the directory) and only then is the CAS answered, so an acknowledged epoch
//! survives a crash or power loss. A crash mid-write leaves at worst a temp file, which never
//! shadows the record (temp names start with `.`, volume names cannot) and is removed at load.
//! Blocking calls: run them on a blocking thread.

use super::wire::validate_volume_name;
use super::Membership;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const RECORD_SUFFIX: &str = ".json";
const TEMP_SUFFIX: &str = ".json.tmp";

/// Path of `volume`'s record (the name must already be validated).
pub fn record_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}{RECORD_SUFFIX}"))
}

/// Path of `volume`'s temp file.
pub fn temp_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!(".{volume}{TEMP_SUFFIX}"))
}

/// Loads every record under `dir` (creating `dir` if missing) and removes leftover temp files.
///
/// A record that does not parse is an error, not an absent record: treating it as absent would
/// let a create-if-absent CAS start a second history of the volume (split brain).
pub fn load_all(dir: &Path) -> io::Result<HashMap<String, Membership>> {
    fs::create_dir_all(dir)?;
    let mut records = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue; // not ours: we only write ASCII names
        };
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            // A write interrupted before its rename: the record (if any) is the previous one.
            tracing::warn!(file = name, "removing leftover witness temp file");
            fs::remove_file(entry.path())?;
            continue;
        }
        let Some(volume) = name.strip_suffix(RECORD_SUFFIX) else {
            continue;
        };
        if validate_volume_name(volume).is_err() {
            continue;
        }
        let bytes = fs::read(entry.path())?;
        let record: Membership = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt witness record {}: {e}", entry.path().display()),
            )
        })?;
        records.insert(volume.to_string(), record);
    }
    Ok(records)
}

/// Durably replaces `volume`'s record with `record` (write temp, fsync, rename, fsync dir).
pub fn persist(dir: &Path, volume: &str, record: &Membership) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let tmp = temp_path(dir, volume);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, record_path(dir, volume))?;
    // The rename is durable only once the directory entry is.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::conformance::record;

    #[test]
    fn persist_then_load() {
        let dir = tempfile::tempdir().unwrap();
        persist(dir.path(), "a", &record(1, 1)).unwrap();
        persist(dir.path(), "b.c_d-e", &record(2, 2)).unwrap();
        persist(dir.path(), "a", &record(3, 2)).unwrap();
        let all = load_all(dir.path()).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["a"], record(3, 2));
        assert_eq!(all["b.c_d-e"], record(2, 2));
        assert!(!temp_path(dir.path(), "a").exists());
    }

    #[test]
    fn leftover_temp_file_is_removed_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        persist(dir.path(), "v", &record(4, 1)).unwrap();
        // Crash mid-write of epoch 5: a torn temp file, for an existing and a new volume.
        fs::write(temp_path(dir.path(), "v"), b"{\"epoch\": 5, \"ple").unwrap();
        fs::write(temp_path(dir.path(), "w"), b"garbage").unwrap();
        let all = load_all(dir.path()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all["v"], record(4, 1));
        assert!(!temp_path(dir.path(), "v").exists());
        assert!(!temp_path(dir.path(), "w").exists());
    }

    #[test]
    fn corrupt_record_refuses_to_load() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(record_path(dir.path(), "v"), b"{not json").unwrap();
        let err = load_all(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn foreign_files_are_ignored_and_missing_dir_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("witness");
        assert!(load_all(&sub).unwrap().is_empty());
        fs::write(sub.join("README"), b"x").unwrap();
        fs::write(sub.join("Upper.json"), b"x").unwrap();
        assert!(load_all(&sub).unwrap().is_empty());
    }
}
