"""What a reader calls each metric: the one mapping from stored keys (`tpr_at_fpr_1`) to names on pages."""

from __future__ import annotations

METRIC_NAMES = {
    "auc": "ROC AUC",
    "ap": "AP (average precision)",
    "acc": "accuracy",
    "accuracy": "accuracy",
    "real_acc": "accuracy on real images",
    "fake_acc": "accuracy on generated images",
    "balanced_acc": "balanced accuracy",
    "eer": "EER (equal error rate, lower is better)",
    "tpr_at_fpr_1": "TPR @ 1% FPR",
    "tpr_at_fpr_5": "TPR @ 5% FPR",
    "epoch": "epoch",
    "train_loss": "train loss",
    "lr": "learning rate",
    "val_auc": "val ROC AUC",
    "val_ap": "val AP",
}

# Stored as fractions, shown × 100 like every other rate (a loss or a learning rate is not a rate).
PERCENT_KEYS = frozenset({"auc", "ap", "acc", "accuracy", "real_acc", "fake_acc", "balanced_acc", "eer",
                          "tpr_at_fpr_1", "tpr_at_fpr_5", "val_auc", "val_ap"})


# Column headers where a table of five metrics must fit 80 columns; `metric_name` says the rest below it.
SHORT_NAMES = {"ap": "AP", "balanced_acc": "bal. acc", "eer": "EER", "tpr_at_fpr_1": "TPR@1%FPR"}


def short_metric_name(key: str) -> str:
    return SHORT_NAMES.get(key) or metric_name(key)


def metric_name(key: str) -> str:
    """The reader's name of a metric key; an unknown key with its underscores as spaces."""
    return METRIC_NAMES.get(key, key.replace("_", " "))
