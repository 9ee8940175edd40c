"""Sampling: the one MALA kernel, annealed importance sampling in latent space, the generator as
an openmmtools move, and plain OpenMM MD."""
