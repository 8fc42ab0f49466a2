//! Training losses: Dice + cross-entropy for segmentation, exactly MONAI's
//! `DiceCELoss(to_onehot_y=True, softmax=True)` with its defaults (background
//! included, smooth 1e-5 on both sides, Dice averaged over batch and class,
//! cross-entropy averaged over voxels), and plain cross-entropy for
//! classification.
use anyhow::{ensure, Result};
use tch::{Kind, Reduction, Tensor};

/// The two terms and their sum (what is minimised).
pub struct DiceCe {
    pub dice: Tensor,
    pub ce: Tensor,
    pub total: Tensor,
}

/// `logits` [b, c, x, y, z], `labels` [b, 1, x, y, z] integer classes in 0..c.
pub fn dice_ce(logits: &Tensor, labels: &Tensor) -> Result<DiceCe> {
    let ls = logits.size();
    let ys = labels.size();
    ensure!(
        ls.len() == 5 && ys.len() == 5 && ys[1] == 1 && ls[0] == ys[0] && ls[2..] == ys[2..],
        "DiceCE needs logits [b, c, x, y, z] and labels [b, 1, x, y, z], got {ls:?} and {ys:?}"
    );
    let c = ls[1];
    let target = labels.squeeze_dim(1).to_kind(Kind::Int64);
    let onehot = target.one_hot(c).permute([0, 4, 1, 2, 3]).to_kind(logits.kind());
    let p = logits.softmax(1, logits.kind());
    let dims: &[i64] = &[2, 3, 4];
    let inter = (&p * &onehot).sum_dim_intlist(dims, false, logits.kind());
    let denom = p.sum_dim_intlist(dims, false, logits.kind()) + onehot.sum_dim_intlist(dims, false, logits.kind());
    let ratio: Tensor = (inter * 2.0 + 1e-5) / (denom + 1e-5);
    let dice = ratio.neg().g_add_scalar(1.0).mean(logits.kind());
    let ce = logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, -100, 0.0);
    let total = &dice + &ce;
    Ok(DiceCe { dice, ce, total })
}

/// Mean cross-entropy of `logits` [b, c] against classes [b].
pub fn cross_entropy(logits: &Tensor, classes: &Tensor) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(classes, None, Reduction::Mean, -100, 0.0)
}
