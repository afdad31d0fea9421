"""Evaluation: generator quality with a teacher (agreement, Fréchet distance on teacher features)."""
