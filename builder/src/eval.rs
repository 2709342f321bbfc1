//! Evaluating a variant with the real `nix`: its derivation and output paths, exactly as the
//! fleet's machines will see them (the fleet flake at the commit, with its own lock).

use std::collections::BTreeMap;

use nix_formats::StorePath;
use serde::Deserialize;
use thiserror::Error;

/// Why a variant could not be evaluated.
#[derive(Debug, Error)]
pub enum EvalError {
    /// `nix` could not be run.
    #[error("running nix: {0}")]
    Spawn(#[source] std::io::Error),
    /// Nix refused; its message, without the location inside our own expression.
    #[error("{0}")]
    Nix(String),
    /// Nix printed something we did not expect.
    #[error("unexpected output of nix eval: {0}")]
    Output(String),
}

/// What evaluation gives for one variant on one system.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The derivation.
    pub drv_path: StorePath,
    /// The derivation's system (`x86_64-linux`).
    pub system: String,
    /// Output name -> path, in name order.
    pub outputs: BTreeMap<String, StorePath>,
}

impl Evaluation {
    /// The output checks and verifications look at: `out`, else the first by name.
    pub fn main_output(&self) -> Option<&StorePath> {
        self.outputs.get("out").or_else(|| self.outputs.values().next())
    }
}

/// The expression: the flake and attribute path come in through the environment, so nothing the
/// user writes is ever spliced into Nix code. `toJSON` forces everything before printing.
const EXPR: &str = r#"
let
  flake = builtins.getFlake (builtins.getEnv "FLEETCACHE_EVAL_FLAKE");
  path = builtins.fromJSON (builtins.getEnv "FLEETCACHE_EVAL_ATTR");
  drv = builtins.foldl' (acc: name: acc.${name}) flake path;
  outputs = drv.outputs or [ "out" ];
in
builtins.toJSON {
  drvPath = drv.drvPath;
  system = drv.system;
  outputs = builtins.listToAttrs (map (o: { name = o; value = drv.${o}.outPath; }) outputs);
}
"#;

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "drvPath")]
    drv_path: String,
    system: String,
    outputs: BTreeMap<String, String>,
}

/// The names of the flake's `nixosConfigurations` (none if it has no such output).
const MACHINES_EXPR: &str = r#"
let flake = builtins.getFlake (builtins.getEnv "FLEETCACHE_EVAL_FLAKE");
in builtins.toJSON (builtins.attrNames (flake.nixosConfigurations or { }))
"#;

/// What one machine installs through `services.fleetcache.client`: null when it does not
/// enable the client (or does not import the module).
const MACHINE_EXPR: &str = r#"
let
  flake = builtins.getFlake (builtins.getEnv "FLEETCACHE_EVAL_FLAKE");
  name = builtins.getEnv "FLEETCACHE_EVAL_MACHINE";
  client = flake.nixosConfigurations.${name}.config.services.fleetcache.client or { enable = false; };
  drv = client.package;
  outputs = drv.outputs or [ "out" ];
in
builtins.toJSON (
  if !(client.enable or false) then null
  else {
    variant = client.variant or "custom";
    features = client.builderFeatures or [ ];
    drvPath = drv.drvPath;
    system = drv.system;
    outputs = builtins.listToAttrs (map (o: { name = o; value = drv.${o}.outPath; }) outputs);
  }
)
"#;

/// What a fleet machine that enables `services.fleetcache.client` installs.
#[derive(Debug, Clone, PartialEq)]
pub struct MachinePackage {
    /// The client's `variant` (`cpu`, `cuda`, …).
    pub variant: String,
    /// The builder features its `builderFeatures` asks for.
    pub features: Vec<String>,
    /// Its `package`, evaluated.
    pub eval: Evaluation,
}

#[derive(Deserialize)]
struct RawMachine {
    variant: String,
    features: Vec<String>,
    #[serde(flatten)]
    package: Raw,
}

