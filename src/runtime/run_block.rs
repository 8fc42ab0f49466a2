//! The `run` blocks of the stage configs: operational settings (device,
//! threads, loader threads, checkpoint cadence, ...) that change how a
//! stage runs and not what it computes, so they stay out of the config
//! hash. Configs and records written before the blocks existed gave them
//! directly in the section; [`lift_run_keys`] moves them in.
use anyhow::Result;

/// Moves the operational settings that configs written before the `run`
/// blocks gave directly in a section (`keys` under the section,
/// `(sub, key)` under a subsection) into the section's `run` block, and
/// returns the keys it moved. A key given both ways is an error. Used on
/// experiment files and on records (run.json) of earlier runs.
pub fn lift_run_keys(
    section: &mut serde_json::Value,
    name: &str,
    keys: &[&str],
    nested: &[(&str, &str)],
) -> Result<Vec<String>> {
    let Some(map) = section.as_object_mut() else {
        return Ok(Vec::new());
    };
    let mut lifted = serde_json::Map::new();
    let mut moved = Vec::new();
    for key in keys {
        if let Some(v) = map.remove(*key) {
            lifted.insert(key.to_string(), v);
            moved.push(key.to_string());
        }
    }
    for (sub, key) in nested {
        if let Some(v) = map
            .get_mut(*sub)
            .and_then(|s| s.as_object_mut())
            .and_then(|s| s.remove(*key))
        {
            lifted.insert(key.to_string(), v);
            moved.push(format!("{sub}.{key}"));
        }
    }
    if lifted.is_empty() {
        return Ok(moved);
    }
    let run = map
        .entry("run")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let Some(run) = run.as_object_mut() else {
        anyhow::bail!("{name}.run must be a mapping of settings");
    };
    for (k, v) in lifted {
        anyhow::ensure!(
            !run.contains_key(&k),
            "{name}.{k} and {name}.run.{k} are both given: keep the one under `run`"
        );
        run.insert(k, v);
    }
    Ok(moved)
}
