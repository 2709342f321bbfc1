//! What a build of a fleet revision ends as, the same for the embedded build and for a request
//! to `orchestrator serve`: a status and a result per variant, the `--json` document's shape.

use std::collections::BTreeMap;

use builder::api::Verification;
use serde::{Deserialize, Serialize};

use crate::flake::LockedInput;

/// How a variant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its outputs were in the cache already.
    Cached,
    /// Built and published by this run.
    Built,
    /// Evaluation, build or push failed.
    Failed,
    /// The run was interrupted before it ended.
    Interrupted,
}

impl Status {
    /// The word in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Built => "built",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }
}

/// One variant's result: the `--json` document's element.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// The variant's name.
    pub variant: String,
    /// The system.
    pub system: String,
    /// The attribute path evaluated.
    pub attr: String,
    /// The derivation, when evaluation succeeded.
    pub drv_path: Option<String>,
    /// The output paths.
    pub out_paths: Vec<String>,
    /// The fleet's machines that install this derivation (`nixosConfigurations` names), when
    /// the machines were asked.
    #[serde(default)]
    pub machines: Vec<String>,
    /// How it ended.
    pub status: Status,
    /// Seconds from the start of the run to its end.
    pub seconds: f64,
    /// What went wrong.
    pub error: Option<String>,
    /// The check on real hardware, when the variant has one and it was built in this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// A run's outcome.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The commit built.
    pub commit: String,
    /// The inputs its lock pins.
    pub inputs: BTreeMap<String, LockedInput>,
    /// Every variant × system, in the order asked.
    pub results: Vec<VariantResult>,
}
