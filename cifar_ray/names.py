"""The names the stages and commands agree on, without torch: the metric the search goes by,
report keys, checkpoint files, GradCAM's layers and figures."""

METRIC = "val/acc"  # what ASHA, the checkpoints and the choice of the best go by, by default
# ... and what they may go by instead (tune.metric): imbalanced classes want one of the others.
METRICS = {"val/acc": "validation accuracy", "val/balanced_acc": "validation balanced accuracy",
           "val/f1": "validation macro F1"}
MODE = "max"  # ... and which way: higher is better
STARTUP = "time/startup_s"  # trial function start -> this worker's first training step
CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside each Ray checkpoint
CHECKPOINT_PATH = "checkpoint_path"  # the key of a report's checkpoint (as Ray's Tune callback)
# Where a trial's start-up goes, in order; each is a report key "time/<phase>_s" and a column
# "<phase>_s" of trials.csv. Their sum is the start-up.
PHASES = {
    "trial": "the trial's own process: imports, its config",
    "controller": "Ray Train's controller and the worker's placement, to the worker process "
                  "(0 when Ray had a worker process ready)",
    "worker": "the worker process's start (and with several workers, torch's process group), "
              "to the training function",
    "imports": "torch, Lightning and the rest of the training code in the worker",
    "data": "reading the data set (from Ray's object store) and the split",
    "footprint": "what the model costs: its parameters, FLOPs and (a latency objective) its "
                 "ONNX export timed",
    "lightning": "the Lightning Trainer and strategy, the model on its device",
    "first_step": "the data on the device, the optimiser, to the first training step",
}
# Unix times in every report, for how long the trials trained: from the first step to the report.
FIRST_STEP_AT, REPORTED_AT = "time/first_step_at", "time/reported_at"

# GradCAM: the layers of model.ResNet9 with a spatial map, shallow to deep (the deepest, s/8
# square, is the most class-specific: the default); mistakes shown; images per forward pass.
CAM_LAYERS = ("prep", "layer1_X", "layer1_R", "layer2_X", "layer3_X", "layer3_R")
DEFAULT_CAM_LAYER = CAM_LAYERS[-1]
CAM_IMAGES, CAM_BATCH = 16, 256
# Its figures, in the order its index.html and the report show them, with what each shows.
GRADCAM_FIGURES = {
    "misclassified.png": "The most confident mistakes, each beside its GradCAM for the predicted "
                         "class (true / predicted (probability))",
    "gradcam_true_vs_pred.png": "Where the model looked for the true class vs the predicted one",
    "confusion_matrix.png": "Confusion matrix",
    "per_class_accuracy.png": "Accuracy per class",
}

SHOWN_MAX = 80  # characters of a name shown in a line, a figure's label or a file name


def shown_name(text: object, limit: int = SHOWN_MAX) -> str:
    """The one sanitiser of a name from a file or a user, shown, drawn or written: one
    printable line (escapes, overrides, undecodable bytes shown as `\\x1b`), cut at `limit`."""
    text = str(text)[:limit + 1]  # enough to tell whether it is cut
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:max(limit - 1, 0)] + "…"


def file_name(text: object, limit: int = 40) -> str:
    """A name in a file name: shown_name's, only letters, digits, '-', '_', '.' kept."""
    kept = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_"
                   for c in shown_name(text, limit))
    return kept.lstrip(".") or "_"
