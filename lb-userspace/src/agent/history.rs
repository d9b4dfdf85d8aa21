//! The audit trail: an append-only JSON-lines file of every config change
//! (who, when, why, what it did, approvals, overrides, guard outcome,
//! rollbacks), and the config text of every generation (for rollback).
//! Both live in `state_dir` and survive restarts. A record is never
//! rewritten: later facts about a change (the guard's verdict) are new
//! records that name its generation.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

pub use lb_control::control::Approval;
use serde::{Deserialize, Serialize};

/// One entry of the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the file (1-based).
    pub seq: u64,
    pub at_unix: u64,
    /// start, reload, backend, apply, rollback, guard, ...
    pub kind: String,
    /// Generation this record is about.
    pub generation: u64,
    /// Who asked (as the client declared it).
    pub actor: String,
    pub reason: String,
    /// What changed, for humans.
    pub summary: String,
    /// Per VIP: "name: share before → after" lines and moved fractions.
    #[serde(default)]
    pub diff: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// Policy violations overridden with --force.
    #[serde(default)]
    pub overridden: Vec<String>,
    /// For rollbacks: the generation whose config was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<u64>,
    #[serde(default)]
    pub config_digest: String,
}

impl Record {
    /// A record stamped now, with no diff, plan, approvals, overrides or
    /// restored generation (set those fields as needed).
    pub fn new(kind: &str, generation: u64, actor: &str, reason: &str, summary: &str) -> Self {
        Self {
            seq: 0,
            at_unix: now_unix(),
            kind: kind.into(),
            generation,
            actor: actor.into(),
            reason: reason.into(),
            summary: summary.into(),
            diff: Vec::new(),
            plan_digest: None,
            approvals: Vec::new(),
            overridden: Vec::new(),
            restored: None,
            config_digest: String::new(),
        }
    }
}

fn file(dir: &Path) -> PathBuf {
    dir.join("history.jsonl")
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends `rec` (its `seq` is set to the next number) and fsyncs.
pub fn append(dir: &Path, mut rec: Record) -> std::io::Result<Record> {
    fs::create_dir_all(dir)?;
    rec.seq = read(dir).map_or(0, |r| r.len() as u64) + 1;
    let mut line = serde_json::to_string(&rec).map_err(std::io::Error::other)?;
    line.push('\n');
    // After a crash mid-write the file may end in a torn line: start on a
    // fresh one so this record stays readable.
    if fs::read(file(dir)).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n')) {
        line.insert(0, '\n');
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file(dir))?;
    f.write_all(line.as_bytes())?;
    f.sync_all()?;
    Ok(rec)
}

/// Every record, oldest first. Lines that do not parse (a torn last line
/// after a crash) are skipped.
pub fn read(dir: &Path) -> std::io::Result<Vec<Record>> {
    let f = match fs::File::open(file(dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

fn generation_file(dir: &Path, generation: u64) -> PathBuf {
    dir.join("generations").join(format!("{generation}.toml"))
}

/// Keeps the config text of a generation (for rollback).
pub fn save_generation(dir: &Path, generation: u64, text: &str) -> std::io::Result<()> {
    super::state::write_atomic(&generation_file(dir, generation), text.as_bytes())
}

/// The config text of a generation, if kept.
pub fn load_generation(dir: &Path, generation: u64) -> Option<String> {
    fs::read_to_string(generation_file(dir, generation)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_appends_numbers_and_survives_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("lbd-history-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let rec = |kind: &str| Record::new(kind, 1, "alice", "test", "");
        assert_eq!(append(&dir, rec("start")).unwrap().seq, 1);
        assert_eq!(append(&dir, rec("reload")).unwrap().seq, 2);
        // A crash mid-write leaves a torn line: it is skipped.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(file(&dir))
            .unwrap();
        f.write_all(b"{\"seq\": 3, \"kin").unwrap();
        let all = read(&dir).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].kind, "reload");
        // The next record after the torn line is still readable.
        append(&dir, rec("rollback")).unwrap();
        let all = read(&dir).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].kind, "rollback");
        save_generation(&dir, 4, "x = 1\n").unwrap();
        assert_eq!(load_generation(&dir, 4).as_deref(), Some("x = 1\n"));
        assert_eq!(load_generation(&dir, 5), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
