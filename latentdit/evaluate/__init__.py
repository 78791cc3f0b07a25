"""Evaluation: the pixel-level shapes checker and the prompt-alignment benchmark."""

from .alignment import load_prompts, relation_layout, run_alignment, score_references, single_object_confusion
from .checker import read_attributes
from .scoring import CATEGORIES, aggregate, evaluate_images, relation_outcome, score, score_read

__all__ = ["CATEGORIES", "aggregate", "evaluate_images", "load_prompts", "read_attributes", "relation_layout",
           "relation_outcome", "run_alignment", "score", "score_read", "score_references", "single_object_confusion"]
