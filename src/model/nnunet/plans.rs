//! nnU-Net v2 plans files (`nnUNetPlans.json`, `nnUNetResEncUNet{M,L,XL}Plans.json`):
//! one configuration, with `inherits_from` resolved as nnU-Net's
//! `PlansManager` resolves it (the parent's keys, overridden by the
//! child's). What med3d keeps of it: the `architecture` (verbatim), and
//! the input nnU-Net feeds that network (patch size, spacing, axis order,
//! normalisation and its intensity statistics).
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One configuration of a plans file, inheritance resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlansConfiguration {
    /// The plans file's `plans_name` (nnUNetv2_train's `-p`).
    pub plans_name: String,
    pub dataset_name: String,
    /// The configuration's name (nnUNetv2_train's second argument).
    pub configuration: String,
    /// `architecture` exactly as the plans give it.
    pub architecture: Value,
    /// nnU-Net's patch size, in its (transposed) axis order.
    pub patch_size: Vec<i64>,
    /// Target spacing in mm, same order.
    pub spacing: Vec<f64>,
    /// nnU-Net's axis order of the data relative to the image files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transpose_forward: Vec<i64>,
    /// One scheme per input channel (`CTNormalization`, `ZScoreNormalization`, ...).
    pub normalization_schemes: Vec<String>,
    /// `foreground_intensity_properties_per_channel` (CT normalisation's
    /// percentiles, mean and std), when the plans hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreground_intensity_properties_per_channel: Option<Value>,
}

/// Reads `configuration` of the plans file at `path`.
pub fn read(path: &Path, configuration: &str) -> Result<PlansConfiguration> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read plans file {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not a JSON plans file", path.display()))?;
    from_value(&v, configuration).with_context(|| format!("{}: configuration {configuration}", path.display()))
}

pub fn from_value(plans: &Value, configuration: &str) -> Result<PlansConfiguration> {
    let root = plans.as_object().context("a plans file is a JSON object")?;
    let configs = root
        .get("configurations")
        .and_then(Value::as_object)
        .context("configurations: missing or not an object")?;
    let c = resolve(configs, configuration, &mut Vec::new())?;
    let string = |o: &Map<String, Value>, k: &str| -> Result<String> {
        o.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("{k}: missing or not a string"))
    };
    let Some(architecture) = c.get("architecture").cloned() else {
        bail!(
            "configurations.{configuration}.architecture: missing (a plans file of nnU-Net v2 before 2.3 describes the network otherwise: rerun nnUNetv2_plan_experiment)"
        );
    };
    let ints = |k: &str| -> Result<Vec<i64>> {
        c.get(k)
            .and_then(Value::as_array)
            .with_context(|| format!("configurations.{configuration}.{k}: missing or not a list"))?
            .iter()
            .map(|x| {
                x.as_i64()
                    .with_context(|| format!("configurations.{configuration}.{k}: {x} is not an integer"))
            })
            .collect()
    };
    let patch_size = ints("patch_size")?;
    let spacing: Vec<f64> = c
        .get("spacing")
        .and_then(Value::as_array)
        .with_context(|| format!("configurations.{configuration}.spacing: missing or not a list"))?
        .iter()
        .map(|x| {
            x.as_f64()
                .filter(|s| s.is_finite() && *s > 0.0)
                .with_context(|| format!("configurations.{configuration}.spacing: {x} is not a positive number"))
        })
        .collect::<Result<_>>()?;
    ensure!(
        patch_size.len() == 3 && spacing.len() == 3,
        "configurations.{configuration}: patch_size {patch_size:?} and spacing {spacing:?} must have 3 entries (a 3D configuration)"
    );
    ensure!(
        patch_size.iter().all(|&p| (1..=4096).contains(&p)),
        "configurations.{configuration}.patch_size: {patch_size:?} out of range"
    );
    let normalization_schemes = c
        .get("normalization_schemes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    let transpose_forward = match root.get("transpose_forward") {
        None => Vec::new(),
        Some(v) => {
            let t: Vec<i64> = v
                .as_array()
                .context("transpose_forward: not a list")?
                .iter()
                .map(|x| x.as_i64().context("transpose_forward: not integers"))
                .collect::<Result<_>>()?;
            let mut sorted = t.clone();
            sorted.sort();
            ensure!(
                sorted == [0, 1, 2],
                "transpose_forward: {t:?} is not a permutation of 0, 1, 2"
            );
            t
        }
    };
    Ok(PlansConfiguration {
        plans_name: string(root, "plans_name")?,
        dataset_name: string(root, "dataset_name")?,
        configuration: configuration.to_string(),
        architecture,
        patch_size,
        spacing,
        transpose_forward,
        normalization_schemes,
        foreground_intensity_properties_per_channel: root.get("foreground_intensity_properties_per_channel").cloned(),
    })
}

/// `PlansManager._internal_resolve_configuration_inheritance`.
fn resolve(configs: &Map<String, Value>, name: &str, seen: &mut Vec<String>) -> Result<Map<String, Value>> {
    let Some(c) = configs.get(name) else {
        bail!(
            "no configuration {name} (the plans hold {})",
            configs.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    let c = c
        .as_object()
        .with_context(|| format!("configurations.{name}: not an object"))?;
    ensure!(
        !seen.iter().any(|s| s == name),
        "configurations: circular inherits_from ({} -> {name})",
        seen.join(" -> ")
    );
    seen.push(name.to_string());
    let Some(parent) = c.get("inherits_from") else {
        return Ok(c.clone());
    };
    let parent = parent
        .as_str()
        .with_context(|| format!("configurations.{name}.inherits_from: not a string"))?;
    let mut base = resolve(configs, parent, seen)?;
    for (k, v) in c {
        base.insert(k.clone(), v.clone());
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inheritance_overrides_the_parent() {
        let p = json!({
            "plans_name": "nnUNetResEncUNetMPlans", "dataset_name": "Dataset001_X",
            "transpose_forward": [0, 1, 2],
            "configurations": {
                "3d_fullres": {"patch_size": [64, 64, 64], "spacing": [1, 1, 1],
                               "normalization_schemes": ["CTNormalization"],
                               "architecture": {"network_class_name": "a"}},
                "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [2.0, 2.0, 2.0]},
                "loop_a": {"inherits_from": "loop_b"}, "loop_b": {"inherits_from": "loop_a"}
            }
        });
        let c = from_value(&p, "3d_lowres").unwrap();
        assert_eq!(c.spacing, vec![2.0, 2.0, 2.0]);
        assert_eq!(c.patch_size, vec![64, 64, 64]);
        assert_eq!(c.architecture["network_class_name"], "a");
        let e = format!("{:#}", from_value(&p, "loop_a").unwrap_err());
        assert!(e.contains("circular"), "{e}");
        let e = format!("{:#}", from_value(&p, "2d").unwrap_err());
        assert!(e.contains("no configuration 2d") && e.contains("3d_fullres"), "{e}");
    }
}
