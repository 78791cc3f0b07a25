"""Evaluation: the pixel-level shapes checker and the prompt-alignment benchmark."""

from .alignment import load_prompts, run_alignment, score_references
from .checker import CATEGORIES, aggregate, evaluate_images, read_attributes, score

__all__ = ["CATEGORIES", "aggregate", "evaluate_images", "load_prompts", "read_attributes", "run_alignment", "score",
           "score_references"]
