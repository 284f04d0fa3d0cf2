"""Evaluation of a student: held-out metrics against the teacher artifact (`metrics`) and greedy
generations (`generation`)."""
