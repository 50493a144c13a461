"""Evaluation the way the papers report it: verification (LFW-protocol accuracy, TAR@FAR, ROC),
identification (rank-1, CMC), age estimation (MAE, group accuracy) and synthesis quality.

Metrics are plain numpy (:mod:`.verification`, :mod:`.identification`, :mod:`.age`, :mod:`.synthesis`);
:mod:`.pairs` reads pair lists; :mod:`.embed` runs the model over image files in batches;
:mod:`.runner` ties them together for ``mtlface-fast eval`` and :mod:`.report` writes JSON and Markdown.
"""
from .age import age_metrics, read_age_labels
from .identification import cmc, cosine_matrix, identification_metrics, identity_ranks, read_identity_list
from .pairs import PairList, read_pairs
from .synthesis import synthesis_metrics
from .verification import (best_threshold, cosine_similarity, kfold_accuracy, roc_curve, tar_at_far,
                           verification_metrics)

__all__ = ["age_metrics", "read_age_labels", "cmc", "cosine_matrix", "identification_metrics", "identity_ranks",
           "read_identity_list", "PairList", "read_pairs", "synthesis_metrics", "best_threshold",
           "cosine_similarity", "kfold_accuracy", "roc_curve", "tar_at_far", "verification_metrics"]