/// Runs `expr` (which reads its inputs from `env`) with `nix eval --raw --impure`.
async fn eval_raw(expr: &str, env: &[(&str, &str)]) -> Result<String, EvalError> {
    let out = crate::nix::async_command("nix")
        .args(["eval", "--raw", "--impure", "--expr", expr])
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(EvalError::Spawn)?;
    if !out.status.success() {
        return Err(EvalError::Nix(clean_message(&String::from_utf8_lossy(&out.stderr))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, EvalError> {
    serde_json::from_str(text).map_err(|e| EvalError::Output(format!("{e}: {text}")))
}

impl Raw {
    fn evaluation(self) -> Result<Evaluation, EvalError> {
        let path = |p: &str| StorePath::from_absolute(p).map_err(|e| EvalError::Output(format!("{p}: {e}")));
        let outputs =
            self.outputs.iter().map(|(name, p)| Ok((name.clone(), path(p)?))).collect::<Result<_, _>>()?;
        Ok(Evaluation { drv_path: path(&self.drv_path)?, system: self.system, outputs })
    }
}

/// Evaluates `attr_path` in the flake at `flake_url` (which pins a commit).
pub async fn evaluate(flake_url: &str, attr_path: &[String]) -> Result<Evaluation, EvalError> {
    let attr = serde_json::to_string(attr_path).expect("strings serialise");
    let text =
        eval_raw(EXPR, &[("FLEETCACHE_EVAL_FLAKE", flake_url), ("FLEETCACHE_EVAL_ATTR", &attr)]).await?;
    parse::<Raw>(&text)?.evaluation()
}

/// The names of the machines (`nixosConfigurations`) of the flake at `flake_url`.
pub async fn machines(flake_url: &str) -> Result<Vec<String>, EvalError> {
    parse(&eval_raw(MACHINES_EXPR, &[("FLEETCACHE_EVAL_FLAKE", flake_url)]).await?)
}

/// What machine `name` of the flake at `flake_url` installs through the client module, or
/// `None` if it does not enable it.
pub async fn machine_package(flake_url: &str, name: &str) -> Result<Option<MachinePackage>, EvalError> {
    let env = [("FLEETCACHE_EVAL_FLAKE", flake_url), ("FLEETCACHE_EVAL_MACHINE", name)];
    let Some(raw) = parse::<Option<RawMachine>>(&eval_raw(MACHINE_EXPR, &env).await?)? else {
        return Ok(None);
    };
    Ok(Some(MachinePackage { variant: raw.variant, features: raw.features, eval: raw.package.evaluation()? }))
}

/// The attribute path under which machine `name` installs its client package, as a builder
/// evaluates it again.
pub fn machine_package_attr(name: &str) -> Vec<String> {
    ["nixosConfigurations", name, "config", "services", "fleetcache", "client", "package"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// Nix's message without the excerpt of our own expression (which would only confuse: the
/// user wrote the attribute path, not that code) and without the `--show-trace` hint.
fn clean_message(stderr: &str) -> String {
    let mut kept = Vec::new();
    let mut skipping = false;
    for line in stderr.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("at «string»") {
            skipping = true;
            continue;
        }
        if skipping {
            // The excerpt is indented and numbered ("  3| …", "   |   ^"); it ends at a blank line.
            if trimmed.is_empty() || trimmed.contains('|') {
                continue;
            }
            skipping = false;
        }
        if trimmed.starts_with("(use '--show-trace'") {
            continue;
        }
        kept.push(line);
    }
    let text = kept.join("\n");
    let text = text.trim();
    text.strip_prefix("error: ").unwrap_or(text).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_expression_is_cut_from_nix_messages() {
        let stderr = "error: attribute 'rocm' missing\n\n       at «string»:5:27:\n\n            4|   path = x;\n            5|   drv = y;\n             |                           ^\n            6| in\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(clean_message(stderr), "attribute 'rocm' missing");
        let theirs = "error: builder failed\n\n       at /nix/store/x-source/flake.nix:3:5:\n\n            2|\n            3|   a = throw \"no\";\n";
        assert!(clean_message(theirs).contains("flake.nix:3:5"), "locations in the user's code stay");
    }
}
