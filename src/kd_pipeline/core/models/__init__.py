"""Models: loading, identities, the teacher, the student, the LM head policy, Liger kernels."""
