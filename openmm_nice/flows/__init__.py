"""The flow and the generator: NICE couplings, the learned matrix S, the conditional Gaussian of
the redundant latents, and x = S . F(z) with exact importance weights."""
