"""Sampling: the one MALA kernel, annealed importance sampling in latent space, the generator as
an openmmtools move, plain OpenMM MD, and batched parallel tempering for references."""
