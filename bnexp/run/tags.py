"""TensorBoard tag names and their one-line descriptions: what each chart is and how to read it.

One tag, one kind: TensorBoard keeps a single plugin per tag, so a tag written both as a
histogram and as a scalar vanishes from one tab (and, with the default Rust loader, from both).
The running statistics are therefore histograms under `bn/layerK/running_mean|running_var` and
scalars under `bn/layerK/running_mean_avg|running_var_avg`.

The descriptions travel in each tag's first event (SummaryMetadata.summary_description).
TensorBoard 2.21 shows them beside the chart with `--load_fast=false`; its default loader drops them.
"""

from __future__ import annotations

import re

STEPS_TARGET = 0.95  # the validation accuracy whose step count is logged as a scalar and an HParams metric
STEPS_TAG = f"summary/steps_to_{STEPS_TARGET:.2f}"
EVAL_TAGS = ("val/loss", "val/acc", "test/loss", "test/acc")
BN_STATS = ("running_mean", "running_var")
PERCENTILES = (15, 50, 85)


def bn_histogram_tag(layer: str, stat: str) -> str:
    """Every feature's running statistic: Histograms and Distributions tabs."""
    return f"bn/{layer}/{stat}"


def bn_scalar_tag(layer: str, stat: str) -> str:
    """The same statistic averaged over features: Scalars tab (a tag of its own, see the module doc)."""
    return f"bn/{layer}/{stat}_avg"


def act_tag(layer: str, percentile: int) -> str:
    return f"act/{layer}/p{percentile}"


_EVAL = "every train.eval_every steps, in eval mode (BN uses its running statistics)"
_FIXED = {
    "train/loss": "Cross-entropy of each training mini-batch (train mode); noisy, it should fall. "
                  "A NaN or inf ends the run as diverged.",
    "val/loss": f"Mean cross-entropy on the held-out validation images, {_EVAL}. "
                "Rising while train/loss falls means overfitting.",
    "val/acc": f"Accuracy on the held-out validation images, {_EVAL}; the sweep objective, and "
               "steps to 90/95/97/98% count from it: every choice is made on validation.",
    "test/loss": "Mean cross-entropy on the 10,000 test images, once at the end of the run (and every "
                 "train.test_every steps if set), eval mode: reported, never chosen on.",
    "test/acc": "Accuracy on the 10,000 test images, once at the end of the run (and every "
                "train.test_every steps if set), eval mode: reported, never chosen on.",
    "lr": "The optimizer's learning rate at each evaluation.",
    "test/acc_train_mode": "Accuracy on the test images with BN in train mode, where test/acc is measured: chunks of train.batch_size "
                           "images, each normalized by its own batch statistics. The gap to test/acc "
                           "is what switching to the running statistics costs or gains.",
    "probe/loss_min": "Santurkar et al. 2018 Fig. 4a: the lowest loss on this step's batch along the "
                      "gradient, over the step-size grid (probe.multiples x lr). Narrow band = smooth.",
    "probe/loss_max": "Santurkar et al. 2018 Fig. 4a: the highest loss on this step's batch along the "
                      "gradient, over the step-size grid. A wide gap to loss_min = a rough landscape.",
    "probe/grad_change": "Gradient predictiveness (Santurkar Fig. 4b): the largest l2 change of the "
                         "gradient along the gradient step. Smaller = the gradient stays a good guide.",
    "probe/beta": "Effective beta-smoothness (Santurkar Fig. 4c): the largest gradient change per unit "
                  "of step length along the gradient. Smaller = smoother loss.",
    STEPS_TAG: f"First evaluated step with val/acc >= {STEPS_TARGET:g}, written once at the end of "
               "the run; NaN when the run never got there.",
}
_PATTERNS = (
    (r"bn/layer(\d+)/running_mean",
     "Running mean of each of layer {0}'s features: what batch norm subtracts at test time. "
     "One histogram over features per evaluation; it settles as training converges."),
    (r"bn/layer(\d+)/running_var",
     "Running (unbiased) variance of each of layer {0}'s features: what batch norm divides by at "
     "test time. One histogram over features per evaluation; it settles as training converges."),
    (r"bn/layer(\d+)/running_mean_avg",
     "Layer {0}'s running mean averaged over its features (all of them: Histograms, "
     "bn/layer{0}/running_mean). Flat once the layer's input statistics settle."),
    (r"bn/layer(\d+)/running_var_avg",
     "Layer {0}'s running variance averaged over its features (all of them: Histograms, "
     "bn/layer{0}/running_var). Flat once the layer's input statistics settle."),
    (r"ics/(layer\d+|head)/l2",
     "Internal covariate shift of {0} (Santurkar Def. 2.1): l2 distance between its weight "
     "gradient before and after the earlier layers take their step on this batch. 0 = no shift."),
    (r"ics/(layer\d+|head)/cos",
     "{0}'s weight gradient before vs after the earlier layers' step on this batch, as a "
     "cosine (Santurkar Def. 2.1): 1 = the update did not change what {0} should do."),
    (r"act/layer(\d+)/p(\d+)",
     "{1}th percentile of the input to layer {0}'s nonlinearity on 1,000 fixed test images, eval "
     "mode (Ioffe & Szegedy 2015, Fig. 1b,c): it drifts without batch norm and holds with it."),
)


def describe(tag: str) -> str:
    """The one-line description of a run's tag ('' for a tag this module does not know)."""
    if tag in _FIXED:
        return _FIXED[tag]
    for pattern, text in _PATTERNS:
        match = re.fullmatch(pattern, tag)
        if match:
            return text.format(*match.groups())
    return ""
