//! Dataset manifests: which cases exist, where their image and label files
//! are, and their modality. Three formats: our YAML (data-manifests/), the
//! Medical Segmentation Decathlon `dataset.json`, and nnU-Net v2's
//! `dataset.json` (cases discovered under imagesTr/ and labelsTr/).
//! Relative paths resolve against the manifest's own folder.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::volume::Modality;

/// One case to preprocess.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Case {
    pub id: String,
    pub image: PathBuf,
    pub modality: Modality,
    pub label: Option<PathBuf>,
    /// Class label for classification tasks.
    pub class: Option<i64>,
    /// For a DICOM folder holding several series: the SeriesInstanceUID to read.
    pub series_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub path: PathBuf,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlManifest {
    #[serde(default)]
    name: Option<String>,
    /// Default modality for cases that do not give one.
    #[serde(default)]
    modality: Option<Modality>,
    cases: Vec<YamlCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlCase {
    id: String,
    image: PathBuf,
    #[serde(default)]
    modality: Option<Modality>,
    #[serde(default)]
    label: Option<PathBuf>,
    #[serde(default)]
    class: Option<i64>,
    #[serde(default)]
    series_uid: Option<String>,
}

/// Case ids become folder names in the cache: keep them portable.
fn check_id(id: &str, path: &Path) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!(
            "{}: case id {id:?} must be 1-128 characters of A-Z a-z 0-9 - _ . and not start with '.'",
            path.display()
        );
    }
    Ok(())
}

fn modality_from_name(name: &str) -> Modality {
    let n = name.to_ascii_uppercase();
    if n == "CT" || n.contains("CT") && !n.contains("MR") {
        Modality::CT
    } else {
        Modality::MR
    }
}

/// Strips extensions nnU-Net / MSD use, to turn a file name into a case id.
fn stem(name: &str) -> &str {
    for ext in [".nii.gz", ".nii", ".mha", ".nrrd"] {
        if let Some(s) = name.strip_suffix(ext) {
            return s;
        }
    }
    name
}

