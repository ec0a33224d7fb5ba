//! The watch's history: every site's series and every verdict, in an SQLite file (by default
//! /var/lib/memleak/history.sqlite), so that a restarted watch continues its series and
//! `memleak history` can look back. Bounded by age (`--retain`).
use std::path::{Path, PathBuf};

use hashbrown::HashMap;
use memleak_common::{AllocRecord, STACK_NOT_SAMPLED};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Leak, Series, SiteFigures, SiteName, verdict::Point};

/// The store's layout version, in its `meta` table.
const STORE_VERSION: i64 = 1;

pub const DEFAULT_PATH: &str = "/var/lib/memleak/history.sqlite";

#[derive(Debug, Error)]
pub enum HistoryError {
    #[error("history store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("history store {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("history store {path}: creating its directory: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One verdict as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredVerdict {
    pub at_ms: u64,
    #[serde(flatten)]
    pub site: SiteName,
    pub severity: String,
    pub confidence: f64,
    pub objects_per_second: f64,
    pub bytes_per_second: f64,
    pub count: u64,
    pub bytes: u64,
}

/// One point of a site's series as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPoint {
    pub at_ms: u64,
    pub count: u64,
    pub bytes: u64,
    pub oldest_age_ms: u64,
}

/// What `memleak history` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryReport {
    /// Newest first.
    pub verdicts: Vec<StoredVerdict>,
    /// The series asked for (`--site`), oldest point first.
    pub series: Vec<StoredSeries>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSeries {
    #[serde(flatten)]
    pub site: SiteName,
    pub points: Vec<StoredPoint>,
}

/// The objects of the last interval (address, record) and their caches' names (id, name).
pub type RestoredTable = (Vec<(u64, AllocRecord)>, Vec<(u64, String)>);

/// The table's objects to store with an interval, and the names of their caches.
#[derive(Debug, Clone, Copy)]
pub struct StoredObjects<'a> {
    pub boot_id: &'a str,
    pub objects: &'a [(u64, AllocRecord)],
    pub cache_names: &'a HashMap<u64, String>,
}

pub struct History {
    connection: Connection,
    path: PathBuf,
    /// The device and inode the store was opened at, to notice it deleted or replaced.
    identity: Option<(u64, u64)>,
}

/// What happened to a store's file while a watch held it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreChange {
    Deleted,
    Replaced,
    Overwritten,
}

impl std::fmt::Display for StoreChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Deleted => "deleted",
            Self::Replaced => "replaced by another file",
            Self::Overwritten => "overwritten with something that is not an SQLite database",
        })
    }
}

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The device and inode `path` names now.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .ok()
        .map(|metadata| (metadata.dev(), metadata.ino()))
}

