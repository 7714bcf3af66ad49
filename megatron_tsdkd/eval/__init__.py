"""Evaluation: final-answer extraction and scoring, and greedy generation with Hugging Face models."""
from .answers import extract_answer, is_correct, normalize_answer, score

__all__ = ["extract_answer", "is_correct", "normalize_answer", "score"]