impl Manifest {
    /// Reads a manifest, detecting its format from the file name/content.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read manifest {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let is_json = path.extension().is_some_and(|e| e == "json");
        let m = if is_json {
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
            if v.get("channel_names").is_some() {
                Self::from_nnunet(&v, &base, path)?
            } else if v.get("training").is_some() {
                Self::from_msd(&v, &base, path)?
            } else {
                bail!(
                    "{}: a dataset.json needs `training` (MSD) or `channel_names` (nnU-Net v2)",
                    path.display()
                );
            }
        } else {
            let y: YamlManifest =
                serde_yaml::from_str(&text).with_context(|| format!("{}: invalid manifest", path.display()))?;
            let mut cases = Vec::with_capacity(y.cases.len());
            for (i, c) in y.cases.into_iter().enumerate() {
                let modality = c.modality.or(y.modality).with_context(|| {
                    format!(
                        "{}: case {} ({}) has no modality and the manifest sets no default",
                        path.display(),
                        i,
                        c.id
                    )
                })?;
                cases.push(Case {
                    id: c.id,
                    image: base.join(c.image),
                    modality,
                    label: c.label.map(|l| base.join(l)),
                    class: c.class,
                    series_uid: c.series_uid,
                });
            }
            Manifest {
                name: y.name.unwrap_or_else(|| {
                    path.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                }),
                path: path.to_path_buf(),
                cases,
            }
        };
        let mut seen = std::collections::BTreeSet::new();
        for c in &m.cases {
            check_id(&c.id, path)?;
            if !seen.insert(c.id.as_str()) {
                bail!("{}: case id {:?} appears more than once", path.display(), c.id);
            }
        }
        Ok(m)
    }

    fn from_msd(v: &serde_json::Value, base: &Path, path: &Path) -> Result<Manifest> {
        #[derive(Deserialize)]
        struct Entry {
            image: PathBuf,
            #[serde(default)]
            label: Option<PathBuf>,
        }
        let modality: BTreeMap<String, String> = match v.get("modality") {
            Some(m) => serde_json::from_value(m.clone())
                .with_context(|| format!("{}: `modality` must map channel to name", path.display()))?,
            None => BTreeMap::new(),
        };
        let modality = modality_from_name(modality.get("0").map(String::as_str).unwrap_or("MR"));
        let entries: Vec<Entry> = serde_json::from_value(v["training"].clone())
            .with_context(|| format!("{}: `training` must be a list of {{image, label}}", path.display()))?;
        let cases = entries
            .into_iter()
            .map(|e| {
                let name = e
                    .image
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Case {
                    id: stem(&name).to_string(),
                    image: base.join(&e.image),
                    modality,
                    label: e.label.map(|l| base.join(l)),
                    class: None,
                    series_uid: None,
                }
            })
            .collect();
        Ok(Manifest {
            name: v.get("name").and_then(|n| n.as_str()).unwrap_or("msd").to_string(),
            path: path.to_path_buf(),
            cases,
        })
    }

    fn from_nnunet(v: &serde_json::Value, base: &Path, path: &Path) -> Result<Manifest> {
        let channels: BTreeMap<String, String> = serde_json::from_value(v["channel_names"].clone())
            .with_context(|| format!("{}: `channel_names` must map channel index to name", path.display()))?;
        let modality = modality_from_name(channels.get("0").map(String::as_str).unwrap_or("MR"));
        let ending = v
            .get("file_ending")
            .and_then(|e| e.as_str())
            .unwrap_or(".nii.gz")
            .to_string();
        let images = base.join("imagesTr");
        let labels = base.join("labelsTr");
        let mut cases = Vec::new();
        let rd = std::fs::read_dir(&images)
            .with_context(|| format!("{}: cannot list {}", path.display(), images.display()))?;
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let suffix = format!("_0000{ending}");
        for n in names {
            if let Some(id) = n.strip_suffix(&suffix) {
                let label = labels.join(format!("{id}{ending}"));
                cases.push(Case {
                    id: id.to_string(),
                    image: images.join(&n),
                    modality,
                    label: label.exists().then_some(label),
                    class: None,
                    series_uid: None,
                });
            }
        }
        if let Some(n) = v.get("numTraining").and_then(|n| n.as_u64()) {
            if n as usize != cases.len() {
                tracing::warn!(manifest = %path.display(), expected = n, found = cases.len(), "numTraining disagrees with imagesTr");
            }
        }
        Ok(Manifest {
            name: v.get("name").and_then(|n| n.as_str()).unwrap_or("nnunet").to_string(),
            path: path.to_path_buf(),
            cases,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_typo_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(
            &p,
            "cases:\n  - id: a\n    image: a.nii\n    modality: CT\n    lable: b.nii\n",
        )
        .unwrap();
        let e = format!("{:#}", Manifest::load(&p).unwrap_err());
        assert!(e.contains("lable") && e.contains("m.yaml"), "{e}");
    }

    #[test]
    fn yaml_case_may_pick_a_dicom_series() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(&p, "cases:\n  - id: ct\n    image: dicom/ct\n    modality: CT\n    series_uid: 1.2.3.4\n  - id: mr\n    image: b.nii\n    modality: MR\n").unwrap();
        let m = Manifest::load(&p).unwrap();
        assert_eq!(m.cases[0].series_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(m.cases[0].image, dir.path().join("dicom/ct"));
        assert_eq!(m.cases[1].series_uid, None);
    }

    #[test]
    fn msd_and_nnunet_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dataset.json");
        std::fs::write(
            &p,
            r#"{"name":"Task09","modality":{"0":"CT"},"training":[{"image":"./imagesTr/spleen_2.nii.gz","label":"./labelsTr/spleen_2.nii.gz"}]}"#,
        )
        .unwrap();
        let m = Manifest::load(&p).unwrap();
        assert_eq!(m.cases[0].id, "spleen_2");
        assert_eq!(m.cases[0].modality, Modality::CT);
        assert_eq!(
            m.cases[0].label.as_deref(),
            Some(dir.path().join("./labelsTr/spleen_2.nii.gz").as_path())
        );

        std::fs::create_dir_all(dir.path().join("imagesTr")).unwrap();
        std::fs::create_dir_all(dir.path().join("labelsTr")).unwrap();
        std::fs::write(dir.path().join("imagesTr/brain_001_0000.nii.gz"), b"").unwrap();
        std::fs::write(dir.path().join("labelsTr/brain_001.nii.gz"), b"").unwrap();
        std::fs::write(
            &p,
            r#"{"channel_names":{"0":"T1"},"labels":{"background":0},"numTraining":1,"file_ending":".nii.gz"}"#,
        )
        .unwrap();
        let m = Manifest::load(&p).unwrap();
        assert_eq!(m.cases.len(), 1);
        assert_eq!(m.cases[0].id, "brain_001");
        assert_eq!(m.cases[0].modality, Modality::MR);
        assert!(m.cases[0].label.is_some());
    }
}
