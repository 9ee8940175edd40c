"""Energies U(x) = E(x)/kT of batches: toy targets with exact answers, OpenMM Systems through
Contexts and their worker pool, and a System's forces as batched torch operations."""
