"""Runnable programs around rl_loss: the Hydra training launcher, sweep reports, config checks."""
