//! `med3d evaluate`: runs a fine-tuned model over a cache and reports, per
//! case and as mean / std over cases, per-class Dice and HD95 (mm, from
//! the cache's spacing) for segmentation, or accuracy and ROC AUC for
//! classification, as one JSON file. Segmentation predicts each whole
//! volume by sliding-window inference.
//!
//! Which cases: the run's held-out cases when the cache is the one it was
//! trained on and it held some out, else every case of the cache labelled
//! for the task (a label map, or a class).
//! The report's shape is `results::Evaluation`. Values MONAI reports as
//! NaN are written as JSON `null`; means and stds are over the finite
//! values, with their count.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::Kind;

use super::config::{DownstreamConfig, Task};
use super::finetune::read_summary;
use super::results::{self, nums, Evaluation, FailedCase, Num, Scores};
use super::{data, metrics, model, sliding};

pub struct Options {
    pub run: PathBuf,
    pub cache: PathBuf,
    /// Overrides the run's sliding-window settings.
    pub sliding_window: Option<sliding::SlidingWindow>,
    pub out: PathBuf,
}

pub struct Report {
    pub evaluation: Evaluation,
    /// One line for the terminal.
    pub line: String,
    /// Cases that could not be evaluated (listed in the JSON).
    pub failed_cases: usize,
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

pub fn run(opts: &Options) -> Result<Report> {
    let summary = read_summary(&opts.run)?;
    let mut cfg: DownstreamConfig = summary.config.clone();
    if let Some(sw) = &opts.sliding_window {
        cfg.sliding_window = sw.clone();
    }
    cfg.sliding_window.validate()?;
    let device = super::finetune::setup(&cfg)?;
    let vs = VarStore::new(device);
    let net = model::Net::new(&vs, &cfg)?;
    let weights = crate::artifacts::run::model_file(&opts.run);
    crate::model::state_dict::load_safetensors(&vs, &weights)?;

    let ids = if same_dir(&opts.cache, &summary.cache) && !summary.val_cases.is_empty() {
        summary.val_cases.clone()
    } else {
        data::labelled_ids(&opts.cache, cfg.task)?.0
    };
    let mut failed = Vec::new();
    let mut cases = Vec::new();
    for id in &ids {
        match data::read_case(&opts.cache, id, cfg.task, cfg.num_classes) {
            Ok(c) => cases.push(c),
            Err(e) => failed.push(FailedCase {
                case: id.clone(),
                error: format!("{e:#}"),
            }),
        }
    }
    anyhow::ensure!(
        !cases.is_empty(),
        "no case of {} could be evaluated: {}",
        opts.cache.display(),
        failed
            .first()
            .map(|f| format!("{}: {}", f.case, f.error))
            .unwrap_or_else(|| "the cache has no cases".into())
    );
    let (scores, line) = match cfg.task {
        Task::Segmentation => segmentation(&net, &cfg, &cases, device)?,
        Task::Classification => classification(&net, &cfg, &cases, device)?,
    };
    let n_failed = failed.len();
    let evaluation = Evaluation {
        run: opts.run.clone(),
        cache: opts.cache.clone(),
        scores,
        failed_cases: failed,
    };
    crate::fsutil::atomic_write(&opts.out, &serde_json::to_vec_pretty(&evaluation)?)?;
    // The scores beside the run's training curves, at its last step.
    let mut events = crate::artifacts::events::EventWriter::create(&crate::artifacts::run::tensorboard_dir(&opts.run))?;
    events.scalars(summary.steps.max(1), &evaluation.scores.scalars())?;
    let line = format!(
        "{line}{} -> {}",
        if n_failed == 0 {
            String::new()
        } else {
            format!(", {n_failed} cases failed")
        },
        opts.out.display()
    );
    Ok(Report {
        evaluation,
        line,
        failed_cases: n_failed,
    })
}

/// Arg-max label map of one case by sliding-window inference.
pub fn predict_labels(
    net: &model::Net,
    cfg: &DownstreamConfig,
    case: &data::LabelledCase,
    device: tch::Device,
) -> Result<Vec<u8>> {
    let x = case.image_tensor().to_device(device);
    let logits = tch::no_grad(|| sliding::infer(&x, &cfg.sliding_window, cfg.roi(), |w| net.forward_t(w, false)))?;
    let labels = logits
        .argmax(1, false)
        .to_kind(Kind::Uint8)
        .to_device(tch::Device::Cpu)
        .flatten(0, -1);
    Vec::<u8>::try_from(&labels).context("cannot read the predicted label map")
}

fn segmentation(
    net: &model::Net,
    cfg: &DownstreamConfig,
    cases: &[data::LabelledCase],
    device: tch::Device,
) -> Result<(Scores, String)> {
    let classes: Vec<u8> = (1..cfg.num_classes as u8).collect();
    let mut per_case = Vec::new();
    let mut dice_all: Vec<Vec<f64>> = vec![Vec::new(); classes.len()];
    let mut hd_all: Vec<Vec<f64>> = vec![Vec::new(); classes.len()];
    for case in cases {
        let pred = crate::runtime::guard::boundary(|| predict_labels(net, cfg, case, device))
            .map_err(|e| super::finetune::out_of_memory(e, &format!("evaluate case {}", case.id), cfg, device))?;
        let gt = case.label.as_ref().context("segmentation case without a label map")?;
        let mut d = Vec::new();
        let mut h = Vec::new();
        for (i, &c) in classes.iter().enumerate() {
            let dv = metrics::dice(&pred, gt, c);
            let hv = metrics::hausdorff(&pred, gt, case.shape, case.spacing, c, 95.0)
                .with_context(|| format!("case {}", case.id))?;
            dice_all[i].push(dv);
            hd_all[i].push(hv);
            d.push(dv);
            h.push(hv);
        }
        per_case.push(results::SegmentationCase {
            id: case.id.clone(),
            dice: nums(&d),
            hd95: nums(&h),
            mean_dice: Num(metrics::mean_std(&d).0),
            mean_hd95: Num(metrics::mean_std(&h).0),
        });
    }
    let stats = |all: &[Vec<f64>]| -> (Vec<f64>, Vec<f64>, Vec<usize>) {
        let s: Vec<(f64, f64, usize)> = all.iter().map(|v| metrics::mean_std(v)).collect();
        (
            s.iter().map(|x| x.0).collect(),
            s.iter().map(|x| x.1).collect(),
            s.iter().map(|x| x.2).collect(),
        )
    };
    let (dm, ds, dn) = stats(&dice_all);
    let (hm, hs, hn) = stats(&hd_all);
    // Mean over cases of each case's mean over classes.
    let case_dice: Vec<f64> = (0..cases.len())
        .map(|k| metrics::mean_std(&dice_all.iter().map(|v| v[k]).collect::<Vec<_>>()).0)
        .collect();
    let case_hd: Vec<f64> = (0..cases.len())
        .map(|k| metrics::mean_std(&hd_all.iter().map(|v| v[k]).collect::<Vec<_>>()).0)
        .collect();
    let (cdm, cds, _) = metrics::mean_std(&case_dice);
    let (chm, chs, _) = metrics::mean_std(&case_hd);
    let scores = Scores::Segmentation(results::Segmentation {
        classes,
        cases: per_case,
        per_class: results::PerClass {
            dice_mean: nums(&dm),
            dice_std: nums(&ds),
            dice_n: dn,
            hd95_mean: nums(&hm),
            hd95_std: nums(&hs),
            hd95_n: hn,
        },
        mean: results::DiceHd {
            dice: Num(cdm),
            hd95: Num(chm),
        },
        std: results::DiceHd {
            dice: Num(cds),
            hd95: Num(chs),
        },
    });
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ");
    let line = format!(
        "evaluate (segmentation, {} cases): Dice {cdm:.4} ± {cds:.4} (per class {}), HD95 {chm:.2} ± {chs:.2} mm (per class {})",
        cases.len(),
        fmt(&dm),
        fmt(&hm)
    );
    Ok((scores, line))
}

fn classification(
    net: &model::Net,
    cfg: &DownstreamConfig,
    cases: &[data::LabelledCase],
    device: tch::Device,
) -> Result<(Scores, String)> {
    let mut probs = Vec::new();
    let mut truth = Vec::new();
    let mut per_case = Vec::new();
    for case in cases {
        let logits = crate::runtime::guard::boundary(|| {
            let x = data::resize(&case.image_tensor(), cfg.patch_size).to_device(device);
            tch::no_grad(|| net.forward_t(&x, false))
        })
        .map_err(|e| super::finetune::out_of_memory(e, &format!("evaluate case {}", case.id), cfg, device))?;
        let p = logits
            .softmax(1, Kind::Double)
            .to_device(tch::Device::Cpu)
            .flatten(0, -1);
        let p = Vec::<f64>::try_from(&p).context("cannot read class probabilities")?;
        let class = case.class.context("classification case without a class")? as usize;
        per_case.push(results::ClassificationCase {
            id: case.id.clone(),
            class,
            predicted: metrics::argmax(&p),
            probs: nums(&p),
        });
        probs.push(p);
        truth.push(class);
    }
    let acc = metrics::accuracy(&probs, &truth);
    let (per, auc) = metrics::macro_auc(&probs, &truth, cfg.num_classes as usize);
    let scores = Scores::Classification(results::Classification {
        cases: per_case,
        accuracy: Num(acc),
        auc_per_class: nums(&per),
        auc: Num(auc),
    });
    let line = format!(
        "evaluate (classification, {} cases): accuracy {acc:.4}, ROC AUC {auc:.4}",
        cases.len()
    );
    Ok((scores, line))
}