impl History {
    /// Opens (creating if needed) the store at `path`. A file that is not a memleak store, or
    /// of another version, is an error: it is never overwritten.
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|source| HistoryError::Directory {
                path: path.to_owned(),
                source,
            })?;
        }
        let connection = Connection::open(path).map_err(|source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let history = Self {
            connection,
            path: path.to_owned(),
            identity: identity(path),
        };
        history.prepare()?;
        Ok(history)
    }

    /// Opens an existing store read-only (for `memleak history`).
    pub fn open_existing(path: &Path) -> Result<Self, HistoryError> {
        if !path.exists() {
            return Err(HistoryError::Invalid {
                path: path.to_owned(),
                message: "no such file (has `memleak watch` run with this --history?)".into(),
            });
        }
        let connection =
            Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
                |source| HistoryError::Sqlite {
                    path: path.to_owned(),
                    source,
                },
            )?;
        let history = Self {
            connection,
            path: path.to_owned(),
            identity: identity(path),
        };
        history.check_version()?;
        Ok(history)
    }

    /// How the file at the store's path changed since it was opened, if it did. SQLite would
    /// go on writing to a deleted file (lost when memleak ends) or into one that is no longer
    /// a database.
    pub fn changed(&self) -> Option<StoreChange> {
        match identity(&self.path) {
            None => return Some(StoreChange::Deleted),
            Some(now) if Some(now) != self.identity => return Some(StoreChange::Replaced),
            Some(_) => {}
        }
        let mut start = [0u8; 16];
        let read = std::fs::File::open(&self.path)
            .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut start));
        (read.is_ok() && &start != SQLITE_MAGIC).then_some(StoreChange::Overwritten)
    }

    /// Closes the store after `change`. One overwritten in place is closed without SQLite's
    /// checkpoint, which would copy the write-ahead log's pages into what is now another
    /// file's content, and its log and shared-memory index beside it are removed: SQLite
    /// would otherwise read the file through the log's pages as if it were a store.
    pub fn close(self, change: StoreChange) {
        if change != StoreChange::Overwritten {
            return;
        }
        let _ = self.connection.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        );
        let path = self.path.clone();
        drop(self);
        for suffix in ["-wal", "-shm"] {
            let mut beside = path.clone().into_os_string();
            beside.push(suffix);
            let _ = std::fs::remove_file(beside);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> HistoryError {
        HistoryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn prepare(&self) -> Result<(), HistoryError> {
        self.connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS sites (
                     id INTEGER PRIMARY KEY,
                     kind TEXT NOT NULL,
                     cache TEXT NOT NULL,
                     call_site TEXT NOT NULL,
                     UNIQUE (kind, cache, call_site));
                 CREATE TABLE IF NOT EXISTS points (
                     site INTEGER NOT NULL REFERENCES sites(id),
                     at_ms INTEGER NOT NULL,
                     count INTEGER NOT NULL,
                     bytes INTEGER NOT NULL,
                     oldest_age_ms INTEGER NOT NULL,
                     PRIMARY KEY (site, at_ms));
                 CREATE INDEX IF NOT EXISTS points_at ON points (at_ms);
                 CREATE TABLE IF NOT EXISTS verdicts (
                     site INTEGER NOT NULL REFERENCES sites(id),
                     at_ms INTEGER NOT NULL,
                     severity TEXT NOT NULL,
                     confidence REAL NOT NULL,
                     objects_per_second REAL NOT NULL,
                     bytes_per_second REAL NOT NULL,
                     count INTEGER NOT NULL,
                     bytes INTEGER NOT NULL,
                     PRIMARY KEY (site, at_ms));
                 CREATE INDEX IF NOT EXISTS verdicts_at ON verdicts (at_ms);
                 CREATE TABLE IF NOT EXISTS boot (id TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS objects (
                     address INTEGER PRIMARY KEY,
                     call_site INTEGER NOT NULL,
                     cache_id INTEGER NOT NULL,
                     timestamp_ns INTEGER NOT NULL,
                     bytes_requested INTEGER NOT NULL,
                     bytes_allocated INTEGER NOT NULL,
                     tgid INTEGER NOT NULL,
                     kind INTEGER NOT NULL,
                     gfp_flags INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS caches (id INTEGER PRIMARY KEY, name TEXT NOT NULL);",
            )
            .map_err(|error| self.sqlite(error))?;
        self.connection
            .execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('version', ?1)",
                params![STORE_VERSION],
            )
            .map_err(|error| self.sqlite(error))?;
        self.check_version()
    }

    fn check_version(&self) -> Result<(), HistoryError> {
        let version: Option<i64> = self
            .connection
            .query_row("SELECT value FROM meta WHERE key = 'version'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|error| self.sqlite(error))?;
        match version {
            Some(STORE_VERSION) => Ok(()),
            other => Err(HistoryError::Invalid {
                path: self.path.clone(),
                message: format!(
                    "store version {other:?}, this memleak reads version {STORE_VERSION}"
                ),
            }),
        }
    }

    fn site_id(&self, site: &SiteName) -> Result<i64, HistoryError> {
        self.connection
            .query_row(
                "INSERT INTO sites (kind, cache, call_site) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, cache, call_site) DO UPDATE SET kind = excluded.kind
                 RETURNING id",
                params![
                    site.kind,
                    site.cache.as_deref().unwrap_or(""),
                    site.call_site
                ],
                |row| row.get(0),
            )
            .map_err(|error| self.sqlite(error))
    }

    /// Stores one interval: every site's point and the verdicts, in one transaction, and
    /// drops what is older than `retain_ms`.
    pub fn record(
        &mut self,
        at_ms: u64,
        sites: &[&SiteFigures],
        leaks: &[Leak],
        retain_ms: u64,
    ) -> Result<(), HistoryError> {
        self.record_with_objects(at_ms, sites, leaks, retain_ms, None)
    }

    /// [`Self::record`], also replacing the stored table of objects (and the caches' names)
    /// with `objects`, stamped with this boot's id, for [`Self::objects`] after a restart.
    pub fn record_with_objects(
        &mut self,
        at_ms: u64,
        sites: &[&SiteFigures],
        leaks: &[Leak],
        retain_ms: u64,
        objects: Option<StoredObjects<'_>>,
    ) -> Result<(), HistoryError> {
        let transaction = self
            .connection
            .unchecked_transaction()
            .map_err(|error| self.sqlite(error))?;
        for figures in sites {
            let id = self.site_id(&figures.site)?;
            self.connection
                .execute(
                    "INSERT OR REPLACE INTO points (site, at_ms, count, bytes, oldest_age_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        id,
                        at_ms,
                        figures.count,
                        figures.bytes,
                        figures.oldest_age_ms
                    ],
                )
                .map_err(|error| self.sqlite(error))?;
        }
        for leak in leaks {
            let id = self.site_id(&leak.site)?;
            self.connection
                .execute(
                    "INSERT OR REPLACE INTO verdicts (site, at_ms, severity, confidence,
                         objects_per_second, bytes_per_second, count, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        id,
                        at_ms,
                        leak.judgement.severity.name(),
                        leak.judgement.confidence,
                        leak.judgement.objects_per_second,
                        leak.judgement.bytes_per_second,
                        leak.count,
                        leak.bytes
                    ],
                )
                .map_err(|error| self.sqlite(error))?;
        }
        let oldest = at_ms.saturating_sub(retain_ms);
        for statement in [
            "DELETE FROM points WHERE at_ms < ?1",
            "DELETE FROM verdicts WHERE at_ms < ?1",
        ] {
            self.connection
                .execute(statement, params![oldest])
                .map_err(|error| self.sqlite(error))?;
        }
        self.connection
            .execute(
                "DELETE FROM sites WHERE id NOT IN (SELECT site FROM points)
                     AND id NOT IN (SELECT site FROM verdicts)",
                [],
            )
            .map_err(|error| self.sqlite(error))?;
        if let Some(objects) = objects {
            self.replace_objects(objects)?;
        }
        transaction.commit().map_err(|error| self.sqlite(error))
    }

    fn replace_objects(&self, objects: StoredObjects<'_>) -> Result<(), HistoryError> {
        let sqlite = |error| self.sqlite(error);
        self.connection
            .execute_batch("DELETE FROM objects; DELETE FROM boot;")
            .map_err(sqlite)?;
        self.connection
            .execute(
                "INSERT INTO boot (id) VALUES (?1)",
                params![objects.boot_id],
            )
            .map_err(sqlite)?;
        let mut insert = self
            .connection
            .prepare_cached(
                "INSERT OR REPLACE INTO objects (address, call_site, cache_id, timestamp_ns,
                     bytes_requested, bytes_allocated, tgid, kind, gfp_flags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .map_err(sqlite)?;
        for (address, record) in objects.objects {
            // Addresses and call sites are kernel addresses above i64::MAX: stored as their
            // two's-complement i64, read back the same way.
            insert
                .execute(params![
                    *address as i64,
                    record.call_site as i64,
                    record.cache_id as i64,
                    record.allocated_at,
                    record.bytes_requested,
                    record.bytes_allocated,
                    record.tgid,
                    record.kind,
                    record.gfp_flags
                ])
                .map_err(sqlite)?;
        }
        let mut name = self
            .connection
            .prepare_cached("INSERT OR REPLACE INTO caches (id, name) VALUES (?1, ?2)")
            .map_err(sqlite)?;
        for (id, cache) in objects.cache_names {
            name.execute(params![*id as i64, cache]).map_err(sqlite)?;
        }
        Ok(())
    }

    /// The objects stored by the last interval, if it ran in this boot (`boot_id`), with the
    /// caches' names; nothing after a reboot.
    pub fn objects(&self, boot_id: &str) -> Result<RestoredTable, HistoryError> {
        let sqlite = |error| self.sqlite(error);
        let stored_boot: Option<String> = self
            .connection
            .query_row("SELECT id FROM boot", [], |row| row.get(0))
            .optional()
            .map_err(sqlite)?;
        if stored_boot.as_deref() != Some(boot_id) {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut statement = self
            .connection
            .prepare(
                "SELECT address, call_site, cache_id, timestamp_ns, bytes_requested,
                     bytes_allocated, tgid, kind, gfp_flags FROM objects",
            )
            .map_err(sqlite)?;
        let objects = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64,
                    AllocRecord {
                        call_site: row.get::<_, i64>(1)? as u64,
                        cache_id: row.get::<_, i64>(2)? as u64,
                        allocated_at: row.get(3)?,
                        bytes_requested: row.get(4)?,
                        bytes_allocated: row.get(5)?,
                        // The stack map is the old tracer's: its ids mean nothing now.
                        stack_id: STACK_NOT_SAMPLED,
                        tgid: row.get(6)?,
                        kind: row.get(7)?,
                        // As with the stack id: the user stack map is the old tracer's.
                        user_stack: 0,
                        gfp_flags: row.get(8)?,
                    },
                ))
            })
            .map_err(sqlite)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sqlite)?;
        let mut statement = self
            .connection
            .prepare("SELECT id, name FROM caches")
            .map_err(sqlite)?;
        let names = statement
            .query_map([], |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)))
            .map_err(sqlite)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sqlite)?;
        Ok((objects, names))
    }

    /// Replays into `series` the points of the last `window_ms` before `now_ms`: a restarted
    /// watch continues its series. Returns how many points were read.
    pub fn restore(
        &self,
        series: &mut Series,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<u64, HistoryError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT s.kind, s.cache, s.call_site, p.at_ms, p.count, p.bytes, p.oldest_age_ms
                 FROM points p JOIN sites s ON s.id = p.site
                 WHERE p.at_ms >= ?1 ORDER BY p.at_ms",
            )
            .map_err(|error| self.sqlite(error))?;
        let rows = statement
            .query_map(params![now_ms.saturating_sub(window_ms)], |row| {
                let cache: String = row.get(1)?;
                Ok((
                    SiteName {
                        kind: row.get(0)?,
                        cache: (!cache.is_empty()).then_some(cache),
                        call_site: row.get(2)?,
                    },
                    row.get::<_, u64>(3)?,
                    row.get::<_, u64>(4)?,
                    row.get::<_, u64>(5)?,
                    row.get::<_, u64>(6)?,
                ))
            })
            .map_err(|error| self.sqlite(error))?;
        let mut restored = 0;
        for row in rows {
            let (site, at_ms, count, bytes, oldest_age_ms) =
                row.map_err(|error| self.sqlite(error))?;
            series.add_point(
                site,
                at_ms,
                Point {
                    at_seconds: 0.0,
                    count,
                    bytes,
                    oldest_age_seconds: oldest_age_ms as f64 / 1000.0,
                    // Not stored: a restarted duty-cycled watch learns it again.
                    found_free: 0,
                },
            );
            restored += 1;
        }
        Ok(restored)
    }

    /// The verdicts stored since `since_ms`, newest first.
    pub fn verdicts(&self, since_ms: u64) -> Result<Vec<StoredVerdict>, HistoryError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT v.at_ms, s.kind, s.cache, s.call_site, v.severity, v.confidence,
                        v.objects_per_second, v.bytes_per_second, v.count, v.bytes
                 FROM verdicts v JOIN sites s ON s.id = v.site
                 WHERE v.at_ms >= ?1 ORDER BY v.at_ms DESC, s.call_site",
            )
            .map_err(|error| self.sqlite(error))?;
        let rows = statement
            .query_map(params![since_ms], |row| {
                let cache: String = row.get(2)?;
                Ok(StoredVerdict {
                    at_ms: row.get(0)?,
                    site: SiteName {
                        kind: row.get(1)?,
                        cache: (!cache.is_empty()).then_some(cache),
                        call_site: row.get(3)?,
                    },
                    severity: row.get(4)?,
                    confidence: row.get(5)?,
                    objects_per_second: row.get(6)?,
                    bytes_per_second: row.get(7)?,
                    count: row.get(8)?,
                    bytes: row.get(9)?,
                })
            })
            .map_err(|error| self.sqlite(error))?;
        rows.collect::<Result<_, _>>()
            .map_err(|error| self.sqlite(error))
    }

    /// The series of the sites whose call site contains `pattern`, oldest point first.
    pub fn series(&self, pattern: &str) -> Result<Vec<StoredSeries>, HistoryError> {
        let mut statement = self
            .connection
            .prepare(
                "SELECT s.kind, s.cache, s.call_site, p.at_ms, p.count, p.bytes, p.oldest_age_ms
                 FROM points p JOIN sites s ON s.id = p.site
                 WHERE instr(s.call_site, ?1) > 0 ORDER BY s.id, p.at_ms",
            )
            .map_err(|error| self.sqlite(error))?;
        let rows = statement
            .query_map(params![pattern], |row| {
                let cache: String = row.get(1)?;
                Ok((
                    SiteName {
                        kind: row.get(0)?,
                        cache: (!cache.is_empty()).then_some(cache),
                        call_site: row.get(2)?,
                    },
                    StoredPoint {
                        at_ms: row.get(3)?,
                        count: row.get(4)?,
                        bytes: row.get(5)?,
                        oldest_age_ms: row.get(6)?,
                    },
                ))
            })
            .map_err(|error| self.sqlite(error))?;
        let mut series: Vec<StoredSeries> = Vec::new();
        for row in rows {
            let (site, point) = row.map_err(|error| self.sqlite(error))?;
            match series.last_mut() {
                Some(last) if last.site == site => last.points.push(point),
                _ => series.push(StoredSeries {
                    site,
                    points: vec![point],
                }),
            }
        }
        Ok(series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::scratch::ScratchDir;

    fn figures(call_site: &str, count: u64) -> SiteFigures {
        let name = SiteName {
            kind: "kmalloc".into(),
            cache: Some("kmalloc-64".into()),
            call_site: call_site.into(),
        };
        SiteFigures {
            oldest_age_ms: 1000,
            ..SiteFigures::of(name, count, count * 64)
        }
    }

    #[test]
    fn a_reopened_store_continues_the_series_and_keeps_verdicts() {
        let scratch = ScratchDir::new("history");
        let path = scratch.path().join("state/history.sqlite");
        {
            let mut history = History::open(&path).expect("a new store");
            for second in 0..5u64 {
                let leak = figures("leaky+0x10/0x40", 10 * second);
                let pool = figures("pool+0x8/0x20", 500);
                history
                    .record(1000 * second, &[&leak, &pool], &[], 3_600_000)
                    .expect("recorded");
            }
        }
        let history = History::open(&path).expect("the same store");
        let mut series = Series::new(60);
        assert_eq!(history.restore(&mut series, 5000, 60_000).unwrap(), 10);
        let leak = figures("leaky+0x10/0x40", 0).site;
        let points = series.of(&leak);
        assert_eq!(points.len(), 5);
        assert_eq!((points[4].0, points[4].1.count), (4000, 40));
        // Only the window asked for comes back: both sites' points at 4 s.
        let mut recent = Series::new(60);
        assert_eq!(history.restore(&mut recent, 5000, 1500).unwrap(), 2);

        let stored = history.series("leaky").unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            stored[0]
                .points
                .iter()
                .map(|point| point.count)
                .sum::<u64>(),
            100
        );
        assert!(history.verdicts(0).unwrap().is_empty());
    }

    #[test]
    fn old_points_are_dropped_and_foreign_files_refused() {
        let scratch = ScratchDir::new("history-retain");
        let path = scratch.path().join("history.sqlite");
        let mut history = History::open(&path).unwrap();
        let site = figures("f+0x1/0x2", 1);
        history.record(1_000, &[&site], &[], 10_000).unwrap();
        history.record(20_000, &[&site], &[], 10_000).unwrap();
        let stored = history.series("f+").unwrap();
        assert_eq!(
            stored[0].points.len(),
            1,
            "the point at 1 s is past retention at 20 s"
        );

        let foreign = scratch.path().join("notes.txt");
        std::fs::write(&foreign, "not a database, just text that is long enough").unwrap();
        let error = History::open(&foreign).err().expect("refused");
        assert!(
            error
                .to_string()
                .starts_with(&format!("history store {}", foreign.display()))
        );
        assert_eq!(
            std::fs::read_to_string(&foreign).unwrap(),
            "not a database, just text that is long enough"
        );
        assert!(History::open_existing(&scratch.path().join("missing.sqlite")).is_err());
    }

    #[test]
    fn objects_come_back_in_the_same_boot_only() {
        let scratch = ScratchDir::new("history-objects");
        let path = scratch.path().join("history.sqlite");
        let record = AllocRecord {
            call_site: 0xffff_ffff_8123_4567,
            cache_id: 0xffff_8880_0100_0000,
            allocated_at: 123_456_789,
            bytes_requested: 40,
            bytes_allocated: 64,
            stack_id: 7,
            tgid: 42,
            kind: 1,
            user_stack: 3,
            gfp_flags: 0xcc0,
        };
        let names: HashMap<u64, String> = [(record.cache_id, "filp".to_owned())].into();
        let objects = [(0xffff_8880_0123_4000u64, record)];
        let mut history = History::open(&path).unwrap();
        history
            .record_with_objects(
                1_000,
                &[],
                &[],
                60_000,
                Some(StoredObjects {
                    boot_id: "boot-a",
                    objects: &objects,
                    cache_names: &names,
                }),
            )
            .unwrap();
        let (read, read_names) = history.objects("boot-a").unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].0, 0xffff_8880_0123_4000);
        let expected = AllocRecord {
            stack_id: STACK_NOT_SAMPLED,
            user_stack: 0,
            ..record
        };
        assert_eq!(format!("{:?}", read[0].1), format!("{expected:?}"));
        assert_eq!(read_names, [(record.cache_id, "filp".to_owned())]);
        assert!(history.objects("boot-b").unwrap().0.is_empty());
    }
}
