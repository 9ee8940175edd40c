"""Training: the losses and their schedule, the walkers and the buffer of weighted samples,
reporters, and torch.distributed set-up."""
