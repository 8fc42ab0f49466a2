//! The records fine-tuning and evaluation write, typed: each line of a
//! fine-tuning run's metrics.jsonl ([`StepLine`]) and evaluate.json
//! ([`Evaluation`]). Experiment scripts read these files, so their keys are
//! a contract; the tests read them back through these types.
//!
//! Numbers that MONAI reports as NaN (Dice of a class absent from the
//! ground truth; HD95 of a class absent from the prediction or the truth)
//! are written as JSON `null`, and infinities as the strings "inf" /
//! "-inf" ([`Num`]).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A metric value that may be NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_nan() {
            s.serialize_none()
        } else if v.is_infinite() {
            s.serialize_str(if v > 0.0 { "inf" } else { "-inf" })
        } else {
            s.serialize_f64(v)
        }
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Num, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
            Null(()),
        }
        Ok(Num(match Option::<Raw>::deserialize(d)? {
            None | Some(Raw::Null(())) => f64::NAN,
            Some(Raw::Number(v)) => v,
            Some(Raw::Text(t)) => match t.as_str() {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                other => return Err(serde::de::Error::custom(format!("{other:?} is not a number"))),
            },
        }))
    }
}

pub fn nums(v: &[f64]) -> Vec<Num> {
    v.iter().map(|&x| Num(x)).collect()
}

/// One line of a fine-tuning run's metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepLine {
    pub step: u64,
    /// Segmentation: the Dice and cross-entropy parts of the loss.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dice_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ce_loss: Option<f64>,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// evaluate.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The fine-tuning run and the cache evaluated.
    pub run: PathBuf,
    pub cache: PathBuf,
    #[serde(flatten)]
    pub scores: Scores,
    /// Cases that could not be read, with why.
    pub failed_cases: Vec<FailedCase>,
}

impl Evaluation {
    pub fn read(path: &Path) -> Result<Evaluation> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not an evaluation record", path.display()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedCase {
    pub case: String,
    pub error: String,
}

/// What was scored, by task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Scores {
    Segmentation(Segmentation),
    Classification(Classification),
}

impl Scores {
    /// The summary scores as TensorBoard scalars (`val/...`); NaN scores
    /// (a class absent everywhere) are left out.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut v = Vec::new();
        match self {
            Scores::Segmentation(s) => {
                v.push(("val/mean_dice".to_string(), s.mean.dice.0));
                v.push(("val/mean_hd95".to_string(), s.mean.hd95.0));
                for (c, d) in s.classes.iter().zip(&s.per_class.dice_mean) {
                    v.push((format!("val/dice_class{c}"), d.0));
                }
                for (c, h) in s.classes.iter().zip(&s.per_class.hd95_mean) {
                    v.push((format!("val/hd95_class{c}"), h.0));
                }
            }
            Scores::Classification(c) => {
                v.push(("val/accuracy".to_string(), c.accuracy.0));
                v.push(("val/auc".to_string(), c.auc.0));
            }
        }
        v.retain(|(_, x)| x.is_finite());
        v
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segmentation {
    /// The foreground labels scored (1..num_classes).
    pub classes: Vec<u8>,
    pub cases: Vec<SegmentationCase>,
    pub per_class: PerClass,
    /// Mean and std over cases of each case's mean over classes.
    pub mean: DiceHd,
    pub std: DiceHd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationCase {
    pub id: String,
    /// Per class, in the order of `classes`.
    pub dice: Vec<Num>,
    pub hd95: Vec<Num>,
    pub mean_dice: Num,
    pub mean_hd95: Num,
}

/// Per class: mean, std and the count of finite values over cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerClass {
    pub dice_mean: Vec<Num>,
    pub dice_std: Vec<Num>,
    pub dice_n: Vec<usize>,
    pub hd95_mean: Vec<Num>,
    pub hd95_std: Vec<Num>,
    pub hd95_n: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiceHd {
    pub dice: Num,
    /// Millimetres.
    pub hd95: Num,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classification {
    pub cases: Vec<ClassificationCase>,
    pub accuracy: Num,
    pub auc_per_class: Vec<Num>,
    /// Macro-averaged one-vs-rest ROC AUC.
    pub auc: Num,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationCase {
    pub id: String,
    pub class: usize,
    pub predicted: usize,
    pub probs: Vec<Num>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_nan_and_infinities_as_monai_reports_them() {
        let v = nums(&[0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(text, r#"[0.5,null,"inf","-inf"]"#);
        let back: Vec<Num> = serde_json::from_str(&text).unwrap();
        assert_eq!(back[0], Num(0.5));
        assert!(back[1].0.is_nan());
        assert_eq!((back[2].0, back[3].0), (f64::INFINITY, f64::NEG_INFINITY));
        assert!(serde_json::from_str::<Num>(r#""many""#).is_err());
    }

    #[test]
    fn an_evaluation_reads_back_with_its_task() {
        let e = Evaluation {
            run: "ft".into(),
            cache: "c".into(),
            scores: Scores::Classification(Classification {
                cases: vec![ClassificationCase {
                    id: "a".into(),
                    class: 1,
                    predicted: 0,
                    probs: nums(&[0.6, 0.4]),
                }],
                accuracy: Num(0.0),
                auc_per_class: nums(&[f64::NAN, f64::NAN]),
                auc: Num(f64::NAN),
            }),
            failed_cases: vec![FailedCase {
                case: "b".into(),
                error: "no label".into(),
            }],
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["task"], "classification");
        assert_eq!(v["accuracy"], 0.0);
        assert!(v["auc"].is_null());
        let back: Evaluation = serde_json::from_value(v).unwrap();
        assert_eq!(back.run, e.run);
        assert_eq!(back.failed_cases, e.failed_cases);
        let Scores::Classification(c) = back.scores else {
            panic!("a classification")
        };
        assert_eq!(c.cases[0].predicted, 0);
    }
}
