//! What the agent persists between runs, in `state_dir`: the spec it last
//! applied and the id allocator that spec was planned from. Planning is a
//! pure function, so a restarted agent re-plans the same spec with the same
//! allocator, gets the exact maps the kernel holds, checks that they are
//! (`Datapath::verify`) and from then on writes only differences.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{model::DataplaneSpec, plan::IdAllocator};

/// Version of this file's layout.
pub const STATE_VERSION: u32 = 1;

/// The applied state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedState {
    pub version: u32,
    /// Pinned map layout the state belongs to.
    pub layout: u32,
    pub generation: u64,
    /// Digest of the config text the generation was made from.
    pub config_digest: u64,
    pub spec: DataplaneSpec,
    /// The allocator `spec` was planned from (not the one it produced).
    pub allocator_before: IdAllocator,
}

fn path(dir: &Path) -> PathBuf {
    dir.join("applied.json")
}

/// Reads the state; `Ok(None)` when there is none (first start).
pub fn load(dir: &Path) -> Result<Option<AppliedState>, String> {
    let p = path(dir);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", p.display())),
    };
    let state: AppliedState =
        serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", p.display()))?;
    if state.version != STATE_VERSION || state.layout != lb_common::LAYOUT_VERSION {
        return Err(format!(
            "{} is version {}/layout {}, this lbd writes {STATE_VERSION}/{}",
            p.display(),
            state.version,
            state.layout,
            lb_common::LAYOUT_VERSION
        ));
    }
    Ok(Some(state))
}

/// Writes the state atomically (temporary file, fsync, rename).
pub fn save(dir: &Path, state: &AppliedState) -> std::io::Result<()> {
    let text = serde_json::to_string(state).map_err(std::io::Error::other)?;
    write_atomic(&path(dir), text.as_bytes())
}

/// Replaces `path` with `bytes` so a crash leaves the old or the new file,
/// never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp-lbd");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// FNV-1a of a text (config digests).
pub use lb_control::digest::text_digest as digest;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_rejects_other_versions() {
        let dir = std::env::temp_dir().join(format!("lbd-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(load(&dir).unwrap(), None);
        // A real allocator (maps keyed by tuples) must survive JSON.
        let spec: DataplaneSpec = serde_json::from_str(
            r#"{"hash_seed":1,"ipip_source_v4":null,"ipip_source_v6":null,"generation":3,"vips":[{"address":"198.18.0.10","port":80,"protocol":"tcp","backends":[{"address":"198.18.1.1","weight":1,"mac":"02:00:00:00:00:01"}]}]}"#,
        )
        .unwrap();
        let alloc = crate::plan::plan(&spec, &IdAllocator::default())
            .unwrap()
            .allocator;
        assert_ne!(alloc, IdAllocator::default());
        let mut st = AppliedState {
            version: STATE_VERSION,
            layout: lb_common::LAYOUT_VERSION,
            generation: 7,
            config_digest: digest("x"),
            spec,
            allocator_before: alloc,
        };
        save(&dir, &st).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(st.clone()));
        st.layout += 1;
        save(&dir, &st).unwrap();
        assert!(load(&dir).unwrap_err().contains("layout"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
