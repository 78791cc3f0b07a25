"""Evaluation: the pixel-level shapes checker and the prompt-alignment benchmark."""

from .alignment import load_prompts, run_alignment, score_references, single_object_confusion
from .checker import read_attributes
from .scoring import CATEGORIES, aggregate, evaluate_images, score, score_read

__all__ = ["CATEGORIES", "aggregate", "evaluate_images", "load_prompts", "read_attributes", "run_alignment", "score",
           "score_read", "score_references", "single_object_confusion"]
