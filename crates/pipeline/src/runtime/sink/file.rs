//! The `file` connector: rows as JSON lines in files of a directory, named
//! `SINK-<epoch ms of the file's first write>.jsonl`, rolled when a file reaches
//! `roll_size` or `roll_interval`. A batch is written and fsync'd (the file, and the
//! directory when a file is new) before the sink's offsets move: at-least-once, a
//! batch may be written again after a crash.

use std::collections::HashMap;
use std::fs::{File as FsFile, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{Columns, Failure, Out, Position, Remembered, Target};

pub(crate) struct File {
    dir: PathBuf,
    sink: String,
    roll_bytes: u64,
    roll_interval_ms: i64,
    columns: Columns,
    current: Option<Current>,
    pending: Vec<u8>,
    savepoint: usize,
    remembered: Remembered,
}

struct Current {
    file: FsFile,
    bytes: u64,
    opened: Instant,
}

fn io(what: &str, e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotADirectory => {
            Failure::Config(format!("{what}: {e}"))
        }
        _ => Failure::Unavailable(format!("{what}: {e}")),
    }
}

impl File {
    pub fn new(
        path: &str,
        sink: &str,
        roll_bytes: u64,
        roll_interval_ms: i64,
        columns: Columns,
    ) -> File {
        File {
            dir: PathBuf::from(path),
            sink: sink.to_string(),
            roll_bytes,
            roll_interval_ms,
            columns,
            current: None,
            pending: Vec::new(),
            savepoint: 0,
            remembered: Remembered::default(),
        }
    }

    /// The file to append to, a new one when the current one is full or old.
    fn current(&mut self) -> Result<&mut Current, Failure> {
        let roll = self.current.as_ref().is_some_and(|c| {
            c.bytes >= self.roll_bytes
                || c.opened.elapsed().as_millis() as i64 >= self.roll_interval_ms
        });
        if roll || self.current.is_none() {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let path = self.dir.join(format!("{}-{ms:013}.jsonl", self.sink));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io(&format!("cannot open {}", path.display()), e))?;
            // The new name is durable before anything in it is counted.
            FsFile::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(&format!("cannot sync {}", self.dir.display()), e))?;
            let bytes = file.metadata().map_or(0, |m| m.len());
            self.current = Some(Current {
                file,
                bytes,
                opened: Instant::now(),
            });
        }
        self.current
            .as_mut()
            .ok_or_else(|| Failure::Unavailable("no file".into()))
    }
}

impl Target for File {
    fn primary_key(&self) -> &[String] {
        // Lines are appended: no compaction.
        &[]
    }

    fn open(&mut self) -> Result<Vec<String>, Failure> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io(&format!("cannot create {}", self.dir.display()), e))?;
        self.current = None;
        Ok(self
            .columns
            .query
            .as_ref()
            .map(|q| q.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default())
    }

    fn begin(&mut self) -> Result<(), Failure> {
        self.pending.clear();
        Ok(())
    }

    fn positions(
        &mut self,
        _id: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Position>, Failure> {
        Ok(self.remembered.positions(partitions))
    }

    fn insert(&mut self, rows: &[Out<'_>]) -> Result<(), Failure> {
        for out in rows {
            serde_json::to_writer(&mut self.pending, &out.row)
                .map_err(|e| Failure::Rejected(e.to_string()))?;
            self.pending.push(b'\n');
        }
        Ok(())
    }

    fn savepoint(&mut self) -> Result<(), Failure> {
        self.savepoint = self.pending.len();
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), Failure> {
        self.pending.truncate(self.savepoint);
        Ok(())
    }

    fn store(&mut self, _id: &str, positions: &[(i32, &Position)]) -> Result<(), Failure> {
        self.remembered.stage(positions);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Failure> {
        let pending = std::mem::take(&mut self.pending);
        let current = self.current()?;
        let written = current
            .file
            .write_all(&pending)
            .and_then(|()| current.file.sync_data());
        if let Err(e) = written {
            // What was written is unknown: the next batch goes to a new file.
            self.current = None;
            return Err(io("cannot write the sink's file", e));
        }
        current.bytes += pending.len() as u64;
        self.remembered.committed();
        Ok(())
    }

    fn rollback(&mut self) {
        self.pending.clear();
        self.remembered.discard();
    }
}
