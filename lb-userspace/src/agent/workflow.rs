//! The reviewed-change workflow: plan → approve → apply, rollback, and the
//! history. The agent enforces every rule (the CLI only carries requests):
//! a plan is tied to the live generation it was made against; approvals
//! are recorded here, never taken from the plan file; the author cannot
//! approve their own plan; an edited plan file is refused; `apply` makes
//! live exactly the reviewed config text.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use super::{Agent, AgentError, Gate, Origin, Refusal, history, state};
use crate::{
    config::{self, HostChecks},
    control::{ApproveReport, ChangeReport, PlanDoc},
};

/// Version of the plan file format.
pub const PLAN_VERSION: u32 = 1;

fn plans_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("plans")
}

fn plan_file(state_dir: &Path, digest: &str) -> PathBuf {
    plans_dir(state_dir).join(format!("{digest}.json"))
}

fn approvals_file(state_dir: &Path, digest: &str) -> PathBuf {
    plans_dir(state_dir).join(format!("{digest}.approvals.json"))
}

fn io(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> AgentError {
    AgentError::io(what, e)
}

/// Plan digests are hex; anything else never names a file.
fn valid_digest(d: &str) -> bool {
    d.len() == 16 && d.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Agent {
    /// `lbctl plan`: validates the candidate, plans it against the live
    /// maps, evaluates the policy, and records the plan (nothing applied).
    pub fn plan_change(
        &mut self,
        source: String,
        file: &str,
        author: &str,
    ) -> Result<PlanDoc, AgentError> {
        let cfg = config::check(&source, file, HostChecks::Yes)?;
        let prepared = self.prepare(&cfg, self.generation + 1)?;
        let mut doc = PlanDoc {
            version: PLAN_VERSION,
            digest: String::new(),
            author: author.to_owned(),
            created_unix: history::now_unix(),
            file: file.to_owned(),
            base_generation: self.generation,
            base_config_digest: format!("{:016x}", state::digest(&self.source)),
            source,
            diff: super::diff_lines(&prepared.verdict),
            verdict: prepared.verdict,
            min_approvals: self.config.policy.min_approvals,
        };
        doc.digest = doc.compute_digest();
        let dir = &self.config.agent.state_dir;
        let text = serde_json::to_string_pretty(&doc).map_err(|e| io("encoding the plan", e))?;
        state::write_atomic(&plan_file(dir, &doc.digest), text.as_bytes())
            .map_err(|e| io("recording the plan", e))?;
        self.event(&format!(
            "plan {} by {author}: {} ({} policy violations)",
            doc.digest,
            if doc.verdict.passed() {
                "passes"
            } else {
                "FAILS"
            },
            doc.verdict.violations.len()
        ));
        Ok(doc)
    }

    /// The plan as this agent issued it, after checking that `doc` is that
    /// plan, unedited.
    fn issued(&self, doc: &PlanDoc) -> Result<PlanDoc, AgentError> {
        if !valid_digest(&doc.digest) {
            return Err(AgentError::refused(
                Refusal::PlanRejected,
                format!(
                    "plan digest {:?} is malformed; make a new plan with `lbctl plan`",
                    doc.digest
                ),
            ));
        }
        if doc.compute_digest() != doc.digest {
            return Err(AgentError::refused(
                Refusal::PlanRejected,
                format!(
                    "plan {} was edited after it was made (its content no longer matches its digest); make and review a new plan",
                    doc.digest
                ),
            ));
        }
        let dir = &self.config.agent.state_dir;
        let text = std::fs::read_to_string(plan_file(dir, &doc.digest)).map_err(|_| {
            AgentError::refused(
                Refusal::PlanRejected,
                format!(
                "plan {} was not made by this agent (or its state directory was lost); make a new plan with `lbctl plan`",
                doc.digest
            ))
        })?;
        let issued: PlanDoc =
            serde_json::from_str(&text).map_err(|e| io("reading the recorded plan", e))?;
        if issued.source != doc.source || issued.compute_digest() != doc.digest {
            return Err(AgentError::refused(
                Refusal::PlanRejected,
                format!(
                    "plan {} differs from the plan this agent recorded; make and review a new plan",
                    doc.digest
                ),
            ));
        }
        Ok(issued)
    }

    /// Approvals recorded for a plan.
    pub fn approvals(&self, digest: &str) -> Vec<history::Approval> {
        std::fs::read_to_string(approvals_file(&self.config.agent.state_dir, digest))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    /// `lbctl approve`: records a review. The author cannot approve their
    /// own plan; a reviewer counts once.
    pub fn approve(
        &mut self,
        doc: &PlanDoc,
        reviewer: &str,
        comment: &str,
    ) -> Result<ApproveReport, AgentError> {
        let issued = self.issued(doc)?;
        let reviewer = reviewer.trim();
        if reviewer.is_empty() {
            return Err(AgentError::refused(
                Refusal::Review,
                "--reviewer must name someone",
            ));
        }
        if reviewer.eq_ignore_ascii_case(issued.author.trim()) {
            return Err(AgentError::refused(
                Refusal::Review,
                format!(
                    "{reviewer} wrote plan {}; the author cannot approve their own plan",
                    doc.digest
                ),
            ));
        }
        let mut approvals = self.approvals(&doc.digest);
        if !approvals.iter().any(|a| a.reviewer == reviewer) {
            approvals.push(history::Approval {
                reviewer: reviewer.to_owned(),
                comment: comment.to_owned(),
                at_unix: history::now_unix(),
            });
            let text = serde_json::to_string_pretty(&approvals).map_err(|e| io("encoding", e))?;
            state::write_atomic(
                &approvals_file(&self.config.agent.state_dir, &doc.digest),
                text.as_bytes(),
            )
            .map_err(|e| io("recording the approval", e))?;
            self.event(&format!("plan {} approved by {reviewer}", doc.digest));
        }
        Ok(ApproveReport {
            digest: doc.digest.clone(),
            approvals,
            needed: self.config.policy.min_approvals,
        })
    }

    /// `lbctl apply`: makes the reviewed config live, after checking the
    /// plan is unedited, not stale, approved and within policy. `force`
    /// (with a reason, recorded) overrides a stale base, missing approvals
    /// and policy failures — never an edited plan.
    pub fn apply_plan(
        &mut self,
        doc: &PlanDoc,
        actor: &str,
        force: Option<String>,
    ) -> Result<ChangeReport, AgentError> {
        let started = Instant::now();
        let issued = self.issued(doc)?;
        let mut refusals = Vec::new();
        let mut reason = Refusal::Unapproved;
        let live_digest = format!("{:016x}", state::digest(&self.source));
        if issued.base_generation != self.generation || issued.base_config_digest != live_digest {
            // A stale plan needs a new plan whatever its approvals.
            reason = Refusal::StalePlan;
            refusals.push(format!(
                "plan {} is stale: it was made against generation {}, the live config is generation {}; make a new plan",
                doc.digest, issued.base_generation, self.generation
            ));
        }
        let approvals = self.approvals(&doc.digest);
        let needed = self.config.policy.min_approvals;
        if (approvals.len() as u32) < needed {
            refusals.push(format!(
                "plan {} has {} of the {needed} approvals the policy needs (`lbctl approve PLAN --reviewer NAME`)",
                doc.digest,
                approvals.len()
            ));
        }
        let forced = force.is_some();
        if !refusals.is_empty() {
            match &force {
                Some(reason) => self.event(&format!(
                    "apply of plan {} forced ({reason}): {}",
                    doc.digest,
                    refusals.join("; ")
                )),
                None => return Err(AgentError::refused(reason, refusals.join("\n"))),
            }
        }
        let file = self.config_path().display().to_string();
        let cfg = config::check(&issued.source, &file, HostChecks::Yes)?;
        let mut origin = Origin::new(
            "apply",
            actor,
            force.as_deref().map_or_else(
                || format!("plan {}", doc.digest),
                |r| format!("plan {} forced: {r}", doc.digest),
            ),
        )
        .at(started);
        origin.plan_digest = Some(doc.digest.clone());
        origin.approvals = approvals;
        if forced {
            origin.overridden = refusals;
        }
        self.change_file(cfg, issued.source, &origin, &Gate::Policy { force })
    }

    /// `lbctl rollback`: restores generation `to` (default: the newest kept
    /// generation before the live one) as a new generation.
    pub fn rollback(
        &mut self,
        to: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> Result<ChangeReport, AgentError> {
        let started = Instant::now();
        let dir = self.config.agent.state_dir.clone();
        let target = match to {
            Some(g) => g,
            None => (1..self.generation)
                .rev()
                .find(|g| history::load_generation(&dir, *g).is_some())
                .ok_or_else(|| {
                    AgentError::refused(
                        Refusal::Rollback,
                        format!(
                            "no earlier generation than {} is kept in {}",
                            self.generation,
                            dir.display()
                        ),
                    )
                })?,
        };
        if target == self.generation {
            return Err(AgentError::refused(
                Refusal::Rollback,
                format!("generation {target} is already live"),
            ));
        }
        let source = history::load_generation(&dir, target).ok_or_else(|| {
            AgentError::refused(
                Refusal::Rollback,
                format!("generation {target} is not kept in {}", dir.display()),
            )
        })?;
        let file = self.config_path().display().to_string();
        let cfg = config::check(&source, &file, HostChecks::Yes)?;
        let mut origin = Origin::new("rollback", actor, reason).at(started);
        origin.restored = Some(target);
        self.change_file(cfg, source, &origin, &Gate::Rollback)
    }

    /// Applies `cfg`/`source` as the next generation, then writes it to
    /// the config file (undone if the file cannot be written).
    pub(super) fn change_file(
        &mut self,
        cfg: config::Config,
        source: impl Into<super::Source>,
        origin: &Origin,
        gate: &Gate,
    ) -> Result<ChangeReport, AgentError> {
        let old = (self.config.clone(), self.source.clone(), self.generation);
        let report = self.apply(cfg, source, self.generation + 1, origin, gate)?;
        // The text that became live (for a CLI edit, made after the maps).
        let text = self.source.clone();
        if let Err(e) = state::write_atomic(self.config_path(), text.as_bytes()) {
            let undo = self.apply(
                old.0,
                old.1,
                old.2 + 2,
                &Origin::new("undo", "lbd", "config file not writable"),
                &Gate::Rollback,
            );
            return Err(AgentError::io(
                format!(
                    "writing {} failed; the change was undone{}",
                    self.config_path().display(),
                    undo.err()
                        .map(|u| format!(" — but undoing failed: {u}"))
                        .unwrap_or_default()
                ),
                e,
            ));
        }
        Ok(report)
    }

    /// The history, oldest first.
    pub fn history(&self) -> Result<Vec<history::Record>, AgentError> {
        history::read(&self.config.agent.state_dir).map_err(|e| io("reading the history", e))
    }
}
